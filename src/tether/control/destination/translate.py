"""Resources to linkerd2-proxy-api messages: endpoints, profiles, outbound and inbound policies.

Pure functions of a :class:`World` snapshot (no I/O, no gRPC): the gRPC adapter calls them on every
change and sends what differs. Defaults are Linkerd's: endpoint weight 10000, retry budget 0.2 /
10 per second / 10 s, P2C with peak-EWMA (default RTT 30 ms, decay 10 s), queue 100 with a 3 s
fail-fast, detection timeout 10 s, failure accrual 7 consecutive failures with 1 s to 60 s backoff.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from tether.api.gen import (
    destination_pb2 as dst,
)
from tether.api.gen import (
    grpc_route_pb2,
    http_route_pb2,
    http_types_pb2,
    meta_pb2,
    net_pb2,
    opaque_route_pb2,
)
from tether.api.gen import (
    inbound_pb2 as inb,
)
from tether.api.gen import (
    outbound_pb2 as out,
)
from tether.control.destination.world import (
    DEFAULT_CLUSTER_DOMAIN,
    Context,
    LookupError_,
    Target,
    World,
    annotation,
    opaque_ports,
    ports_annotation,
    resolve,
    selected,
    service_fqdn,
    target_port,
    workload_ips,
)
from tether.core.identity.names import IdentityNameError, WorkloadIdentity
from tether.core.releases import FIRST_DOWNGRADING_H2, FIRST_PROTOBUF_TRANSPORT_HEADER, before
from tether.core.resources import Resource, parse_duration, parse_quantity
from tether.core.resources import policy as pol
from tether.core.resources import profile as prof
from tether.core.resources import route as rt
from tether.core.resources.core import ExternalWorkload, Service, Workload
from tether.core.resources.split import TrafficSplit

ENDPOINT_WEIGHT = 10_000
INBOUND_PROXY_PORT = 4143
DETECT_TIMEOUT = 10.0
QUEUE_CAPACITY = 100
FAILFAST_TIMEOUT = 3.0
EWMA_DEFAULT_RTT = 0.030
EWMA_DECAY = 10.0
RETRY_MAX_REQUEST_BYTES = 64 * 1024
ALL_NETWORKS = ("0.0.0.0/0", "::/0")
DEFAULT_CLUSTER_NETWORKS = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8")
GRPC_RETRY_CODES = {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}


@dataclass(frozen=True, slots=True)
class Settings:
    """The control plane's own settings that shape answers."""

    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    trust_domain: str = "cluster.local"
    control_plane_ns: str = "linkerd"
    default_policy: str = "all-unauthenticated"
    cluster_networks: tuple[str, ...] = DEFAULT_CLUSTER_NETWORKS
    allow_l5d_request_headers: bool = False  # clients may amend retries/timeouts with l5d-* headers
    # Where the kubelet's probes come from (Linkerd's policy controller --probe-networks; its chart
    # default is every network).
    probe_networks: tuple[str, ...] = ALL_NETWORKS
    # EgressNetworks here apply to clients of every namespace without one of their own (Linkerd's
    # policy controller --global-egress-network-namespace).
    global_egress_ns: str = "linkerd-egress"


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def ip_address(text: str) -> net_pb2.IPAddress:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return net_pb2.IPAddress(ipv4=int(ip))
    v = int(ip)
    return net_pb2.IPAddress(ipv6=net_pb2.IPv6(first=v >> 64, last=v & ((1 << 64) - 1)))


def tcp_address(ip: str, port: int) -> net_pb2.TcpAddress:
    return net_pb2.TcpAddress(ip=ip_address(ip), port=port)


def format_tcp_address(a: net_pb2.TcpAddress) -> str:
    """ "ip:port" (or "[v6]:port") of a TcpAddress."""
    if a.ip.WhichOneof("ip") == "ipv6":
        v = (a.ip.ipv6.first << 64) | a.ip.ipv6.last
        return f"[{ipaddress.IPv6Address(v)}]:{a.port}"
    return f"{ipaddress.IPv4Address(a.ip.ipv4)}:{a.port}"


def ip_network(cidr: str) -> net_pb2.IPNetwork:
    n = ipaddress.ip_network(cidr, strict=False)
    return net_pb2.IPNetwork(ip=ip_address(str(n.network_address)), prefix_len=n.prefixlen)


def resource_meta(r: Resource, section: str = "", port: int = 0) -> meta_pb2.Metadata:
    # Kubernetes' core API group is "" in apiVersion, but the proxy API names it "core" (Linkerd's
    # policy controller does; Linkerd's proxy refuses a resource whose group is empty).
    return meta_pb2.Metadata(
        resource=meta_pb2.Resource(
            group=r.GROUP or "core", kind=r.KIND, name=r.name, namespace=r.namespace, section=section, port=port
        )
    )


def default_meta(name: str) -> meta_pb2.Metadata:
    return meta_pb2.Metadata(default=name)


# --- endpoints -----------------------------------------------------------------------------------


def identity_of(w: Workload | ExternalWorkload, s: Settings) -> str | None:
    if isinstance(w, ExternalWorkload):
        return w.spec.mesh_tls.identity
    if not w.spec.meshed:
        return None  # no proxy to terminate mTLS: clients connect in plain text
    try:
        return WorkloadIdentity(w.spec.service_account, w.namespace, s.control_plane_ns, s.trust_domain).dns_name
    except IdentityNameError:
        return None


# Endpoint messages by (workload object, ip, port, opaque, settings): a workload that did not change
# keeps its message across worlds, so a change to one endpoint rebuilds one message, not all of them.
_ADDR_CACHE: dict[tuple[int, str, int, bool, int], tuple[Resource, dst.WeightedAddr]] = {}
_ADDR_CACHE_LIMIT = 200_000


def downgrades_h2(w: Workload | ExternalWorkload) -> bool:
    """Whether the endpoint's proxy takes HTTP/1 requests that a client proxy carried over HTTP/2
    (the H2 protocol hint: a client proxy then sends them so). Every Linkerd proxy and tether's from
    0.2.0 do; an older tether proxy, named by the pod's ``linkerd.io/proxy-version``, would pass the
    HTTP/2 on to an HTTP/1 application. Without the annotation (local workloads run this release's
    proxy), and for an external workload's proxy, it does."""
    if not isinstance(w, Workload):
        return True
    return not before(w.metadata.annotations.get("linkerd.io/proxy-version", ""), FIRST_DOWNGRADING_H2)


def legacy_transport_header(w: Workload | ExternalWorkload) -> bool:
    """Whether the endpoint's proxy is a tether release before Linkerd's transport header (by the
    pod's ``linkerd.io/proxy-version``; see :func:`downgrades_h2`)."""
    if not isinstance(w, Workload):
        return False
    return before(w.metadata.annotations.get("linkerd.io/proxy-version", ""), FIRST_PROTOBUF_TRANSPORT_HEADER)


def weighted_addr(
    w: Workload | ExternalWorkload, ip: str, port: int, s: Settings, *, opaque: bool, world: World
) -> dst.WeightedAddr:
    """The endpoint message of one workload address (cached while the workload object is unchanged)."""
    key = (id(w), ip, port, opaque, id(s))
    hit = _ADDR_CACHE.get(key)
    if hit is not None and hit[0] is w:
        return hit[1]
    if len(_ADDR_CACHE) >= _ADDR_CACHE_LIMIT:
        _ADDR_CACHE.clear()
    addr = _weighted_addr(w, ip, port, s, opaque=opaque)
    _ADDR_CACHE[key] = (w, addr)
    return addr


