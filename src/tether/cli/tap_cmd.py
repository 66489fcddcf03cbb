"""``tether viz tap``: live requests of a workload's pods, from the tap server in each pod's proxy.

The pods come from the local mesh's status (``tether up`` / ``tether run``); the client identity is
a certificate the CLI signs for Linkerd's viz tap identity with the mesh's issuer (see
:mod:`tether.viz.tap`). ``viz profile --tap`` (and ``tether profile --tap``) build a ServiceProfile
from the routes a tap observed.

This module defines a minimal ``viz`` group holding ``tap`` and ``profile``; the full ``viz`` group
(stat, routes, top, edges, dashboard) lives in ``tether.cli.viz_cmd`` and takes these commands in.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import state_dir_option
from tether.cli.profile_cmd import profile


def _mesh(state_dir: str) -> Any:
    from tether.viz.tap import Mesh, TapError

    try:
        return Mesh.load(state_dir)
    except TapError as e:
        raise OperationFailed(str(e)) from None


def _pods(mesh: Any, resource: str, namespace: str) -> list[Any]:
    from tether.viz.tap import TapError

    try:
        pods = mesh.select(resource, namespace)
    except TapError as e:
        raise CliError(str(e)) from None
    if not pods:
        raise OperationFailed(f"no running meshed pods for {resource} in namespace {namespace}")
    return list(pods)


def run_tap(state_dir: str, resource: str, namespace: str, *, to: str | None, to_namespace: str | None,
            max_rps: float, scheme: str | None, method: str | None, authority: str | None, path: str | None,
            extract_headers: bool, on_event: Any, duration: float | None = None) -> Any:
    """Tap ``resource``'s pods, calling ``on_event(mesh, event)``; returns the mesh."""
    from tether.viz.tap import ClientCredentials, TapError, observe_request, parse_resource, tap_pods

    mesh = _mesh(state_dir)
    pods = _pods(mesh, resource, namespace)
    to_ips = None
    if to is not None:
        try:
            parse_resource(to)
            to_ips = mesh.addresses(to, to_namespace or namespace)
        except TapError as e:
            raise CliError(f"--to: {e}") from None
    request = observe_request(path=path, method=method, authority=authority, scheme=scheme, to_ips=to_ips,
                              max_rps=max_rps, extract_headers=extract_headers)
    try:
        creds = ClientCredentials(mesh)
        asyncio.run(tap_pods(pods, creds, request, lambda pod, ev: on_event(mesh, ev), duration))
    except TapError as e:
        raise OperationFailed(str(e)) from None
    return mesh


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@click.command("tap", short_help="watch the live requests of a workload's pods")
@click.argument("resource", metavar="RESOURCE")
@click.option("-n", "--namespace", default="default", show_default=True, help="namespace of the resource")
@click.option("--to", "to", metavar="RESOURCE", help="only requests to this resource (deploy/NAME, po/NAME, svc/NAME)")
@click.option("--to-namespace", metavar="NS", help="namespace of --to  [default: --namespace]")
@click.option("--max-rps", type=click.FloatRange(min=0.0, min_open=True), default=100.0, show_default=True,
              help="at most this many requests a second are shown, per pod")
@click.option("--scheme", metavar="SCHEME", help="only requests with this scheme (http, https)")
@click.option("--method", metavar="METHOD", help="only requests with this HTTP method")
@click.option("--authority", metavar="AUTHORITY", help="only requests with this :authority")
@click.option("--path", metavar="PREFIX", help="only requests whose path starts with this prefix")
@click.option("--status", type=click.IntRange(100, 599), metavar="CODE",
              help="only requests answered with this HTTP status (each request is shown once its response "
                   "head is in)")
@click.option("-o", "--output", type=click.Choice(["wide", "json"]), default=None,
              help="output format: wide (the resources of src and dst) or json (one object per event)")
@state_dir_option
def tap(resource: str, namespace: str, to: str | None, to_namespace: str | None, max_rps: float,
        scheme: str | None, method: str | None, authority: str | None, path: str | None, status: int | None,
        output: str | None, state_dir: str) -> int:
    """Print RESOURCE's live requests as they happen (deploy/NAME, po/NAME, svc/NAME or ns/NAME): a
    req line when a request starts, rsp when its response head comes back, end when it ends.

    \b
    Example:
      tether viz tap deploy/web -n demo --path /api --method GET
    """
    from tether.viz.tap import StatusFilter, event_json, render_line, render_wide

    def show(mesh: Any, ev: Any) -> None:
        if output == "json":
            _print(json.dumps(event_json(ev, mesh), separators=(",", ":")))
        elif output == "wide":
            _print(render_wide(ev, mesh))
        else:
            _print(render_line(ev))

    # --status: the proxy's match has no status (tap.proto), so the CLI holds each request's event until
    # its response head says whether to show it.
    on_event = show if status is None else StatusFilter(status, show)
    run_tap(state_dir, resource, namespace, to=to, to_namespace=to_namespace, max_rps=max_rps, scheme=scheme,
            method=method, authority=authority, path=path, extract_headers=output == "json", on_event=on_event)
    return 0


@click.group("viz", short_help="observe the mesh: live requests (tap), profiles from traffic")
def viz() -> None:
    """Observe the mesh (this build's viz commands: tap, profile)."""


viz.add_command(tap)
viz.add_command(profile)  # Linkerd's `viz profile --tap`
