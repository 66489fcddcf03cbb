"""``tether diagnostics endpoints|profile|policy``: what the destination service serves, as Linkerd's show it;
``proxy-metrics`` and ``controller-metrics``: the local mesh's proxies' and controllers' metrics.

Each subcommand reads the first message of its stream (the snapshot) from ``--destination-addr``
and exits.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import Column, dump, emit, output_option, render_table
from tether.cli.params import ADDRESS, DNS_LABEL, POSITIVE_DURATION, state_dir_option

DEFAULT_ADDR = "127.0.0.1:8086"


@click.group("diagnostics",
             short_help="inspect what the control plane serves, and the proxies' and controllers' metrics")
def diagnostics() -> None:
    """Ask the destination service what it serves, as a proxy would, and print the first answer.

    The answers are those of `tether controller destination`: the endpoints of an authority, its
    service profile, and the inbound policy of a pod's port or the outbound policy of a service's.
    proxy-metrics and controller-metrics print what Prometheus would scrape from the local mesh's
    proxies and control-plane components.

    On Kubernetes the destination service answers operators in plaintext on its pod's loopback,
    port 8087: `kubectl port-forward -n linkerd deploy/linkerd-destination 8086:8087`, then these
    commands with the default --destination-addr.
    """


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--timeout", type=POSITIVE_DURATION, default="10s", show_default=True,
                     help="how long to wait for the answer")(f)
    f = click.option("--destination-addr", type=ADDRESS, default=DEFAULT_ADDR, show_default=True,
                     envvar="TETHER_DESTINATION_ADDR", show_envvar=True,
                     help="the destination service's gRPC address")(f)
    return f


def _caller_namespace(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-n", "--namespace", type=DNS_LABEL,
                        help="the caller's namespace, for short names such as web:80")(f)


def _target(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _first(call: Any, what: str, addr: str) -> Any:
    """The first message of a server stream; its failure as one line (exit 1)."""
    import grpc

    try:
        return next(iter(call))
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise OperationFailed(
                f"cannot reach the destination service at {addr} (--destination-addr): {e.details()}"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise OperationFailed(f"{what}: no answer from {addr} within --timeout") from None
        raise OperationFailed(f"{what}: {code.name}: {e.details()}") from None
    except StopIteration:
        raise OperationFailed(f"{what}: the destination service ended the stream without an answer") from None
    finally:
        call.cancel()


def _context(ns: str | None) -> str:
    return json.dumps({"ns": ns}) if ns else ""


def _ip_port(addr: Any) -> tuple[str, int]:
    ip = addr.ip
    if ip.WhichOneof("ip") == "ipv6":
        return str(ipaddress.IPv6Address((ip.ipv6.first << 64) | ip.ipv6.last)), addr.port
    return str(ipaddress.IPv4Address(ip.ipv4)), addr.port


def _to_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


ENDPOINT_COLUMNS = [
    Column("namespace", lambda r: r["namespace"]),
    Column("ip", lambda r: r["ip"]),
    Column("port", lambda r: r["port"]),
    Column("pod", lambda r: r["pod"]),
    Column("service", lambda r: r["service"]),
]


@diagnostics.command("endpoints", short_help="the endpoints of one or more authorities (host:port)")
@click.argument("authorities", nargs=-1, required=True, metavar="AUTHORITY...")
@_caller_namespace
@output_option(("table", "json", "yaml"))
@_common
def endpoints(authorities: tuple[str, ...], namespace: str | None, output: str,
              destination_addr: tuple[str, int], timeout: float) -> int:
    """The endpoints the destination service gives a proxy for each AUTHORITY (host:port).

    An AUTHORITY is a service name (web.ns.svc.cluster.local:80, or a short form such as web:80
    with -n) or a service IP:port. JSON and YAML print a list, one object per endpoint: authority,
    namespace, ip, port, pod, service, weight, identity, protocolHint, labels. An authority with
    no endpoints is named on stderr; exit 1 when none has any.
    """
    import grpc

    from tether.api.gen import destination_pb2, destination_pb2_grpc

    target = _target(destination_addr)
    rows: list[dict[str, Any]] = []
    missing = []
    with grpc.insecure_channel(target) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        for authority in authorities:
            req = destination_pb2.GetDestination(scheme="k8s", path=authority, context_token=_context(namespace))
            update = _first(stub.Get(req, timeout=timeout), f"endpoints {authority}", target)
            if update.WhichOneof("update") != "add":
                missing.append(authority)
                continue
            set_labels = dict(update.add.metric_labels)
            for a in update.add.addrs:
                ip, port = _ip_port(a.addr)
                labels = {**set_labels, **dict(a.metric_labels)}
                rows.append({
                    "authority": authority,
                    "namespace": labels.get("namespace", ""),
                    "ip": ip,
                    "port": port,
                    "pod": labels.get("pod", labels.get("external_workload", "")),
                    "service": labels.get("service", ""),
                    "weight": a.weight,
                    "identity": a.tls_identity.dns_like_identity.name,
                    "protocolHint": a.protocol_hint.WhichOneof("protocol") or "",
                    "labels": labels,
                })
    if output in ("json", "yaml"):
        dump(rows, output)  # a list, as `linkerd diagnostics endpoints -o json` prints
    elif rows:
        emit(rows, ENDPOINT_COLUMNS, output)
    for authority in missing:
        click.echo(f"No endpoints found for {authority}", err=True)
    return 1 if missing and not rows else 0


@diagnostics.command("profile", short_help="the service profile of an authority (host:port)")
@click.argument("authority", metavar="AUTHORITY")
@_caller_namespace
@output_option(("json", "yaml", "table"), default="json")
@_common
def profile(authority: str, namespace: str | None, output: str, destination_addr: tuple[str, int],
            timeout: float) -> int:
    """The service profile the destination service gives a proxy for AUTHORITY (host:port).

    JSON and YAML print the DestinationProfile message as the proxy receives it (proto field
    names). The table has one row per route (name, retryable, timeout, status ranges that are
    failures), then the traffic split (SPLIT: authority=weight, ...) when there is one.
    """
    import grpc

    from tether.api.gen import destination_pb2, destination_pb2_grpc
    from tether.proxy.config import format_duration

    target = _target(destination_addr)
    with grpc.insecure_channel(target) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        req = destination_pb2.GetDestination(scheme="k8s", path=authority, context_token=_context(namespace))
        prof = _first(stub.GetProfile(req, timeout=timeout), f"profile {authority}", target)
    if output in ("json", "yaml"):
        dump(_to_dict(prof), output)
        return 0
    if not prof.routes:
        click.echo(f"No routes in the profile of {authority}", err=True)
        return 0
    table = []
    for r in prof.routes:
        timeout_text = format_duration(r.timeout.ToTimedelta().total_seconds()) if r.HasField("timeout") else ""
        classes = [
            f"{c.condition.status.min}-{c.condition.status.max}"
            for c in r.response_classes
            if c.is_failure and c.condition.WhichOneof("match") == "status"
        ]
        table.append((r.metrics_labels.get("route", ""), "yes" if r.is_retryable else "no", timeout_text, classes))
    click.echo(render_table(table, ["route", "retryable", "timeout", "failure classes"]), nl=False)
    if prof.dst_overrides:
        click.echo("SPLIT: " + ", ".join(f"{d.authority}={d.weight}" for d in prof.dst_overrides))
    return 0


INBOUND_KINDS = ("po", "pod", "pods")
OUTBOUND_KINDS = ("svc", "service", "services")


@diagnostics.command("policy", short_help="the inbound policy of a pod's port, or the outbound policy of a service's")
@click.argument("resource", metavar="po/NAME|svc/NAME")
@click.argument("port", type=click.IntRange(1, 65535), metavar="PORT")
@click.option("-n", "--namespace", type=DNS_LABEL, default="default", show_default=True,
              help="the namespace of the pod or service")
@output_option(("yaml", "json"), default="yaml")
@_common
def policy(resource: str, port: int, namespace: str, output: str, destination_addr: tuple[str, int],
           timeout: float) -> int:
    """The policy the destination service gives a proxy for a port.

    po/NAME PORT: the inbound policy of the pod (a registered workload) NAME's port (the Server
    that selects it and its authorizations), as InboundServerPolicies.WatchPort answers.
    svc/NAME PORT: the outbound policy of the service NAME's port (its routes and backends), as
    OutboundPolicies.Watch answers. Printed with proto field names.
    """
    import grpc

    from tether.api.gen import inbound_pb2, inbound_pb2_grpc, outbound_pb2, outbound_pb2_grpc

    kind, _, name = resource.partition("/")
    if not name or kind not in (*INBOUND_KINDS, *OUTBOUND_KINDS):
        raise CliError(f"{resource!r}: want po/NAME (inbound) or svc/NAME (outbound)")
    target = _target(destination_addr)
    with grpc.insecure_channel(target) as ch:
        if kind in INBOUND_KINDS:
            inbound = inbound_pb2_grpc.InboundServerPoliciesStub(ch)
            req = inbound_pb2.PortSpec(workload=json.dumps({"ns": namespace, "pod": name}), port=port)
            msg = _first(inbound.WatchPort(req, timeout=timeout), f"policy {resource}", target)
        else:
            outbound = outbound_pb2_grpc.OutboundPoliciesStub(ch)
            spec = outbound_pb2.TrafficSpec(authority=f"{name}.{namespace}.svc.cluster.local:{port}")
            msg = _first(outbound.Watch(spec, timeout=timeout), f"policy {resource}", target)
    dump(_to_dict(msg), output)
    return 0


# --- metrics of the local mesh's proxies and controllers ----------------------------------------------


def _fetch_metrics(admin: str, timeout: float) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout) as r:
            return str(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise OperationFailed(f"cannot read http://{admin}/metrics: {getattr(e, 'reason', e)}") from None


def _local_status(state_dir: str) -> dict[str, Any]:
    from tether.platform.local.layout import Layout

    layout = Layout(state_dir)
    if not layout.settings_path.exists():
        raise OperationFailed(f"no local mesh in {layout.root} (--state-dir): run `tether up`")
    if layout.supervisor_pid() is None:
        raise OperationFailed(f"the local mesh in {layout.root} is not running (--state-dir): run `tether up`")
    return layout.read_status()


def _print_sections(sections: list[tuple[str, str, str]], timeout: float) -> None:
    """Linkerd's layout: a comment block naming each pod, then its metrics as scraped."""
    for i, (pod, container, admin) in enumerate(sections, 1):
        text = _fetch_metrics(admin, timeout)
        click.echo(f"#\n# POD {pod} ({i} of {len(sections)})\n# CONTAINER {container}\n#")
        click.echo(text, nl=not text.endswith("\n"))