def _weighted_addr(
    w: Workload | ExternalWorkload, ip: str, port: int, s: Settings, *, opaque: bool
) -> dst.WeightedAddr:
    labels = {"pod": w.name} if isinstance(w, Workload) else {"external_workload": w.name}
    if isinstance(w, Workload):
        labels["serviceaccount"] = w.spec.service_account
        for key in ("app", "version", "pod-template-hash"):
            if key in w.metadata.labels:
                labels[key.replace("-", "_")] = w.metadata.labels[key]
        if "linkerd.io/proxy-deployment" in w.metadata.labels:  # Linkerd: from the pod's owner
            labels["deployment"] = w.metadata.labels["linkerd.io/proxy-deployment"]
    addr = dst.WeightedAddr(addr=tcp_address(ip, port), weight=ENDPOINT_WEIGHT, metric_labels=labels)
    ident = identity_of(w, s)
    if ident is not None:
        server_name = w.spec.mesh_tls.server_name if isinstance(w, ExternalWorkload) else ident
        addr.tls_identity.CopyFrom(
            dst.TlsIdentity(
                dns_like_identity=dst.TlsIdentity.DnsLikeIdentity(name=ident),
                server_name=dst.TlsIdentity.DnsLikeIdentity(name=server_name),
            )
        )
        inbound = w.spec.proxy_inbound_port if isinstance(w, Workload) else None
        if opaque:
            hint = dst.ProtocolHint(opaque=dst.ProtocolHint.Opaque())
            hint.opaque_transport.inbound_port = inbound or INBOUND_PROXY_PORT
            if legacy_transport_header(w):
                hint.opaque_transport.tether_legacy_transport_header = True
            addr.protocol_hint.CopyFrom(hint)
        elif downgrades_h2(w):
            addr.protocol_hint.CopyFrom(dst.ProtocolHint(h2=dst.ProtocolHint.H2()))
    addr.resource_ref.CopyFrom(resource_meta(w))
    return addr


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """The endpoints of a target: "ip:port" -> WeightedAddr, plus the set-level labels."""

    addrs: dict[str, dst.WeightedAddr]
    labels: dict[str, str]
    exists: bool


def endpoints(world: World, target: Target, s: Settings) -> EndpointSet:
    """Every endpoint of a resolved target."""
    if target.workload is not None and target.address is not None:
        w = target.workload
        a = weighted_addr(w, target.address, target.port, s, opaque=target.port in opaque_ports(world, w), world=world)
        return EndpointSet({f"{target.address}:{target.port}": a}, {"namespace": w.namespace}, True)
    svc = target.service
    assert svc is not None
    labels = {"namespace": svc.namespace, "service": svc.name}
    if target.service_port is None:
        return EndpointSet({}, labels, True)
    opaque = target.service_port.port in opaque_ports(world, svc)
    addrs: dict[str, dst.WeightedAddr] = {}
    for w in selected(world, svc):
        port = target_port(w, target.service_port)
        if port is None:
            continue
        # Opaque on the Service's port, or on the pod's own port (its annotation, or its
        # namespace's): its proxy is then reached at its inbound port with a transport header, as
        # Linkerd's destination hints it per pod.
        opaque_here = opaque or port in opaque_ports(world, w)
        for ip in workload_ips(w):
            addrs[f"{ip}:{port}"] = weighted_addr(w, ip, port, s, opaque=opaque_here, world=world)
    return EndpointSet(addrs, labels, True)


def endpoint_updates(before: EndpointSet | None, after: EndpointSet) -> list[dst.Update]:
    """The Update messages that turn ``before`` (None: nothing sent yet) into ``after``."""
    if not after.addrs:
        if before is None or before.addrs:
            return [dst.Update(no_endpoints=dst.NoEndpoints(exists=after.exists))]
        return []
    old = before.addrs if before is not None else {}
    updates: list[dst.Update] = []
    gone = [k for k in old if k not in after.addrs]
    if gone:
        updates.append(dst.Update(remove=dst.AddrSet(addrs=[old[k].addr for k in sorted(gone)])))
    changed = [k for k in sorted(after.addrs) if old.get(k) != after.addrs[k]]
    if changed:
        updates.append(
            dst.Update(add=dst.WeightedAddrSet(addrs=[after.addrs[k] for k in changed], metric_labels=after.labels))
        )
    return updates


# --- profiles ------------------------------------------------------------------------------------


def _method(m: str) -> http_types_pb2.HttpMethod:
    up = m.upper()
    if up in http_types_pb2.HttpMethod.Registered.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
        return http_types_pb2.HttpMethod(registered=http_types_pb2.HttpMethod.Registered.Value(up))
    return http_types_pb2.HttpMethod(unregistered=m)


def request_match(c: prof.RequestMatch) -> dst.RequestMatch:
    parts: list[dst.RequestMatch] = []
    if c.path_regex is not None:
        parts.append(dst.RequestMatch(path=dst.PathMatch(regex=c.path_regex)))
    if c.method is not None:
        parts.append(dst.RequestMatch(method=_method(c.method)))
    if c.all is not None:
        parts.append(dst.RequestMatch(all=dst.RequestMatch.Seq(matches=[request_match(x) for x in c.all])))
    if c.any is not None:
        parts.append(dst.RequestMatch(any=dst.RequestMatch.Seq(matches=[request_match(x) for x in c.any])))
    if c.not_ is not None:
        parts.append(dst.RequestMatch(**{"not": request_match(c.not_)}))
    return parts[0] if len(parts) == 1 else dst.RequestMatch(all=dst.RequestMatch.Seq(matches=parts))


def response_match(c: prof.ResponseMatch) -> dst.ResponseMatch:
    parts: list[dst.ResponseMatch] = []
    if c.status is not None:
        lo = c.status.min or 100
        hi = c.status.max or 599
        parts.append(dst.ResponseMatch(status=dst.HttpStatusRange(min=lo, max=hi)))
    if c.all is not None:
        parts.append(dst.ResponseMatch(all=dst.ResponseMatch.Seq(matches=[response_match(x) for x in c.all])))
    if c.any is not None:
        parts.append(dst.ResponseMatch(any=dst.ResponseMatch.Seq(matches=[response_match(x) for x in c.any])))
    if c.not_ is not None:
        parts.append(dst.ResponseMatch(**{"not": response_match(c.not_)}))
    return parts[0] if len(parts) == 1 else dst.ResponseMatch(all=dst.ResponseMatch.Seq(matches=parts))


def profile_route(r: prof.Route) -> dst.Route:
    out_route = dst.Route(
        condition=request_match(r.condition),
        response_classes=[
            dst.ResponseClass(condition=response_match(c.condition), is_failure=c.is_failure)
            for c in r.response_classes
        ],
        metrics_labels={"route": r.name},
        is_retryable=r.retryable,
    )
    if r.timeout is not None:
        out_route.timeout.CopyFrom(duration(parse_duration(r.timeout)))
    if r.retries is not None:
        out_route.tether_max_retries = r.retries.limit
        if r.retries.timeout is not None:
            out_route.tether_retry_timeout.CopyFrom(duration(parse_duration(r.retries.timeout)))
    return out_route


def find_profile(world: World, target: Target, ctx: Context, s: Settings) -> prof.ServiceProfile | None:
    """The ServiceProfile for a service: the caller's namespace's copy first, then the service's own."""
    svc = target.service
    if svc is None:
        return None
    name = service_fqdn(svc, s.cluster_domain)
    for ns in [n for n in (ctx.namespace, svc.namespace) if n]:
        sp = world.get("ServiceProfile", ns, name)
        if isinstance(sp, prof.ServiceProfile):
            return sp
    return None


