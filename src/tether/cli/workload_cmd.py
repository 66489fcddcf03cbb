"""``tether workload register|list|remove``: the local platform's workload registry.

The identity service signs a workload's certificate only if the proxy presents that workload's
bootstrap token; ``register`` writes the token (mode 0600) for the proxy to read with
``--identity-token-path``. The registry lives under ``--state-dir`` (see
tether.platform.local.workloads for the layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import Column, dump, emit, output_option
from tether.cli.params import ADDRESS, DNS_LABEL, control_plane_options, namespace_option, state_dir_option


@click.group("workload", short_help="register, list and remove local workloads and their bootstrap tokens")
def workload() -> None:
    """Register, list and remove the workloads of the local platform.

    A registered workload gets a bootstrap token; its proxy presents the token to the identity
    service to get a certificate for the workload's identity
    (<service-account>.<namespace>.serviceaccount.identity.<controller-namespace>.<trust-domain>).
    """


def _registry(state_dir: str) -> Any:
    from tether.platform.local.workloads import WorkloadRegistry

    return WorkloadRegistry(state_dir)


def _identity(w: Any, controller_namespace: str, trust_domain: str) -> str:
    return f"{w.service_account}.{w.namespace}.serviceaccount.identity.{controller_namespace}.{trust_domain}"


def _port(text: str) -> tuple[int, str | None]:
    num, _, name = text.partition(":")
    if not num.isdigit() or not 0 < int(num) < 65536:
        raise CliError(f"--port {text!r}: expected PORT or PORT:NAME with PORT 1-65535")
    return int(num), name or None


def _label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise CliError(f"--label {text!r}: expected KEY=VALUE")
    return key, value


@workload.command("register", short_help="register a workload and write its bootstrap token")
@click.argument("name", type=DNS_LABEL)
@namespace_option
@click.option("--service-account", type=DNS_LABEL, help="the identity's service account  [default: NAME]")
@click.option("--address", "addresses", multiple=True, metavar="IP", help="an address of the workload (repeatable)")
@click.option("--port", "ports", multiple=True, metavar="PORT[:NAME]", help="a port the workload serves (repeatable)")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="a label (repeatable)")
@click.option("--proxy-admin", type=ADDRESS,
              help="its proxy's admin address, for `tether identity` and `check --proxy`")
@click.option("--rotate-token", is_flag=True,
              help="re-register an existing workload with a new token (its proxy's old token stops working)")
@control_plane_options
@state_dir_option
@output_option(("text", "json", "yaml"), default="text")
def register(name: str, namespace: str, service_account: str | None, addresses: tuple[str, ...],
             ports: tuple[str, ...], labels: tuple[str, ...], proxy_admin: tuple[str, int] | None,
             rotate_token: bool, controller_namespace: str, trust_domain: str, state_dir: str, output: str) -> int:
    """Register the workload NAME and write its bootstrap token.

    The token file (STATE_DIR/tokens/NAMESPACE/NAME.token, mode 0600) is what the workload's proxy
    reads with --identity-token-path. Registering an existing workload again changes its definition
    and keeps its token, unless --rotate-token.
    """
    import ipaddress

    from tether.platform.local.workloads import Workload, WorkloadError, WorkloadPort

    for a in addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise CliError(f"--address {a!r}: not an IP address") from None
    try:
        w = Workload(
            name=name, namespace=namespace, service_account=service_account or name,
            addresses=tuple(addresses),
            ports=tuple(WorkloadPort(*_port(p)) for p in ports),
            labels=dict(_label(lb) for lb in labels),
            proxy_admin=f"{proxy_admin[0]}:{proxy_admin[1]}" if proxy_admin else None,
        )
    except WorkloadError as e:
        raise CliError(str(e)) from None
    reg = _registry(state_dir)
    try:
        if reg.exists(namespace, name) and not rotate_token:
            reg.update(w)
            action = "updated (token unchanged)"
        else:
            reg.register(w)
            action = "registered (new token)"
    except (OSError, WorkloadError) as e:
        raise OperationFailed(f"cannot write to --state-dir {state_dir}: {e}") from None
    doc = {
        "namespace": namespace,
        "name": name,
        "identity": _identity(w, controller_namespace, trust_domain),
        "tokenPath": str(reg.token_path(namespace, name)),
        "workloadPath": str(reg.workload_path(namespace, name)),
    }
    if output != "text":
        dump(doc, output)
        return 0
    click.echo(f"workload {namespace}/{name} {action}")
    click.echo(f"  identity  {doc['identity']}")
    click.echo(f"  token     {doc['tokenPath']}")
    click.echo(f"run its proxy with --identity-name {doc['identity']} --identity-token-path {doc['tokenPath']}")
    return 0


COLUMNS = [
    Column("namespace", lambda w: w["namespace"]),
    Column("name", lambda w: w["name"]),
    Column("service account", lambda w: w["serviceAccount"]),
    Column("proxy admin", lambda w: w.get("proxyAdmin")),
    Column("addresses", lambda w: w["addresses"], wide=True),
    Column("ports", lambda w: [_port_text(p) for p in w["ports"]], wide=True),
    Column("labels", lambda w: w["labels"], wide=True),
    Column("identity", lambda w: w["identity"], wide=True),
]


def _port_text(p: Mapping[str, Any]) -> str:
    return f"{p['port']}:{p['name']}" if p.get("name") else str(p["port"])


@workload.command("list", short_help="list registered workloads")
@click.option("-n", "--namespace", type=DNS_LABEL, help="only this namespace  [default: all namespaces]")
@control_plane_options
@state_dir_option
@output_option()
def list_(namespace: str | None, controller_namespace: str, trust_domain: str, state_dir: str, output: str) -> int:
    """List the registered workloads.

    JSON and YAML: {"items": [...]}, each item with namespace, name, serviceAccount, addresses,
    ports, labels, proxyAdmin (when known) and identity.
    """
    from tether.platform.local.workloads import WorkloadError

    try:
        workloads = _registry(state_dir).list(namespace)
    except WorkloadError as e:
        raise OperationFailed(str(e)) from None
    items = []
    for w in workloads:
        d = w.to_dict()
        items.append({
            "namespace": d["namespace"], "name": d["name"], "serviceAccount": d["serviceAccount"],
            "addresses": d["addresses"], "ports": d["ports"], "labels": d["labels"],
            "proxyAdmin": d.get("proxyAdmin"),
            "identity": _identity(w, controller_namespace, trust_domain),
        })
    emit(items, COLUMNS, output, empty=f"No workloads registered in {state_dir}.")
    return 0



@workload.command("remove", short_help="remove a workload and its token")
@click.argument("name", type=DNS_LABEL)
@namespace_option
@state_dir_option
def remove(name: str, namespace: str, state_dir: str) -> int:
    """Remove the workload NAME and its bootstrap token: its proxy can no longer renew its certificate."""
    reg = _registry(state_dir)
    if not reg.exists(namespace, name):
        raise OperationFailed(f"no workload {namespace}/{name} in {state_dir}")
    reg.remove(namespace, name)
    click.echo(f"workload {namespace}/{name} removed")
    return 0
