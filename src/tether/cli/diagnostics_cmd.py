"""`tether diagnostics endpoints|profile|policy`: what the destination service serves, as Linkerd's show it.

    tether diagnostics endpoints AUTHORITY...          the endpoints a proxy would get (table, -o json)
    tether diagnostics profile AUTHORITY               the profile (JSON as the proxy receives it; -o table)
    tether diagnostics policy po/NAME|svc/NAME PORT    inbound (pod) or outbound (service) policy (-o yaml|json)

Each reads the first message of the stream (the snapshot) from ``--destination-addr`` and exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from typing import Any

from tether.cli.main import CliError

DEFAULT_ADDR = "127.0.0.1:8086"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diagnostics",
        help="inspect what the control plane serves (endpoints, profile, policy)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="diagnostics", metavar="COMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--destination-addr",
            default=os.environ.get("TETHER_DESTINATION_ADDR", DEFAULT_ADDR),
            help=f"the destination service (default $TETHER_DESTINATION_ADDR or {DEFAULT_ADDR})",
        )
        q.add_argument("-n", "--namespace", help="the caller's namespace, for short names such as web:80")
        q.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (10)")

    e = sub.add_parser("endpoints", help="the endpoints of one or more authorities (host:port)")
    e.add_argument("authorities", nargs="+", metavar="AUTHORITY")
    e.add_argument("-o", "--output", choices=("table", "json"), default="table")
    common(e)
    e.set_defaults(func=_endpoints)

    pr = sub.add_parser("profile", help="the service profile of an authority (host:port)")
    pr.add_argument("authority", metavar="AUTHORITY")
    pr.add_argument("-o", "--output", choices=("json", "table"), default="json")
    common(pr)
    pr.set_defaults(func=_profile)

    po = sub.add_parser("policy", help="the inbound policy of a pod's port, or the outbound policy of a service's")
    po.add_argument("resource", metavar="po/NAME|svc/NAME")
    po.add_argument("port", type=int, metavar="PORT")
    po.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    common(po)
    po.set_defaults(func=_policy)


def _first(call: Any, what: str, addr: str) -> Any:
    import grpc

    try:
        return next(iter(call))
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise CliError(
                f"cannot reach the destination service at {addr} (--destination-addr): {e.details()}"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise CliError(f"{what}: no answer from {addr} within --timeout") from None
        raise CliError(f"{what}: {code.name}: {e.details()}") from None
    except StopIteration:
        raise CliError(f"{what}: the destination service ended the stream without an answer") from None
    finally:
        call.cancel()


def _context(ns: str | None) -> str:
    return json.dumps({"ns": ns}) if ns else ""


def _ip_port(addr: Any) -> tuple[str, int]:
    ip = addr.ip
    if ip.WhichOneof("ip") == "ipv6":
        return str(ipaddress.IPv6Address((ip.ipv6.first << 64) | ip.ipv6.last)), addr.port
    return str(ipaddress.IPv4Address(ip.ipv4)), addr.port


def _endpoints(args: argparse.Namespace) -> int:
    import grpc

    from tether.api.gen import destination_pb2, destination_pb2_grpc

    rows: list[dict[str, Any]] = []
    missing = []
    with grpc.insecure_channel(args.destination_addr) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        for authority in args.authorities:
            req = destination_pb2.GetDestination(scheme="k8s", path=authority, context_token=_context(args.namespace))
            update = _first(stub.Get(req, timeout=args.timeout), f"endpoints {authority}", args.destination_addr)
            if update.WhichOneof("update") != "add":
                missing.append(authority)
                continue
            set_labels = dict(update.add.metric_labels)
            for a in update.add.addrs:
                ip, port = _ip_port(a.addr)
                labels = {**set_labels, **dict(a.metric_labels)}
                rows.append(
                    {
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
                    }
                )
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    elif rows:
        table = [("NAMESPACE", "IP", "PORT", "POD", "SERVICE")]
        table += [(r["namespace"], r["ip"], str(r["port"]), r["pod"], r["service"]) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(5)]
        for row in table:
            print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for authority in missing:
        print(f"No endpoints found for {authority}", file=sys.stderr)
    return 1 if missing and not rows else 0


def _to_dict(msg: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _profile(args: argparse.Namespace) -> int:
    import grpc

    from tether.api.gen import destination_pb2, destination_pb2_grpc

    with grpc.insecure_channel(args.destination_addr) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        req = destination_pb2.GetDestination(scheme="k8s", path=args.authority, context_token=_context(args.namespace))
        prof = _first(stub.GetProfile(req, timeout=args.timeout), f"profile {args.authority}", args.destination_addr)
    if args.output == "json":
        print(json.dumps(_to_dict(prof), indent=2))
        return 0
    if not prof.routes:
        print(f"No routes in the profile of {args.authority}", file=sys.stderr)
        return 0
    table = [("ROUTE", "RETRYABLE", "TIMEOUT", "FAILURE CLASSES")]
    for r in prof.routes:
        timeout = f"{r.timeout.ToTimedelta().total_seconds():g}s" if r.HasField("timeout") else "-"
        classes = ",".join(
            f"{c.condition.status.min}-{c.condition.status.max}"
            for c in r.response_classes
            if c.is_failure and c.condition.WhichOneof("match") == "status"
        )
        table.append((r.metrics_labels.get("route", ""), "yes" if r.is_retryable else "no", timeout, classes or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if prof.dst_overrides:
        print("SPLIT: " + ", ".join(f"{d.authority}={d.weight}" for d in prof.dst_overrides))
    return 0


def _policy(args: argparse.Namespace) -> int:
    import grpc
    import yaml

    from tether.api.gen import inbound_pb2, inbound_pb2_grpc, outbound_pb2, outbound_pb2_grpc

    kind, _, name = args.resource.partition("/")
    if not name or kind not in ("po", "pod", "pods", "svc", "service", "services"):
        raise CliError(f"policy: {args.resource!r}: want po/NAME (inbound) or svc/NAME (outbound)")
    if not 0 < args.port < 65536:
        raise CliError(f"policy: PORT {args.port} is out of range 1-65535")
    ns = args.namespace or "default"
    with grpc.insecure_channel(args.destination_addr) as ch:
        if kind.startswith("po"):
            inbound = inbound_pb2_grpc.InboundServerPoliciesStub(ch)
            req = inbound_pb2.PortSpec(workload=json.dumps({"ns": ns, "pod": name}), port=args.port)
            msg = _first(inbound.WatchPort(req, timeout=args.timeout), f"policy {args.resource}", args.destination_addr)
        else:
            outbound = outbound_pb2_grpc.OutboundPoliciesStub(ch)
            spec = outbound_pb2.TrafficSpec(authority=f"{name}.{ns}.svc.cluster.local:{args.port}")
            msg = _first(outbound.Watch(spec, timeout=args.timeout), f"policy {args.resource}", args.destination_addr)
    doc = _to_dict(msg)
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0