def find_split(world: World, svc: Service) -> TrafficSplit | None:
    for r in world.in_namespace("TrafficSplit", svc.namespace):
        assert isinstance(r, TrafficSplit)
        root = r.spec.service
        if root in (svc.name, f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc"):
            return r
    return None


def _split_authority(world: World, ns: str, service: str, port: int, s: Settings) -> str:
    host = service if "." in service else f"{service}.{ns}.svc.{s.cluster_domain}"
    return f"{host}:{port}"


def profile(world: World, authority: str, ctx: Context, s: Settings) -> dst.DestinationProfile:
    """The profile for an authority (an empty one, retry budget included, when nothing applies)."""
    out_profile = dst.DestinationProfile()
    try:
        target = resolve(world, authority, ctx, s.cluster_domain)
    except LookupError_:
        return out_profile
    if target.workload is not None and target.address is not None:
        es = endpoints(world, target, s)
        out_profile.endpoint.CopyFrom(next(iter(es.addrs.values())))
        out_profile.opaque_protocol = target.port in opaque_ports(world, target.workload)
        return out_profile
    svc = target.service
    assert svc is not None
    out_profile.fully_qualified_name = service_fqdn(svc, s.cluster_domain)
    out_profile.opaque_protocol = target.port in opaque_ports(world, svc)
    out_profile.parent_ref.CopyFrom(resource_meta(svc, port=target.port))
    sp = find_profile(world, target, ctx, s)
    budget = dst.RetryBudget(retry_ratio=0.2, min_retries_per_second=10, ttl=duration(10.0))
    if sp is not None:
        out_profile.profile_ref.CopyFrom(resource_meta(sp))
        out_profile.routes.extend(profile_route(r) for r in sp.spec.routes)
        if sp.spec.retry_budget is not None:
            b = sp.spec.retry_budget
            budget = dst.RetryBudget(
                retry_ratio=b.retry_ratio,
                min_retries_per_second=b.min_retries_per_second,
                ttl=duration(parse_duration(b.ttl)),
            )
        for o in sp.spec.dst_overrides:
            out_profile.dst_overrides.append(dst.WeightedDst(authority=o.authority, weight=_milli(o.weight)))
    out_profile.retry_budget.CopyFrom(budget)
    split = find_split(world, svc)
    if split is not None:
        # A TrafficSplit replaces the profile's own overrides, as with linkerd-smi.
        del out_profile.dst_overrides[:]
        for sb in split.spec.backends:
            backend_svc = world.get("Service", svc.namespace, sb.service)
            ref = resource_meta(backend_svc, port=target.port) if backend_svc is not None else None
            wd = dst.WeightedDst(
                authority=_split_authority(world, svc.namespace, sb.service, target.port, s), weight=_milli(sb.weight)
            )
            if ref is not None:
                wd.backend_ref.CopyFrom(ref)
            out_profile.dst_overrides.append(wd)
    return out_profile


def _milli(q: int | float | str) -> int:
    return round(parse_quantity(q) * 1000)


# --- outbound policy -----------------------------------------------------------------------------


def _status_ranges(spec: str) -> list[tuple[int, int]] | None:
    """retry.linkerd.io/http: "5xx", "gateway-error", "500-504,429"; None when malformed."""
    ranges: list[tuple[int, int]] = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part == "5xx":
            ranges.append((500, 599))
        elif part == "gateway-error":
            ranges.append((502, 504))
        else:
            lo, _, hi = part.partition("-")
            try:
                a, b = int(lo), int(hi or lo)
            except ValueError:
                return None
            if not (100 <= a <= b <= 599):
                return None
            ranges.append((a, b))
    return ranges


def _ann(objs: Sequence[Resource], key: str) -> str | None:
    """The first object (most specific first) carrying annotation ``key``."""
    for o in objs:
        if key in o.metadata.annotations:
            return o.metadata.annotations[key]
    return None


def _timeouts(objs: Sequence[Resource], base: http_route_pb2.Timeouts | None = None) -> http_route_pb2.Timeouts | None:
    t = http_route_pb2.Timeouts()
    if base is not None:
        t.CopyFrom(base)
    any_set = base is not None
    for field in ("request", "response", "idle"):
        v = _ann(objs, f"timeout.linkerd.io/{field}")
        if v is not None:
            try:
                getattr(t, field).CopyFrom(duration(parse_duration(v)))
                any_set = True
            except ValueError:
                continue
    return t if any_set else None


def _backoff() -> out.ExponentialBackoff:
    return out.ExponentialBackoff(min_backoff=duration(0.025), max_backoff=duration(0.25), jitter_ratio=1.0)


def _http_retry(objs: Sequence[Resource]) -> out.HttpRoute.Retry | None:
    spec = _ann(objs, "retry.linkerd.io/http")
    if spec is None:
        return None
    ranges = _status_ranges(spec)
    if ranges is None:
        return None
    retry = out.HttpRoute.Retry(
        max_retries=_int(_ann(objs, "retry.linkerd.io/limit"), 1),
        max_request_bytes=RETRY_MAX_REQUEST_BYTES,
        conditions=out.HttpRoute.Retry.Conditions(
            status_ranges=[out.HttpRoute.Retry.Conditions.StatusRange(start=a, end=b) for a, b in ranges]
        ),
        backoff=_backoff(),
    )
    t = _ann(objs, "retry.linkerd.io/timeout")
    if t is not None:
        try:
            retry.timeout.CopyFrom(duration(parse_duration(t)))
        except ValueError:
            pass
    return retry


def _grpc_retry(objs: Sequence[Resource]) -> out.GrpcRoute.Retry | None:
    spec = _ann(objs, "retry.linkerd.io/grpc")
    if spec is None:
        return None
    codes = {c.strip().lower() for c in spec.split(",") if c.strip()}
    if not codes <= GRPC_RETRY_CODES:
        return None
    cond = out.GrpcRoute.Retry.Conditions(
        cancelled="cancelled" in codes,
        deadine_exceeded="deadline-exceeded" in codes,
        resource_exhausted="resource-exhausted" in codes,
        internal="internal" in codes,
        unavailable="unavailable" in codes,
    )
    retry = out.GrpcRoute.Retry(
        max_retries=_int(_ann(objs, "retry.linkerd.io/limit"), 1),
        max_request_bytes=RETRY_MAX_REQUEST_BYTES,
        conditions=cond,
        backoff=_backoff(),
    )
    t = _ann(objs, "retry.linkerd.io/timeout")
    if t is not None:
        try:
            retry.timeout.CopyFrom(duration(parse_duration(t)))
        except ValueError:
            pass
    return retry


def _int(v: str | None, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def failure_accrual(svc: Service) -> out.FailureAccrual | None:
    a = svc.metadata.annotations
    if a.get("balancer.linkerd.io/failure-accrual") != "consecutive":
        return None
    prefix = "balancer.linkerd.io/failure-accrual-consecutive-"

    def dur(key: str, default: float) -> float:
        try:
            return parse_duration(a[prefix + key]) if prefix + key in a else default
        except ValueError:
            return default

    try:
        jitter = float(a.get(prefix + "jitter-ratio", "0.5"))
    except ValueError:
        jitter = 0.5
    return out.FailureAccrual(
        consecutive_failures=out.FailureAccrual.ConsecutiveFailures(
            max_failures=_int(a.get(prefix + "max-failures"), 7),
            backoff=out.ExponentialBackoff(
                min_backoff=duration(dur("min-penalty", 1.0)),
                max_backoff=duration(dur("max-penalty", 60.0)),
                jitter_ratio=jitter,
            ),
        )
    )


def _queue() -> out.Queue:
    # Every backend carries its queue, even one that only fails: Linkerd's proxy refuses a policy
    # with a backend that has none ("missing queue").
    return out.Queue(capacity=QUEUE_CAPACITY, failfast_timeout=duration(FAILFAST_TIMEOUT))


def backend(world: World, ns: str, name: str, port: int, s: Settings) -> out.Backend:
    """A Service as a balanced backend (discovered with Destination.Get on its name)."""
    svc = world.get("Service", ns, name)
    b = out.Backend(
        balancer=out.Backend.BalanceP2c(
            discovery=out.Backend.EndpointDiscovery(
                dst=out.Backend.EndpointDiscovery.DestinationGet(path=f"{name}.{ns}.svc.{s.cluster_domain}:{port}")
            ),
            peak_ewma=out.Backend.BalanceP2c.PeakEwma(
                default_rtt=duration(EWMA_DEFAULT_RTT), decay=duration(EWMA_DECAY)
            ),
        ),
        queue=_queue(),
    )
    if svc is not None:
        b.metadata.CopyFrom(resource_meta(svc, port=port))
    else:
        b.metadata.CopyFrom(
            meta_pb2.Metadata(
                resource=meta_pb2.Resource(group="core", kind="Service", name=name, namespace=ns, port=port)
            )
        )
    return b


@dataclass(frozen=True, slots=True)
class _Parent:
    """What routes attach to: a Service (its port) or an EgressNetwork (the original destination's
    port), with the backend a rule without backendRefs uses (the Service balanced, or the original
    destination forwarded)."""

    resource: Service | pol.EgressNetwork
    port: int
    default: out.Backend
    why: str = ""  # an EgressNetwork's Deny: what the catch-all says

    @property
    def egress(self) -> bool:
        return isinstance(self.resource, pol.EgressNetwork)


def _parent_matches(ref: rt.ParentRef, route: Resource, parent: _Parent) -> bool:
    r = parent.resource
    if ref.name != r.name or (ref.namespace or route.namespace) != r.namespace:
        return False
    if ref.port is not None and ref.port != parent.port:
        return False
    if parent.egress:
        return ref.kind == "EgressNetwork" and (ref.group or "") == pol.EgressNetwork.GROUP
    return ref.is_service


def attached_routes(world: World, kind: str, parent: _Parent) -> list[Resource]:
    """Routes of ``kind`` whose parentRefs name this parent (and port), oldest name first."""
    found = []
    for r in world.of(kind).values():
        spec = r.spec  # type: ignore[attr-defined]
        if any(_parent_matches(p, r, parent) for p in spec.parent_refs):
            found.append(r)
    return sorted(found, key=lambda r: (r.namespace, r.name))


def _service_parent(world: World, svc: Service, port: int, s: Settings) -> _Parent:
    return _Parent(svc, port, backend(world, svc.namespace, svc.name, port, s))


def _header_values(hs: Iterable[rt.HeaderValue]) -> http_types_pb2.Headers:
    return http_types_pb2.Headers(
        headers=[http_types_pb2.Headers.Header(name=h.name, value=h.value.encode()) for h in hs]
    )


def _header_modifier(m: rt.HeaderModifier, cls: Any) -> Any:
    return cls(add=_header_values(m.add), set=_header_values(m.set), remove=list(m.remove))


def _http_filter(f: rt.HTTPRouteFilter) -> out.HttpRoute.Filter:
    if f.type == "RequestHeaderModifier" and f.request_header_modifier is not None:
        return out.HttpRoute.Filter(
            request_header_modifier=_header_modifier(f.request_header_modifier, http_route_pb2.RequestHeaderModifier)
        )
    if f.type == "ResponseHeaderModifier" and f.response_header_modifier is not None:
        return out.HttpRoute.Filter(
            response_header_modifier=_header_modifier(f.response_header_modifier, http_route_pb2.ResponseHeaderModifier)
        )
    r = f.request_redirect
    assert r is not None
    red = http_route_pb2.RequestRedirect(host=r.hostname or "", port=r.port or 0, status=r.status_code)
    if r.scheme is not None:
        red.scheme.CopyFrom(http_types_pb2.Scheme(registered=http_types_pb2.Scheme.Registered.Value(r.scheme.upper())))
    if r.path is not None:
        if r.path.type == "ReplaceFullPath":
            red.path.CopyFrom(http_route_pb2.PathModifier(full=r.path.replace_full_path or ""))
        else:
            red.path.CopyFrom(http_route_pb2.PathModifier(prefix=r.path.replace_prefix_match or ""))
    return out.HttpRoute.Filter(redirect=red)


def http_match(m: rt.HTTPRouteMatch) -> http_route_pb2.HttpRouteMatch:
    pm = http_route_pb2.HttpRouteMatch()
    path = m.path or rt.PathMatch()
    if path.type == "Exact":
        pm.path.exact = path.value
    elif path.type == "PathPrefix":
        pm.path.prefix = path.value
    else:
        pm.path.regex = path.value
    for h in m.headers:
        if h.type == "Exact":
            pm.headers.append(http_route_pb2.HeaderMatch(name=h.name, exact=h.value.encode()))
        else:
            pm.headers.append(http_route_pb2.HeaderMatch(name=h.name, regex=h.value))
    for q in m.query_params:
        if q.type == "Exact":
            pm.query_params.append(http_route_pb2.QueryParamMatch(name=q.name, exact=q.value))
        else:
            pm.query_params.append(http_route_pb2.QueryParamMatch(name=q.name, regex=q.value))
    if m.method is not None:
        pm.method.CopyFrom(_method(m.method))
    return pm


def host_match(h: str) -> http_route_pb2.HostMatch:
    if h.startswith("*."):
        return http_route_pb2.HostMatch(
            suffix=http_route_pb2.HostMatch.Suffix(reverse_labels=list(reversed(h[2:].split("."))))
        )
    return http_route_pb2.HostMatch(exact=h)


def _invalid_backend(cls: Any, meta: meta_pb2.Metadata, why: str) -> Any:
    """A backendRef the control plane cannot serve: requests sent to it answer 500 naming why, as
    Linkerd's controller does (its route stays; the other backends keep their share)."""
    b = out.Backend(metadata=meta, queue=_queue())
    fail = cls.Filter(failure_injector=http_route_pb2.HttpFailureInjector(
        status=500, message=why, ratio=http_route_pb2.Ratio(numerator=1, denominator=1)))
    return cls.RouteBackend(backend=b, filters=[fail])


def _ref_target(world: World, route: Resource, ref: rt.BackendRef | rt.GRPCBackendRef | rt.TCPBackendRef,
                parent: _Parent, s: Settings, *, service_must_exist: bool = False
                ) -> out.Backend | tuple[meta_pb2.Metadata, str]:
    """What a backendRef points at: a Service (balanced) or the parent EgressNetwork itself
    (forwarded to the original destination); else the metadata and the reason it is invalid."""
    ns = ref.namespace or route.namespace
    if ref.kind == "EgressNetwork" and (ref.group or "") == pol.EgressNetwork.GROUP:
        meta = meta_pb2.Metadata(resource=meta_pb2.Resource(
            group=pol.EgressNetwork.GROUP, kind="EgressNetwork", name=ref.name, namespace=ns, port=parent.port))
        if not parent.egress:
            return meta, "EgressNetwork backends attach to EgressNetwork parents only"
        if (parent.resource.namespace, parent.resource.name) != (ns, ref.name):
            return meta, "a route with an EgressNetwork backend needs that EgressNetwork as its parent"
        b = out.Backend()
        b.CopyFrom(parent.default)
        return b
    if (ref.kind or "Service") != "Service" or (ref.group or "") not in ("", "core"):
        return meta_pb2.Metadata(default="invalid"), f"unsupported backend kind {ref.group or 'core'}/{ref.kind}"
    port = ref.port or parent.port
    if service_must_exist and world.get("Service", ns, ref.name) is None:
        return (meta_pb2.Metadata(resource=meta_pb2.Resource(group="core", kind="Service", name=ref.name,
                                                             namespace=ns, port=port)),
                f"Service not found {ns}/{ref.name}")
    return backend(world, ns, ref.name, port, s)


def _ref_backend(world: World, route: Resource, ref: rt.BackendRef | rt.GRPCBackendRef, parent: _Parent,
                 s: Settings, cls: Any) -> Any:
    target = _ref_target(world, route, ref, parent, s)
    if isinstance(target, tuple):
        return _invalid_backend(cls, *target)
    return cls.RouteBackend(backend=target)


def _distribution(
    world: World,
    route: Resource,
    refs: Sequence[rt.BackendRef] | Sequence[rt.GRPCBackendRef],
    parent: _Parent,
    s: Settings,
    cls: Any,
    backend_timeout: float | None = None,
) -> object:
    if not refs:
        b = out.Backend()
        b.CopyFrom(parent.default)
        rb = cls.RouteBackend(backend=b)
        return cls.Distribution(first_available=cls.Distribution.FirstAvailable(backends=[rb]))
    weighted = []
    for ref in refs:
        rb = _ref_backend(world, route, ref, parent, s, cls)
        if backend_timeout is not None:
            rb.requestTimeout.CopyFrom(duration(backend_timeout))
        weighted.append(cls.WeightedRouteBackend(backend=rb, weight=ref.weight))
    return cls.Distribution(random_available=cls.Distribution.RandomAvailable(backends=weighted))


def _catch_all(cls: Any, parent: _Parent, s: Settings, name: str, filters: Sequence[Any], retry: Any) -> Any:
    """A route (``cls``: out.HttpRoute or out.GrpcRoute) whose one rule takes every request to the
    parent's own backend, with the parent's timeout and retry annotations."""
    b = out.Backend()
    b.CopyFrom(parent.default)
    rule = cls.Rule(
        filters=list(filters),
        backends=cls.Distribution(first_available=cls.Distribution.FirstAvailable(backends=[cls.RouteBackend(backend=b)])),
        allow_l5d_request_headers=s.allow_l5d_request_headers,
    )
    if cls is out.HttpRoute:
        rule.matches.append(http_route_pb2.HttpRouteMatch(path=http_route_pb2.PathMatch(prefix="/")))
    t = _timeouts([parent.resource])
    if t is not None:
        rule.timeouts.CopyFrom(t)
    if retry is not None:
        rule.retry.CopyFrom(retry)
    return cls(metadata=default_meta(name), rules=[rule])


def _default_http_route(parent: _Parent, s: Settings, name: str = "http",
                        filters: Sequence[out.HttpRoute.Filter] = ()) -> out.HttpRoute:
    """The route for requests no HTTPRoute rule claims: a Service's own (when it has no routes) or an
    EgressNetwork's catch-all (``http-egress-allow`` / ``http-egress-deny``, Linkerd's names)."""
    route: out.HttpRoute = _catch_all(out.HttpRoute, parent, s, name, filters, _http_retry([parent.resource]))
    return route


def http_routes(world: World, parent: _Parent, s: Settings) -> list[out.HttpRoute]:
    """The HTTPRoutes attached to ``parent``. A Service without any gets its default route; an
    EgressNetwork's routes are followed by its catch-all, which its trafficPolicy decides."""
    routes = attached_routes(world, "HTTPRoute", parent)
    result = []
    for r in routes:
        assert isinstance(r, rt.HTTPRoute)
        objs: list[Resource] = [r, parent.resource]
        rules = []
        for rule in r.spec.rules:
            base = None
            backend_timeout = None
            if rule.timeouts is not None:
                base = http_route_pb2.Timeouts()
                if rule.timeouts.request is not None:
                    base.request.CopyFrom(duration(parse_duration(rule.timeouts.request)))
                if rule.timeouts.backend_request is not None:
                    backend_timeout = parse_duration(rule.timeouts.backend_request)
            matches = rule.matches or [rt.HTTPRouteMatch()]
            pr = out.HttpRoute.Rule(
                matches=[http_match(m) for m in matches],
                filters=[_http_filter(f) for f in rule.filters],
                backends=_distribution(  # type: ignore[arg-type]
                    world, r, rule.backend_refs, parent, s, out.HttpRoute, backend_timeout
                ),
                allow_l5d_request_headers=s.allow_l5d_request_headers,
            )
            t = _timeouts(objs, base)
            if t is not None:
                pr.timeouts.CopyFrom(t)
            retry = _http_retry(objs)
            if retry is not None:
                if backend_timeout is not None and not retry.HasField("timeout"):
                    retry.timeout.CopyFrom(duration(backend_timeout))
                pr.retry.CopyFrom(retry)
            rules.append(pr)
        result.append(
            out.HttpRoute(metadata=resource_meta(r), hosts=[host_match(h) for h in r.spec.hostnames], rules=rules)
        )
    if isinstance(parent.resource, pol.EgressNetwork):
        result.append(_egress_catch_all(parent, s))
    elif not result:
        result.append(_default_http_route(parent, s))
    return result


def _egress_catch_all(parent: _Parent, s: Settings) -> out.HttpRoute:
    egress = parent.resource
    assert isinstance(egress, pol.EgressNetwork)
    if egress.spec.traffic_policy == "Allow":
        return _default_http_route(parent, s, "http-egress-allow")
    why = parent.why or f"traffic not allowed by EgressNetwork {egress.namespace}/{egress.name}"
    deny = out.HttpRoute.Filter(failure_injector=http_route_pb2.HttpFailureInjector(
        status=403, message=why, ratio=http_route_pb2.Ratio(numerator=1, denominator=1)))
    return _default_http_route(parent, s, "http-egress-deny", [deny])


def grpc_routes(world: World, parent: _Parent, s: Settings) -> list[out.GrpcRoute]:
    result = []
    for r in attached_routes(world, "GRPCRoute", parent):
        assert isinstance(r, rt.GRPCRoute)
        objs: list[Resource] = [r, parent.resource]
        rules = []
        for rule in r.spec.rules:
            matches = []
            for m in rule.matches or [rt.GRPCRouteMatch()]:
                gm = grpc_route_pb2.GrpcRouteMatch()
                if m.method is not None:
                    gm.rpc.CopyFrom(
                        grpc_route_pb2.GrpcRpcMatch(service=m.method.service or "", method=m.method.method or "")
                    )
                for h in m.headers:
                    if h.type == "Exact":
                        gm.headers.append(http_route_pb2.HeaderMatch(name=h.name, exact=h.value.encode()))
                    else:
                        gm.headers.append(http_route_pb2.HeaderMatch(name=h.name, regex=h.value))
                matches.append(gm)
            filters = []
            for f in rule.filters:
                if f.type == "RequestHeaderModifier" and f.request_header_modifier is not None:
                    filters.append(
                        out.GrpcRoute.Filter(
                            request_header_modifier=_header_modifier(
                                f.request_header_modifier, http_route_pb2.RequestHeaderModifier
                            )
                        )
                    )
            pr = out.GrpcRoute.Rule(
                matches=matches,
                filters=filters,
                backends=_distribution(world, r, rule.backend_refs, parent, s, out.GrpcRoute),  # type: ignore[arg-type]
                allow_l5d_request_headers=s.allow_l5d_request_headers,
            )
            t = _timeouts(objs)
            if t is not None:
                pr.timeouts.CopyFrom(t)
            retry = _grpc_retry(objs)
            if retry is not None:
                pr.retry.CopyFrom(retry)
            rules.append(pr)
        result.append(
            out.GrpcRoute(metadata=resource_meta(r), hosts=[host_match(h) for h in r.spec.hostnames], rules=rules)
        )
    return result


def _opaque_route(world: World, svc: Service, port: int, s: Settings) -> out.OpaqueRoute:
    tcp = _tcp_route(world, _service_parent(world, svc, port, s), s)
    if tcp is not None:
        return tcp
    rb = out.OpaqueRoute.RouteBackend(backend=backend(world, svc.namespace, svc.name, port, s))
    return out.OpaqueRoute(
        metadata=default_meta("opaq"),
        rules=[
            out.OpaqueRoute.Rule(
                backends=out.OpaqueRoute.Distribution(
                    first_available=out.OpaqueRoute.Distribution.FirstAvailable(backends=[rb])
                )
            )
        ],
    )


def _tcp_backend(world: World, route: Resource, ref: rt.TCPBackendRef, parent: _Parent,
                 s: Settings) -> out.OpaqueRoute.RouteBackend:
    """A TCPRoute backendRef: a Service (balanced), the parent EgressNetwork itself (forwarded to
    the original destination), or an invalid backend whose connections are refused saying why."""
    target = _ref_target(world, route, ref, parent, s, service_must_exist=True)
    if isinstance(target, tuple):
        meta, why = target
        return out.OpaqueRoute.RouteBackend(
            backend=out.Backend(metadata=meta, queue=_queue()),
            filters=[out.OpaqueRoute.Filter(invalid=opaque_route_pb2.Invalid(message=why))],
        )
    return out.OpaqueRoute.RouteBackend(backend=target)


def _tcp_route(world: World, parent: _Parent, s: Settings) -> out.OpaqueRoute | None:
    """The TCPRoute that decides a parent's opaque traffic: the first attached (a TCPRoute has no
    matches, so Linkerd serves only one), its rules' backends weighted."""
    routes = attached_routes(world, "TCPRoute", parent)
    if not routes:
        return None
    r = routes[0]
    assert isinstance(r, rt.TCPRoute)
    rules = []
    for rule in r.spec.rules:
        weighted = [out.OpaqueRoute.WeightedRouteBackend(backend=_tcp_backend(world, r, ref, parent, s),
                                                         weight=ref.weight) for ref in rule.backend_refs]
        rules.append(out.OpaqueRoute.Rule(backends=out.OpaqueRoute.Distribution(
            random_available=out.OpaqueRoute.Distribution.RandomAvailable(backends=weighted))))
    return out.OpaqueRoute(metadata=resource_meta(r), rules=rules)


def outbound_policy(
    world: World, authority: str | None, addr: str | None, ctx: Context, s: Settings
) -> out.OutboundPolicy:
    """The policy for a target.

    A Service (by name or cluster IP) gets its routes. An IP:port that is no Service (a workload's own
    address, or anything outside the mesh) gets a forwarding policy to that address, under the
    EgressNetwork whose networks contain it when there is one; an unknown *name* is a LookupError_.
    """
    if authority is None and addr is not None:
        try:
            target = resolve(world, addr, ctx, s.cluster_domain)
        except LookupError_:
            return forward_policy(world, addr, None, ctx, s)
        if target.service is None:
            return forward_policy(world, addr, target, ctx, s)
    else:
        target = resolve(world, authority or "", ctx, s.cluster_domain)
        if target.service is None:
            raise LookupError_(f"{authority} is a workload address, not a Service: look it up by addr")
    svc = target.service
    assert svc is not None
    port = target.port
    policy = out.OutboundPolicy(metadata=resource_meta(svc, port=port))
    opaque = port in opaque_ports(world, svc)
    accrual = failure_accrual(svc)
    if opaque:
        policy.protocol.opaque.routes.append(_opaque_route(world, svc, port, s))
        return policy
    parent = _service_parent(world, svc, port, s)
    grpc = grpc_routes(world, parent, s)
    if grpc:
        g = out.ProxyProtocol.Grpc(routes=grpc)
        if accrual is not None:
            g.failure_accrual.CopyFrom(accrual)
        policy.protocol.grpc.CopyFrom(g)
        return policy
    routes = http_routes(world, parent, s)
    h1 = out.ProxyProtocol.Http1(routes=routes)
    h2 = out.ProxyProtocol.Http2(routes=routes)
    if accrual is not None:
        h1.failure_accrual.CopyFrom(accrual)
        h2.failure_accrual.CopyFrom(accrual)
    policy.protocol.detect.CopyFrom(
        out.ProxyProtocol.Detect(
            timeout=duration(DETECT_TIMEOUT),
            opaque=out.ProxyProtocol.Opaque(routes=[_opaque_route(world, svc, port, s)]),
            http1=h1,
            http2=h2,
        )
    )
    return policy


def _egress_networks(e: pol.EgressNetwork, s: Settings) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                                                      list[str]]]:
    if e.spec.networks:
        return [(ipaddress.ip_network(n.cidr, strict=False), n.except_) for n in e.spec.networks]
    # No networks: everything outside the cluster's networks, as Linkerd defaults it.
    return [(ipaddress.ip_network("0.0.0.0/0"), list(s.cluster_networks)),
            (ipaddress.ip_network("::/0"), list(s.cluster_networks))]


