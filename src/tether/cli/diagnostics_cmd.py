"""``tether diagnostics endpoints|profile|policy``: what the destination service serves, as Linkerd's show it.

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
from tether.cli.params import ADDRESS, DNS_LABEL, POSITIVE_DURATION

DEFAULT_ADDR = "127.0.0.1:8086"


@click.group("diagnostics", short_help="inspect what the control plane serves (endpoints, profile, policy)")
def diagnostics() -> None:
    """Ask the destination service what it serves, as a proxy would, and print the first answer.

    The answers are those of `tether controller destination`: the endpoints of an authority, its
    service profile, and the inbound policy of a pod's port or the outbound policy of a service's.
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
