"""``tether authz``: who may call each port of a workload, read from the local store (like ``linkerd authz``).

For each port of the workload (its declared ports, the ports of Servers that select it, its probe
ports, or ``--port``) the inbound policy is computed exactly as the destination controller serves it
(:func:`tether.control.destination.translate.inbound_server`), then listed one authorization a row:
the route it applies to (``*``: every route of the server), the server (a Server, or the default
policy), and the authorization (an AuthorizationPolicy, a ServerAuthorization, or a default).
``-o wide`` adds the client networks and the authentication each requires.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import click

from tether.cli.errors import CliError
from tether.cli.output import Column, emit, output_option
from tether.cli.params import CIDRS, DNS_LABEL, resources_dir_option, state_dir_option

POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-authenticated", "cluster-unauthenticated",
            "deny", "audit")
DEFAULT_CLUSTER_NETWORKS = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"

COLUMNS = (
    Column("port", lambda r: r["port"]),
    Column("route", lambda r: r["route"]),
    Column("server", lambda r: r["server"]),
    Column("authorization", lambda r: r["authorization"]),
    Column("networks", lambda r: r["networks"], wide=True),
    Column("authentication", lambda r: r["authentication"], wide=True),
)


def _meta_name(m: Any, fallback_labels: Any = None) -> str:
    kind = m.WhichOneof("kind")
    if kind == "default":
        return f"default:{m.default}"
    if kind == "resource":
        return f"{m.resource.kind.lower()}/{m.resource.name}"
    labels = dict(fallback_labels or {})
    return f"{labels.get('kind', '?')}/{labels.get('name', '?')}"


def _net(n: Any) -> str:
    ip = n.ip
    if ip.WhichOneof("ip") == "ipv6":
        addr = str(ipaddress.IPv6Address((ip.ipv6.first << 64) | ip.ipv6.last))
    else:
        addr = str(ipaddress.IPv4Address(ip.ipv4))
    return f"{addr}/{n.prefix_len}"


def _networks(a: Any) -> str:
    out = []
    for n in a.networks:
        text = _net(n.net)
        excepts = [_net(e) for e in getattr(n, "except")]
        out.append(text + (f" except {' '.join(excepts)}" if excepts else ""))
    return ",".join(out)


def _authentication(a: Any) -> str:
    permit = a.authentication.WhichOneof("permit")
    if permit == "unauthenticated":
        return "unauthenticated"
    m = a.authentication.meshTLS
    if m.WhichOneof("clients") == "unauthenticated":
        return "any mesh identity"
    names = [i.name for i in m.identities.identities]
    names += ["*" if not s.parts else "*." + ".".join(s.parts) for s in m.identities.suffixes]
    return "mesh: " + ",".join(names) if names else "mesh: none"


def rows_for(server: Any, port: int) -> list[dict[str, Any]]:
    """One row per authorization of a port's inbound.Server message."""
    labels = dict(server.labels)
    srv = (f"default:{labels.get('name', '')}" if labels.get("kind") == "default"
           else f"{labels.get('kind', 'server')}/{labels.get('name', '')}")
    kind = server.protocol.WhichOneof("kind")
    proto = getattr(server.protocol, kind) if kind else None
    routes: list[Any] = []
    if kind == "detect" and proto is not None:
        routes = list(proto.http_routes)
    elif kind in ("http1", "http2", "grpc") and proto is not None:
        routes = list(proto.routes)
    rows: list[dict[str, Any]] = []

    def row(route: str, authz: Any | None) -> None:
        rows.append({
            "port": port, "protocol": kind or "", "route": route, "server": srv,
            "authorization": _meta_name(authz.metadata, authz.labels) if authz is not None else "(none: denied)",
            "networks": _networks(authz) if authz is not None else "",
            "authentication": _authentication(authz) if authz is not None else "",
        })

    for a in server.authorizations:
        row("*", a)
    if not server.authorizations:
        row("*", None)  # only a route's own authorizations (if any) admit anyone
    for r in routes:
        for a in r.authorizations:
            row(_meta_name(r.metadata), a)
    return rows


def _ports(world: Any, w: Any) -> list[int]:
    from tether.core.resources import policy as pol

    ports = {p.port for p in w.spec.ports}
    names = {p.name: p.port for p in w.spec.ports if p.name}
    for s in world.in_namespace("Server", w.namespace):
        assert isinstance(s, pol.Server)
        sel = s.spec.pod_selector
        if sel is not None and sel.matches(w.metadata.labels):
            port = s.spec.port if isinstance(s.spec.port, int) else names.get(s.spec.port)
            if port is not None:
                ports.add(port)
    for probe in w.spec.probes:
        port = probe.port if isinstance(probe.port, int) else names.get(probe.port)
        if port is not None:
            ports.add(port)
    return sorted(ports)


@click.command("authz", short_help="list the authorizations that apply to each port of a workload")
@click.argument("workload", metavar="WORKLOAD")
@click.option("-n", "--namespace", type=DNS_LABEL, default="default", show_default=True,
              help="the workload's namespace")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True, metavar="PORT",
              help="list this port (repeatable; default: the workload's ports, its Servers' and its probes')")
@click.option("--default-policy", type=click.Choice(POLICIES), default="all-unauthenticated", show_default=True,
              metavar="POLICY", help="the controller's --default-policy")
@click.option("--cluster-networks", type=CIDRS, default=DEFAULT_CLUSTER_NETWORKS, show_default=True,
              help="the controller's --cluster-networks")
@output_option(("table", "wide", "json"))
@resources_dir_option
@state_dir_option
def authz(workload: str, namespace: str, ports: tuple[int, ...], default_policy: str,
          cluster_networks: tuple[str, ...], output: str, resources_dir: str, state_dir: str) -> int:
    """List who may call each port of WORKLOAD (a registered workload or Workload resource, po/NAME too).

    Each row is one authorization: ROUTE is * for those of the whole server, else the route they
    are attached to; SERVER the Server selecting the port or default:POLICY; AUTHORIZATION the
    AuthorizationPolicy, ServerAuthorization or default that admits clients. A port whose policy
    admits nobody shows (none: denied). Read from --resources-dir and --state-dir, as the
    destination controller reads them (no controller needs to run); pass the controller's
    --default-policy and --cluster-networks if it was started with others.
    """
    from tether.control.destination import translate as tr
    from tether.control.destination.world import World
    from tether.core.resources import KINDS
    from tether.core.resources.core import Workload
    from tether.platform.local.store import LocalStore

    _, _, name = workload.rpartition("/")
    if not name:
        raise CliError(f"WORKLOAD {workload!r}: want NAME or po/NAME")
    store = LocalStore(resources_dir, state_dir)
    world = World()
    for kind in KINDS:
        world = world.replace(kind, {r.key: r for r in store.list(kind)})
    w = world.get("Workload", namespace, name)
    if not isinstance(w, Workload):
        raise CliError(f"WORKLOAD {workload!r}: no workload {namespace}/{name} in {resources_dir} or {state_dir}")
    settings = tr.Settings(default_policy=default_policy, cluster_networks=cluster_networks)
    chosen = sorted(set(ports)) or _ports(world, w)
    if not chosen:
        raise CliError(f"workload {namespace}/{name} declares no ports and no Server selects one: pass --port")
    ref = json.dumps({"ns": namespace, "pod": name})
    rows: list[dict[str, Any]] = []
    for port in chosen:
        rows += rows_for(tr.inbound_server(world, ref, port, settings), port)
    emit(rows, COLUMNS, output)
    return 0