def egress_network(world: World, ip: str, source_ns: str, s: Settings) -> pol.EgressNetwork | None:
    """The EgressNetwork that covers ``ip`` for a client in ``source_ns``, as Linkerd picks it.

    When the client's namespace has EgressNetworks, only they are considered (even when none covers
    the address); otherwise those of the global egress namespace. Among those covering the address,
    the most specific network wins, then the oldest resource, then namespace and name order.
    """
    candidates = [r for r in world.of("EgressNetwork").values() if isinstance(r, pol.EgressNetwork)
                  and r.namespace in (source_ns, s.global_egress_ns)]
    own = [r for r in candidates if r.namespace == source_ns]
    addr = ipaddress.ip_address(ip)
    best: tuple[int, str, str, str, pol.EgressNetwork] | None = None
    for r in own or candidates:
        size = None
        for net, excepts in _egress_networks(r, s):
            if addr.version != net.version or addr not in net:
                continue
            if any(addr.version == ipaddress.ip_network(e, strict=False).version
                   and addr in ipaddress.ip_network(e, strict=False) for e in excepts):
                continue
            size = max(size or 0, net.prefixlen)
        if size is None:
            continue
        # Most specific first; then older (an absent timestamp sorts last); then namespace, name.
        key = (-size, r.metadata.creation_timestamp or "\uffff", r.namespace, r.name, r)
        if best is None or key[:4] < best[:4]:
            best = key
    return best[4] if best is not None else None


