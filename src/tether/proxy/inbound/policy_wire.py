"""An inbound port's policy from linkerd2-proxy-api's ``inbound.Server`` message (the policy watch's).

The conversion follows linkerd2-proxy's ``ServerPolicy::try_from``: every route's authorizations are
its own followed by the server's; a protocol without routes gets one default route matching every
request; with ``permit_localhost`` (Linkerd's behaviour) clients on 127.0.0.1 and ::1 are always
permitted. A message that cannot be converted raises :class:`~tether.core.policy.authz.PolicyError`.

Apart from :mod:`tether.proxy.inbound.policy` (the model the layers read) so that a proxy without a
policy controller never loads the API's message modules: ~0.5 MiB of RSS.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from tether.api.gen import grpc_route_lite, http_route_lite, inbound_lite, meta_lite, net_lite
from tether.core.policy.authz import (
    IDENTITIES,
    TLS_UNAUTHENTICATED,
    UNAUTHENTICATED,
    Authn,
    Authz,
    Meta,
    Network,
    PolicyError,
    localhost_authz,
)
from tether.core.policy.ratelimit import RateLimitSpec
from tether.core.routing.http_match import PathMatch, Route, RouteMatch, Rule
from tether.proxy.inbound.policy import (
    DETECT,
    GRPC,
    HTTP1,
    HTTP2,
    OPAQUE,
    TLS,
    InboundRoute,
    PortPolicy,
    default_route,
)
from tether.proxy.policy import grpc_filters_of, http_filters_of, http_route_match, value_matches

# -- from the wire ------------------------------------------------------------------------------------


def _ip(a: net_lite.IPAddress) -> str:
    if a.WhichOneof("ip") == "ipv6":
        return str(ipaddress.IPv6Address((a.ipv6.first << 64) | a.ipv6.last))
    return str(ipaddress.IPv4Address(a.ipv4))


def _cidr(n: net_lite.IPNetwork) -> str:
    return f"{_ip(n.ip)}/{n.prefix_len}"


def _meta(m: meta_lite.Metadata, what: str) -> Meta:
    kind = m.WhichOneof("kind")
    if kind == "default":
        return Meta.default(m.default)
    if kind == "resource":
        return Meta(m.resource.group, m.resource.kind.lower(), m.resource.name)
    raise PolicyError(f"{what}: metadata missing")


def authz_of(a: inbound_lite.Authz) -> Authz:
    nets = tuple(Network.parse(_cidr(n.net), [_cidr(e) for e in getattr(n, "except")]) for n in a.networks)
    permit = a.authentication.WhichOneof("permit")
    if permit == "unauthenticated":
        authn = Authn(UNAUTHENTICATED)
    elif permit == "meshTLS":
        clients = a.authentication.meshTLS.WhichOneof("clients")
        if clients == "unauthenticated":
            authn = Authn(TLS_UNAUTHENTICATED)
        elif clients == "identities":
            ids = a.authentication.meshTLS.identities
            authn = Authn(IDENTITIES, frozenset(i.name for i in ids.identities),
                          tuple(tuple(s.parts) for s in ids.suffixes))
        else:
            raise PolicyError("authorization: meshTLS without clients")
    else:
        raise PolicyError("authorization: no authentication")
    if a.HasField("metadata"):
        meta = _meta(a.metadata, "authorization")
    else:  # older controllers label authorizations instead
        labels = dict(a.labels)
        meta = Meta(labels.get("group", "policy.linkerd.io"), labels.get("kind", "serverauthorization"),
                    labels.get("name", ""))
    return Authz(nets, authn, meta)


def grpc_match_of(m: grpc_route_lite.GrpcRouteMatch) -> RouteMatch:
    """A gRPC match as an HTTP one: ``POST /service/method`` (an empty part matches any)."""
    path = None
    if m.HasField("rpc") and m.rpc.service:
        svc = re.escape(m.rpc.service)
        meth = re.escape(m.rpc.method) if m.rpc.method else "[^/]+"
        path = PathMatch("regex", f"/{svc}/{meth}")
    elif m.HasField("rpc") and m.rpc.method:
        path = PathMatch("regex", f"/[^/]+/{re.escape(m.rpc.method)}")
    return RouteMatch(path=path, headers=value_matches(m.headers), method=b"POST")


def _hosts(hs: Sequence[http_route_lite.HostMatch]) -> tuple[str, ...]:
    out = []
    for h in hs:
        if h.WhichOneof("match") == "exact":
            out.append(h.exact)
        else:
            out.append("*." + ".".join(reversed(h.suffix.reverse_labels)))
    return tuple(out)


def _route(r: inbound_lite.HttpRoute | inbound_lite.GrpcRoute, server_authz: tuple[Authz, ...],
           grpc: bool) -> tuple[Route[InboundRoute], bool]:
    meta = _meta(r.metadata, "route")
    own = tuple(authz_of(a) for a in r.authorizations)
    rules = []
    # Rules without filters share one value (and its memo of decisions); a rule with filters has
    # its own.
    value = InboundRoute(meta, own + server_authz, grpc=grpc)
    # A route from a resource narrows what HTTP may do (paths outside it get 404, its own rules);
    # the controller's default routes ("default", "probe") only widen it.
    narrows = meta.kind != "default"
    for rule in r.rules:
        wire_matches: Sequence[Any] = rule.matches  # grpc_route's GrpcRouteMatch or http_route's
        if grpc:
            matches = tuple(grpc_match_of(m) for m in wire_matches)
        else:
            matches = tuple(http_route_match(m) for m in wire_matches)
        filters = grpc_filters_of(rule.filters) if grpc else http_filters_of(rule.filters)
        rules.append(Rule(matches, value if filters.empty else
                          InboundRoute(meta, value.authorizations, filters, grpc)))
    return Route(_hosts(r.hosts), tuple(rules)), narrows


def port_policy(msg: inbound_lite.Server, permit_localhost: bool = True) -> PortPolicy:
    """The proxy's view of one ``inbound.Server`` message; PolicyError when it cannot be applied."""
    try:
        return _port_policy(msg, permit_localhost)
    except (ValueError, re.error) as e:
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(str(e)) from None


