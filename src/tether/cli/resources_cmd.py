"""``tether apply -f``, ``tether delete -f``, ``tether get KIND``: the local store's resources, like kubectl.

These read and write the store directory (``--resources-dir``) themselves, no server needed; a
running ``tether controller destination`` over the same directory picks a change up within a second.
Everything given is validated first, and one bad document means nothing is written
(tether.platform.local.apply).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import Column, dump, emit, output_option
from tether.cli.params import DNS_LABEL, resources_dir_option, state_dir_option

FILENAME_HELP = "a YAML file (multi-document), a directory of them, or - for stdin (repeatable)"


def _apply_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = resources_dir_option(f)
    f = click.option(
        "--dry-run", type=click.Choice(["none", "client", "server"]), is_flag=False, flag_value="client",
        default="none", show_default=True,
        help="validate and report what would change without writing; `--dry-run` alone is client "
        "(client and server both validate here: no control plane is needed)",
    )(f)
    f = click.option("-f", "--filename", "filenames", multiple=True, required=True, metavar="FILE|DIR|-",
                     help=FILENAME_HELP)(f)
    return f


def _refuse(e: Any) -> OperationFailed:
    """Every problem on its own line, then the one-line verdict (exit 1)."""
    for line in e.errors:
        click.echo(f"error: {line}", err=True)
    return OperationFailed(f"nothing was written ({len(e.errors)} error(s))")


@click.command("apply", short_help="create or update resources in the local store from YAML")
@_apply_options
def apply(filenames: tuple[str, ...], dry_run: str, resources_dir: str) -> int:
    """Create or update the resources in the YAML given with -f in the local store.

    Every document is validated first; if one is invalid, each problem is printed (file, document
    number, kind/namespace/name, field and reason) and nothing is written. An object already in the
    store is replaced in the file that defines it; a new one gets its own file. A running
    `tether controller destination` over --resources-dir serves the change within a second.
    """
    from tether.platform.local import apply as lib

    dry = dry_run != "none"
    try:
        report = lib.apply(resources_dir, lib.read_inputs(filenames), dry_run=dry)
    except lib.ApplyError as e:
        raise _refuse(e) from None
    for n in report.notices:
        click.echo(f"notice: {n}", err=True)
    for o in report.outcomes:
        click.echo(o.line(dry))
    return 0


@click.command("delete", short_help="delete the resources named in YAML from the local store")
@_apply_options
def delete(filenames: tuple[str, ...], dry_run: str, resources_dir: str) -> int:
    """Delete from the local store the resources the YAML given with -f names (kind, namespace, name).

    The documents are validated as for `tether apply`. An object that is not in the store is an
    error (exit 1); the others are still deleted.
    """
    from tether.platform.local import apply as lib

    dry = dry_run != "none"
    try:
        report = lib.delete(resources_dir, lib.read_inputs(filenames), dry_run=dry)
    except lib.ApplyError as e:
        raise _refuse(e) from None
    missing = 0
    for o in report.outcomes:
        if o.action == "not found":
            missing += 1
            click.echo(f"error: {o.ref}{' -n ' + o.namespace if o.namespace else ''} not found", err=True)
        else:
            click.echo(o.line(dry))
    return 1 if missing else 0


COLUMNS = [
    Column("namespace", lambda r: r["namespace"]),
    Column("name", lambda r: r["name"]),
    Column("apiVersion", lambda r: r["apiVersion"]),
]


@click.command("get", short_help="list the resources of a kind in the local store")
@click.argument("kind", metavar="KIND")
@click.option("-n", "--namespace", type=DNS_LABEL, help="only this namespace  [default: all namespaces]")
@click.option("-A", "--all-namespaces", is_flag=True, help="every namespace (the default; not with -n)")
@output_option(("table", "json", "yaml"))
@resources_dir_option
@state_dir_option
def get(kind: str, namespace: str | None, all_namespaces: bool, output: str, resources_dir: str,
        state_dir: str) -> int:
    """List the resources of KIND in the local store, read from --resources-dir (no server needed).

    KIND is spelled as kubectl accepts it: ServiceProfile, serviceprofiles or sp; Service or svc;
    HTTPRoute, GRPCRoute, TCPRoute, TrafficSplit (ts), Server (srv), ServerAuthorization (saz),
    AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication, HTTPLocalRateLimitPolicy,
    EgressNetwork, ExternalWorkload (ew), Namespace (ns); Workload (wl) lists the workload registry
    in --state-dir. The objects of a file that does not validate are left out, with a warning on
    stderr naming the file and the problem. JSON and YAML print a kubectl List:
    {"apiVersion": "v1", "kind": "List", "items": [...]}.
    """
    from tether.platform.local import apply as lib

    if namespace and all_namespaces:
        raise CliError("use -n/--namespace or -A/--all-namespaces, not both")
    try:
        objs = lib.get(resources_dir, kind, namespace, state_dir)
    except ValueError as e:
        raise CliError(f"KIND: {e}") from None
    if output in ("json", "yaml"):
        dump({"apiVersion": "v1", "kind": "List", "items": [o.dump() for o in objs]}, output)
        return 0
    rows = [{"namespace": o.namespace, "name": o.name, "apiVersion": o.api_version} for o in objs]
    where = f" in namespace {namespace}" if namespace else ""
    emit(rows, COLUMNS, output, empty=f"No resources found{where}.")
    return 0