def _forward_backend(meta: meta_pb2.Metadata, fwd: dst.WeightedAddr) -> out.Backend:
    f = dst.WeightedAddr()
    f.CopyFrom(fwd)
    return out.Backend(metadata=meta, forward=f, queue=_queue())


def forward_policy(world: World, addr: str, target: Target | None, ctx: Context, s: Settings) -> out.OutboundPolicy:
    """Traffic to an address that is no Service: forwarded as addressed (to a workload with its identity).

    Under an EgressNetwork (:func:`egress_network`), the HTTPRoutes and GRPCRoutes attached to it
    decide first (their backends: the EgressNetwork itself, forwarding as addressed, or a Service);
    what no rule claims meets its trafficPolicy: Allow forwards, Deny answers 403 (gRPC:
    PERMISSION_DENIED) and refuses opaque TCP, each naming the EgressNetwork. A TCPRoute attached to
    it decides all of its opaque traffic instead of the trafficPolicy, as in Linkerd.
    """
    ip, _, port_text = addr.rpartition(":")
    ip = ip.strip("[]")
    port = int(port_text)
    if target is not None and target.workload is not None:
        fwd = weighted_addr(
            target.workload, ip, port, s, opaque=port in opaque_ports(world, target.workload), world=world
        )
        meta = resource_meta(target.workload, port=port)
    else:
        fwd = dst.WeightedAddr(addr=tcp_address(ip, port), weight=ENDPOINT_WEIGHT)
        meta = default_meta("egress-fallback")
    egress = egress_network(world, ip, ctx.namespace or "", s) if target is None else None
    if egress is None:
        return _forward_only(meta, _forward_backend(meta, fwd))
    meta = resource_meta(egress, port=port)
    deny = egress.spec.traffic_policy == "Deny"
    why = f"traffic to {addr} is not allowed by EgressNetwork {egress.namespace}/{egress.name}"
    parent = _Parent(egress, port, _forward_backend(meta, fwd), why)
    opaque_route = _tcp_route(world, parent, s) or out.OpaqueRoute(
        metadata=default_meta("tcp-egress-deny" if deny else "tcp-egress-allow"),
        rules=[
            out.OpaqueRoute.Rule(
                backends=out.OpaqueRoute.Distribution(
                    first_available=out.OpaqueRoute.Distribution.FirstAvailable(
                        backends=[out.OpaqueRoute.RouteBackend(backend=parent.default)]
                    )
                ),
                filters=[out.OpaqueRoute.Filter(forbidden=opaque_route_pb2.Forbidden())] if deny else [],
            )
        ],
    )
    policy = out.OutboundPolicy(metadata=meta)
    grpc = grpc_routes(world, parent, s)
    if grpc:
        grpc.append(_grpc_egress_catch_all(parent, s, why if deny else None))
        policy.protocol.grpc.CopyFrom(out.ProxyProtocol.Grpc(routes=grpc))
        return policy
    routes = http_routes(world, parent, s)
    policy.protocol.detect.CopyFrom(
        out.ProxyProtocol.Detect(
            timeout=duration(DETECT_TIMEOUT),
            opaque=out.ProxyProtocol.Opaque(routes=[opaque_route]),
            http1=out.ProxyProtocol.Http1(routes=routes),
            http2=out.ProxyProtocol.Http2(routes=routes),
        )
    )
    return policy