def _port_policy(msg: inbound_lite.Server, permit_localhost: bool) -> PortPolicy:
    labels = dict(msg.labels)
    server = Meta(labels.get("group", "policy.linkerd.io"), labels.get("kind", "server"), labels.get("name", ""))
    authz = tuple(authz_of(a) for a in msg.authorizations)
    if permit_localhost:
        authz = (*authz, localhost_authz())
    kind = msg.protocol.WhichOneof("kind")
    if kind is None:
        raise PolicyError("server: no proxy protocol")
    proto = getattr(msg.protocol, kind)
    http_routes: Sequence[inbound_lite.HttpRoute] = ()
    grpc_routes: Sequence[inbound_lite.GrpcRoute] = ()
    limit_msg: inbound_lite.HttpLocalRateLimit | None = None
    if kind == DETECT:
        http_routes = proto.http_routes
        limit_msg = proto.http_local_rate_limit if proto.HasField("http_local_rate_limit") else None
    elif kind in (HTTP1, HTTP2):
        http_routes = proto.routes
        limit_msg = proto.local_rate_limit if proto.HasField("local_rate_limit") else None
    elif kind == GRPC:
        grpc_routes = proto.routes
    routes: list[Route[InboundRoute]] = []
    route_rules = False
    for r in http_routes:
        route, own = _route(r, authz, grpc=False)
        routes.append(route)
        route_rules |= own
    for g in grpc_routes:
        route, own = _route(g, authz, grpc=True)
        routes.append(route)
        route_rules |= own
    if not routes and kind not in (OPAQUE, TLS):
        routes.append(default_route(authz))
    limit = rate_limit_of(limit_msg) if limit_msg is not None else None
    return PortPolicy(kind, server, authz, tuple(routes), limit,
                      needs_http=route_rules or limit is not None)


def rate_limit_of(m: inbound_lite.HttpLocalRateLimit) -> RateLimitSpec | None:
    total = m.total.requestsPerSecond if m.HasField("total") else 0
    ident = m.identity.requestsPerSecond if m.HasField("identity") else 0
    overrides: dict[str, int] = {}
    for o in m.overrides:
        for c in o.clients.identities:
            overrides[c.name] = o.limit.requestsPerSecond
    if not total and not ident and not overrides:
        return None
    meta = None
    if m.HasField("metadata"):
        mm = _meta(m.metadata, "rate limit")
        meta = (mm.group, mm.kind, mm.name)
    return RateLimitSpec(total or None, ident or None, overrides, meta)