@diagnostics.command("proxy-metrics", short_help="the metrics of a local pod's proxy, as Prometheus scrapes them")
@click.argument("resource", metavar="[po/]POD | deploy/NAME")
@click.option("-n", "--namespace", type=DNS_LABEL, default="default", show_default=True, help="the pod's namespace")
@click.option("--timeout", type=POSITIVE_DURATION, default="10s", show_default=True, help="how long a scrape may take")
@state_dir_option
def proxy_metrics(resource: str, namespace: str, timeout: float, state_dir: str) -> None:
    """Print the Prometheus metrics of a pod's proxy (its admin port's /metrics), or of every pod of
    a deployment, on the local mesh in --state-dir."""
    kind, _, name = resource.rpartition("/")
    if kind not in ("", "po", "pod", "pods", "deploy", "deployment"):
        raise CliError(f"RESOURCE: {resource!r} is not po/NAME, NAME or deploy/NAME")
    status = _local_status(state_dir)
    pods = [p for p in status.get("pods", []) if p.get("namespace") == namespace
            and (p.get("workload") == name if kind.startswith("deploy") else p.get("name") == name)]
    if not pods:
        raise OperationFailed(f"no pod {resource} in namespace {namespace} (tether status lists them)")
    meshed = [p for p in pods if p.get("meshed") and p.get("proxyAdmin")]
    if not meshed:
        raise OperationFailed(f"{resource} in {namespace} has no proxy (linkerd.io/inject: disabled)")
    _print_sections([(p["name"], "linkerd-proxy", p["proxyAdmin"]) for p in meshed], timeout)


@diagnostics.command("controller-metrics", short_help="the metrics of the local control plane's components")
@click.option("--component", type=click.Choice(["identity", "destination"]), default=None,
              help="only this component  [default: every one]")
@click.option("--timeout", type=POSITIVE_DURATION, default="10s", show_default=True, help="how long a scrape may take")
@state_dir_option
def controller_metrics(component: str | None, timeout: float, state_dir: str) -> None:
    """Print the Prometheus metrics of every control-plane component (each replica's admin
    port's /metrics) of the local mesh in --state-dir."""
    comps = [c for c in _local_status(state_dir).get("components", [])
             if component is None or c.get("kind") == component]
    if not comps:
        raise OperationFailed("no control-plane component runs on this host (a joined host uses the first host's)")
    _print_sections([(c["name"], c["kind"], c["adminAddr"]) for c in comps], timeout)