def _grpc_egress_catch_all(parent: _Parent, s: Settings, deny: str | None) -> out.GrpcRoute:
    filters = [] if deny is None else [out.GrpcRoute.Filter(failure_injector=grpc_route_pb2.GrpcFailureInjector(
        code=7, message=deny, ratio=http_route_pb2.Ratio(numerator=1, denominator=1)))]
    route: out.GrpcRoute = _catch_all(out.GrpcRoute, parent, s, "grpc-egress-deny" if deny else "grpc-egress-allow",
                                      filters, _grpc_retry([parent.resource]))
    return route


def _forward_only(meta: meta_pb2.Metadata, backend_: out.Backend) -> out.OutboundPolicy:
    """The policy of an address outside every EgressNetwork: forwarded as addressed."""
    opaque_route = out.OpaqueRoute(
        metadata=default_meta("egress"),
        rules=[
            out.OpaqueRoute.Rule(
                backends=out.OpaqueRoute.Distribution(
                    first_available=out.OpaqueRoute.Distribution.FirstAvailable(
                        backends=[out.OpaqueRoute.RouteBackend(backend=backend_)]
                    )
                ),
            )
        ],
    )
    http_route = out.HttpRoute(
        metadata=default_meta("egress"),
        rules=[
            out.HttpRoute.Rule(
                matches=[http_route_pb2.HttpRouteMatch(path=http_route_pb2.PathMatch(prefix="/"))],
                backends=out.HttpRoute.Distribution(
                    first_available=out.HttpRoute.Distribution.FirstAvailable(
                        backends=[out.HttpRoute.RouteBackend(backend=backend_)]
                    )
                ),
            )
        ],
    )
    policy = out.OutboundPolicy(metadata=meta)
    policy.protocol.detect.CopyFrom(
        out.ProxyProtocol.Detect(
            timeout=duration(DETECT_TIMEOUT),
            opaque=out.ProxyProtocol.Opaque(routes=[opaque_route]),
            http1=out.ProxyProtocol.Http1(routes=[http_route]),
            http2=out.ProxyProtocol.Http2(routes=[http_route]),
        )
    )
    return policy


