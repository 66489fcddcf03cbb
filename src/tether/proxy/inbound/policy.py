"""An inbound port's policy as the proxy applies it.

:class:`PortPolicy` holds what the authorization layers read: the port's protocol, the server's
labels (``srv_*``), its connection-level authorizations, its HTTP (or gRPC) routes each with the
authorizations that apply to it, and its local rate limit. The policy controller's
``inbound.Server`` messages become one in :mod:`tether.proxy.inbound.policy_wire`; without a
controller, :func:`default_port_policy` makes one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tether.core.policy.authz import (
    Authz,
    Meta,
    authorize,
    default_authorizations,
    localhost_authz,
    parse_ip,
)
from tether.core.policy.ratelimit import LocalRateLimit, RateLimitSpec
from tether.core.routing.http_match import RequestInfo, Route, Rule, select_rule
from tether.core.routing.policy import NO_FILTERS, Filters

# The protocols a port may declare (the oneof in ProxyProtocol).
DETECT, OPAQUE, TLS, HTTP1, HTTP2, GRPC = "detect", "opaque", "tls", "http1", "http2", "grpc"
HTTP_PROTOCOLS = frozenset({HTTP1, HTTP2, GRPC})


# Decisions remembered per route: (peer address, client identity) -> the permitting authorization.
_DECISIONS_MAX = 4096
# Routes remembered per policy: (method, target, authority) -> route.
_CHOSEN_MAX = 4096


@dataclass(frozen=True, slots=True)
class InboundRoute:
    """What a matched route carries: its labels and who may use it."""

    meta: Meta
    authorizations: tuple[Authz, ...]
    # The matched rule's filters (header modifiers, a redirect, an injected failure), applied once
    # the request is authorized; ``grpc``: a GRPCRoute's (failures answer in trailers).
    filters: Filters = NO_FILTERS
    grpc: bool = False
    # A client's decision depends only on its address and identity: computed once per route
    # object (a new policy brings new route objects, so nothing outlives the policy it came from).
    _decisions: dict[tuple[str, str | None], Authz | None] = field(
        default_factory=dict, compare=False, repr=False, hash=False)

    def decide(self, peer_ip: str, client_id: str | None) -> Authz | None:
        """The first authorization permitting the client (None: denied)."""
        key = (peer_ip, client_id)
        try:
            return self._decisions[key]
        except KeyError:
            pass
        found = authorize(self.authorizations, parse_ip(peer_ip), client_id)
        if len(self._decisions) >= _DECISIONS_MAX:
            self._decisions.clear()
        self._decisions[key] = found
        return found


@dataclass(frozen=True, slots=True)
class PortPolicy:
    protocol: str
    server: Meta
    authorizations: tuple[Authz, ...]  # connection level (opaque TCP, and every route's tail)
    routes: tuple[Route[InboundRoute], ...] = ()
    rate_limit: RateLimitSpec | None = None
    # Route-level rules exist (routes from resources, or a rate limit): only HTTP can be checked
    # against them, so HTTP-looking bytes that do not parse must never pass as opaque.
    needs_http: bool = False
    # The route every request takes when there is nothing to match (one route, one rule, no
    # matches, no hostnames: a default route), or the server's own authorizations when there is
    # no route at all (an opaque port that got HTTP). None: match each request.
    only_route: InboundRoute | None = field(default=None, compare=False)
    # Routes chosen per (method, target, authority) when no route matches on headers (then nothing
    # else of a request decides); bounded, and gone with the policy.
    chosen: dict[tuple[bytes, bytes, bytes], InboundRoute | None] | None = field(
        default=None, compare=False, repr=False)
    # The limiters of this policy's rate limit: a new policy starts them afresh, as linkerd2-proxy
    # builds its LocalRateLimit with each ServerPolicy (an identical resend keeps the policy object).
    limiter: LocalRateLimit | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        only: InboundRoute | None = None
        if not self.routes:
            only = InboundRoute(Meta.default("default"), self.authorizations)
        elif len(self.routes) == 1 and not self.routes[0].hostnames and len(self.routes[0].rules) == 1 \
                and not self.routes[0].rules[0].matches:
            only = self.routes[0].rules[0].value
        object.__setattr__(self, "only_route", only)
        by_headers = any(m.headers for r in self.routes for rule in r.rules for m in rule.matches)
        object.__setattr__(self, "chosen", None if by_headers else {})
        if self.rate_limit is not None:
            object.__setattr__(self, "limiter", LocalRateLimit(self.rate_limit))

    def route_for(self, method: bytes, path: bytes, authority: bytes,
                  headers: list[tuple[bytes, bytes]]) -> InboundRoute | None:
        """The route a request takes (the pure matcher's most specific rule), or None: no route."""
        if self.only_route is not None:
            return self.only_route
        cache = self.chosen
        key = (method, path, authority)
        if cache is not None:
            try:
                return cache[key]
            except KeyError:
                pass
        chosen = select_rule(self.routes, RequestInfo(method, path, authority.decode("latin-1").lower(), headers))
        route = chosen[0] if chosen is not None else None
        if cache is not None:
            if len(cache) >= _CHOSEN_MAX:
                cache.clear()
            cache[key] = route
        return route

    @property
    def is_opaque(self) -> bool:
        return self.protocol in (OPAQUE, TLS)


def default_route(server_authz: tuple[Authz, ...]) -> Route[InboundRoute]:
    return Route((), (Rule((), InboundRoute(Meta.default("default"), server_authz)),))


# -- without a control plane ----------------------------------------------------------------------


def default_port_policy(name: str, cluster_networks: Sequence[str], permit_localhost: bool = True) -> PortPolicy:
    """A default policy (``--default-inbound-policy``) for every port: detect, one default route."""
    authz = default_authorizations(name, cluster_networks)
    if permit_localhost:
        authz = (*authz, localhost_authz())
    return PortPolicy(DETECT, Meta.default(name), authz, (default_route(authz),))