# --- inbound policy ------------------------------------------------------------------------------


def parse_workload(text: str) -> tuple[str, str]:
    """(namespace, name) from a PortSpec.workload: JSON {"ns": ..., "pod": ...} or "ns:name"."""
    import json

    t = text.strip()
    if t.startswith("{"):
        try:
            doc = json.loads(t)
        except ValueError:
            raise LookupError_(f"workload {text!r}: invalid JSON") from None
        ns = doc.get("ns")
        name = doc.get("pod") or doc.get("external_workload")
        if isinstance(ns, str) and isinstance(name, str) and ns and name:
            return ns, name
        raise LookupError_(f'workload {text!r}: want {{"ns": NAMESPACE, "pod": NAME}}')
    ns, sep, name = t.partition(":")
    if not sep or not ns or not name:
        raise LookupError_(f"workload {text!r}: want NAMESPACE:NAME or JSON with ns and pod")
    return ns, name


def _networks(cidrs: Iterable[str]) -> list[inb.Network]:
    return [inb.Network(net=ip_network(c)) for c in cidrs]


def _net_auth(n: pol.Network) -> inb.Network:
    return inb.Network(net=ip_network(n.cidr), **{"except": [ip_network(e) for e in n.except_]})


def _default_authz(policy: str, s: Settings) -> list[inb.Authz]:
    if policy == "deny":
        return []
    cluster = policy.startswith("cluster-")
    nets = _networks(s.cluster_networks if cluster else ALL_NETWORKS)
    if policy.endswith("-authenticated"):
        authn = inb.Authn(
            meshTLS=inb.Authn.PermitMeshTLS(
                identities=inb.Authn.PermitMeshTLS.PermitClientIdentities(suffixes=[inb.IdentitySuffix(parts=[])])
            )
        )
    else:
        authn = inb.Authn(unauthenticated=inb.Authn.PermitUnauthenticated())
    return [inb.Authz(networks=nets, authentication=authn, metadata=default_meta(policy), labels={"name": policy})]


def _identities(names: Iterable[str]) -> inb.Authn.PermitMeshTLS.PermitClientIdentities:
    exact, suffixes = [], []
    for n in names:
        if n == "*":
            suffixes.append(inb.IdentitySuffix(parts=[]))
        elif n.startswith("*."):
            suffixes.append(inb.IdentitySuffix(parts=n[2:].split(".")))
        else:
            exact.append(inb.Identity(name=n))
    return inb.Authn.PermitMeshTLS.PermitClientIdentities(identities=exact, suffixes=suffixes)


def _sa_identity(name: str, ns: str, s: Settings) -> str:
    return f"{name}.{ns}.serviceaccount.identity.{s.control_plane_ns}.{s.trust_domain}"


def policy_authz(world: World, ap: pol.AuthorizationPolicy, s: Settings) -> inb.Authz | None:
    """One AuthorizationPolicy as an Authz; None when a referenced authentication is missing (deny)."""
    identities: list[str] = []
    networks: list[inb.Network] | None = None
    mesh = False
    for ref in ap.spec.required_authentication_refs:
        ns = ref.namespace or ap.namespace
        if ref.kind == "MeshTLSAuthentication":
            m = world.get("MeshTLSAuthentication", ns, ref.name)
            if not isinstance(m, pol.MeshTLSAuthentication):
                return None
            mesh = True
            identities += m.spec.identities
            for ir in m.spec.identity_refs:
                if ir.kind == "ServiceAccount":
                    identities.append(_sa_identity(ir.name, ir.namespace or m.namespace, s))
                elif ir.kind == "Namespace":
                    identities.append(f"*.{ir.name}.serviceaccount.identity.{s.control_plane_ns}.{s.trust_domain}")
        elif ref.kind == "NetworkAuthentication":
            n = world.get("NetworkAuthentication", ns, ref.name)
            if not isinstance(n, pol.NetworkAuthentication):
                return None
            networks = [_net_auth(x) for x in n.spec.networks]
        else:  # ServiceAccount
            mesh = True
            identities.append(_sa_identity(ref.name, ns, s))
    if mesh:
        authn = inb.Authn(meshTLS=inb.Authn.PermitMeshTLS(identities=_identities(identities)))
    else:
        authn = inb.Authn(unauthenticated=inb.Authn.PermitUnauthenticated())
    return inb.Authz(
        networks=networks if networks is not None else _networks(ALL_NETWORKS),
        authentication=authn,
        metadata=resource_meta(ap),
        labels={"group": ap.GROUP, "kind": "authorizationpolicy", "name": ap.name},
    )


def server_authz(saz: pol.ServerAuthorization, s: Settings) -> inb.Authz:
    c = saz.spec.client
    nets = [_net_auth(n) for n in c.networks] or _networks(ALL_NETWORKS)
    if c.unauthenticated:
        authn = inb.Authn(unauthenticated=inb.Authn.PermitUnauthenticated())
    else:
        assert c.mesh_tls is not None
        m = c.mesh_tls
        if m.unauthenticated_tls:
            authn = inb.Authn(meshTLS=inb.Authn.PermitMeshTLS(unauthenticated=inb.Authn.PermitUnauthenticated()))
        else:
            names = list(m.identities) + [
                _sa_identity(sa.name, sa.namespace or saz.namespace, s) for sa in m.service_accounts
            ]
            authn = inb.Authn(meshTLS=inb.Authn.PermitMeshTLS(identities=_identities(names)))
    return inb.Authz(
        networks=nets,
        authentication=authn,
        metadata=resource_meta(saz),
        labels={"group": saz.GROUP, "kind": "serverauthorization", "name": saz.name},
    )


def find_server(world: World, w: Workload, port: int) -> pol.Server | None:
    port_names = {p.name for p in w.spec.ports if p.port == port and p.name}
    for r in world.in_namespace("Server", w.namespace):
        assert isinstance(r, pol.Server)
        sel = r.spec.pod_selector
        if sel is None or not sel.matches(w.metadata.labels):
            continue
        if r.spec.port == port or r.spec.port in port_names:
            return r
    return None


def probe_paths(w: Workload, port: int) -> list[str]:
    """The paths of the workload's HTTP probes on ``port`` (by number or port name)."""
    names = {p.name for p in w.spec.ports if p.port == port and p.name}
    return sorted({p.path for p in w.spec.probes if p.port == port or p.port in names})


def _probe_route(paths: Sequence[str], s: Settings) -> inb.HttpRoute:
    """Linkerd's default "probe" route: GET on each probe path, authorized from the probe networks."""
    authz = inb.Authz(networks=_networks(s.probe_networks),
                      authentication=inb.Authn(unauthenticated=inb.Authn.PermitUnauthenticated()),
                      metadata=default_meta("probe"), labels={"name": "probe"})
    get = http_types_pb2.HttpMethod(registered=http_types_pb2.HttpMethod.GET)
    return inb.HttpRoute(
        metadata=default_meta("probe"),
        authorizations=[authz],
        rules=[inb.HttpRoute.Rule(matches=[http_route_pb2.HttpRouteMatch(
            path=http_route_pb2.PathMatch(exact=p), method=get) for p in paths])],
    )


def _inbound_http_routes(world: World, server: pol.Server | None, s: Settings,
                         probes: Sequence[str] = ()) -> list[inb.HttpRoute]:
    routes: list[inb.HttpRoute] = []
    if server is not None:
        for r in world.in_namespace("HTTPRoute", server.namespace):
            assert isinstance(r, rt.HTTPRoute)
            if not any((p.kind == "Server" and p.name == server.name) for p in r.spec.parent_refs):
                continue
            authz = _route_authz(world, r, s)
            rules = []
            for rule in r.spec.rules:
                rules.append(
                    inb.HttpRoute.Rule(
                        matches=[http_match(m) for m in rule.matches or [rt.HTTPRouteMatch()]],
                        filters=[_inbound_http_filter(f) for f in rule.filters if f.type != "ResponseHeaderModifier"],
                    )
                )
            routes.append(
                inb.HttpRoute(
                    metadata=resource_meta(r),
                    hosts=[host_match(h) for h in r.spec.hostnames],
                    authorizations=authz,
                    rules=rules,
                )
            )
    if not routes:
        routes.append(
            inb.HttpRoute(
                metadata=default_meta("default"),
                rules=[
                    inb.HttpRoute.Rule(
                        matches=[http_route_pb2.HttpRouteMatch(path=http_route_pb2.PathMatch(prefix="/"))]
                    )
                ],
            )
        )
        if probes and s.probe_networks:
            routes.append(_probe_route(probes, s))
    return routes


def _inbound_http_filter(f: rt.HTTPRouteFilter) -> inb.HttpRoute.Filter:
    """An outbound filter re-expressed for inbound routes (which have no response header modifier)."""
    o = _http_filter(f)
    which = o.WhichOneof("kind")
    if which == "request_header_modifier":
        return inb.HttpRoute.Filter(request_header_modifier=o.request_header_modifier)
    return inb.HttpRoute.Filter(redirect=o.redirect)


def _route_authz(world: World, route: Resource, s: Settings) -> list[inb.Authz]:
    out_authz = []
    for ap in world.in_namespace("AuthorizationPolicy", route.namespace):
        assert isinstance(ap, pol.AuthorizationPolicy)
        if ap.spec.target_ref.kind == route.KIND and ap.spec.target_ref.name == route.name:
            a = policy_authz(world, ap, s)
            if a is not None:
                out_authz.append(a)
    return out_authz


def _inbound_grpc_routes(world: World, server: pol.Server, s: Settings) -> list[inb.GrpcRoute]:
    routes: list[inb.GrpcRoute] = []
    for r in world.in_namespace("GRPCRoute", server.namespace):
        assert isinstance(r, rt.GRPCRoute)
        if not any((p.kind == "Server" and p.name == server.name) for p in r.spec.parent_refs):
            continue
        rules = []
        for rule in r.spec.rules:
            matches = []
            for m in rule.matches or [rt.GRPCRouteMatch()]:
                gm = grpc_route_pb2.GrpcRouteMatch()
                if m.method is not None:
                    gm.rpc.CopyFrom(
                        grpc_route_pb2.GrpcRpcMatch(service=m.method.service or "", method=m.method.method or "")
                    )
                matches.append(gm)
            rules.append(inb.GrpcRoute.Rule(matches=matches))
        routes.append(
            inb.GrpcRoute(
                metadata=resource_meta(r),
                hosts=[host_match(h) for h in r.spec.hostnames],
                authorizations=_route_authz(world, r, s),
                rules=rules,
            )
        )
    if not routes:
        routes.append(inb.GrpcRoute(metadata=default_meta("default"), rules=[inb.GrpcRoute.Rule()]))
    return routes


def _rate_limit(world: World, server: pol.Server, s: Settings) -> inb.HttpLocalRateLimit | None:
    for r in world.in_namespace("HTTPLocalRateLimitPolicy", server.namespace):
        assert isinstance(r, pol.HTTPLocalRateLimitPolicy)
        if r.spec.target_ref.name != server.name:
            continue
        rl = inb.HttpLocalRateLimit(metadata=resource_meta(r))
        if r.spec.total is not None:
            rl.total.requestsPerSecond = r.spec.total.requests_per_second
        if r.spec.identity is not None:
            rl.identity.requestsPerSecond = r.spec.identity.requests_per_second
        for o in r.spec.overrides:
            ids = [
                inb.Identity(name=_sa_identity(c.name, c.namespace or r.namespace, s))
                for c in o.client_refs
                if c.kind == "ServiceAccount"
            ]
            rl.overrides.append(
                inb.HttpLocalRateLimit.Override(
                    limit=inb.HttpLocalRateLimit.Limit(requestsPerSecond=o.requests_per_second),
                    clients=inb.HttpLocalRateLimit.Override.ClientIdentities(identities=ids),
                )
            )
        return rl
    return None


def inbound_server(world: World, workload: str, port: int, s: Settings) -> inb.Server:
    """The Server policy for a workload's port; LookupError_ for an unknown workload."""
    ns, name = parse_workload(workload)
    w = world.get("Workload", ns, name)
    if not isinstance(w, Workload):
        raise LookupError_(f"no workload {ns}/{name}")
    server = find_server(world, w, port)
    probes = probe_paths(w, port)
    if server is None:
        policy = annotation(world, w, "config.linkerd.io/default-inbound-policy") or s.default_policy
        if port in ports_annotation(world, w, "config.linkerd.io/proxy-require-identity-inbound-ports"):
            # As Linkerd's policy controller: an allowing default policy admits only mesh identities there.
            policy = {"all-unauthenticated": "all-authenticated",
                      "cluster-unauthenticated": "cluster-authenticated"}.get(policy, policy)
        detect = inb.ProxyProtocol.Detect(
            timeout=duration(DETECT_TIMEOUT), http_routes=_inbound_http_routes(world, None, s, probes)
        )
        out_server = inb.Server(
            protocol=inb.ProxyProtocol(detect=detect),
            authorizations=_default_authz(policy, s),
            labels={"group": "", "kind": "default", "name": policy},
        )
        if port in opaque_ports(world, w):
            out_server.protocol.CopyFrom(inb.ProxyProtocol(opaque=inb.ProxyProtocol.Opaque()))
        return out_server
    authz: list[inb.Authz] = []
    for ap in world.in_namespace("AuthorizationPolicy", server.namespace):
        assert isinstance(ap, pol.AuthorizationPolicy)
        t = ap.spec.target_ref
        if (t.kind == "Server" and t.name == server.name) or (t.kind == "Namespace" and t.name == server.namespace):
            a = policy_authz(world, ap, s)
            if a is not None:
                authz.append(a)
    for saz in world.in_namespace("ServerAuthorization", server.namespace):
        assert isinstance(saz, pol.ServerAuthorization)
        ref = saz.spec.server
        if ref.name == server.name or (ref.selector is not None and ref.selector.matches(server.metadata.labels)):
            authz.append(server_authz(saz, s))
    if server.spec.access_policy != "deny":
        authz += _default_authz(server.spec.access_policy, s)
    routes = _inbound_http_routes(world, server, s, probes)
    rl = _rate_limit(world, server, s)
    proto = server.spec.proxy_protocol
    if proto == "HTTP/1":
        pp = inb.ProxyProtocol(http1=inb.ProxyProtocol.Http1(routes=routes, local_rate_limit=rl))
    elif proto == "HTTP/2":
        pp = inb.ProxyProtocol(http2=inb.ProxyProtocol.Http2(routes=routes, local_rate_limit=rl))
    elif proto == "gRPC":
        pp = inb.ProxyProtocol(grpc=inb.ProxyProtocol.Grpc(routes=_inbound_grpc_routes(world, server, s)))
    elif proto == "opaque":
        pp = inb.ProxyProtocol(opaque=inb.ProxyProtocol.Opaque())
    elif proto == "TLS":
        pp = inb.ProxyProtocol(tls=inb.ProxyProtocol.Tls())
    else:
        pp = inb.ProxyProtocol(
            detect=inb.ProxyProtocol.Detect(
                timeout=duration(DETECT_TIMEOUT), http_routes=routes, http_local_rate_limit=rl
            )
        )
    return inb.Server(
        protocol=pp,
        authorizations=authz,
        labels={"group": server.GROUP, "kind": "server", "name": server.name},
        server_ips=[ip_address(a) for a in w.spec.addresses],
    )
