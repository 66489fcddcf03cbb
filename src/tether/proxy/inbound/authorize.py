"""Inbound authorization: per connection (opaque TCP) and per request (HTTP routes), and local rate limits.

:class:`Authorizer` holds what every connection of the proxy shares: the policy source and the
counters (the rate limiters live on each port's policy object), with linkerd2-proxy's metric names
and labels:

- ``inbound_tcp_authz_allow_total`` (``srv_*``, ``authz_*``) / ``inbound_tcp_authz_deny_total`` and
  ``inbound_tcp_authz_terminate_total`` (``srv_*``),
- ``inbound_http_authz_allow_total`` (``srv_*``, ``route_*``, ``authz_*``),
  ``inbound_http_authz_deny_total`` (``srv_*``, ``route_*``),
  ``inbound_http_route_not_found_total`` (``srv_*``),
- ``inbound_http_local_ratelimit_total`` (``srv_*``, ``ratelimit_*``),

each also with ``target_addr``, ``tls`` and ``client_id``. :class:`HttpAuthorize` is the layer of an
inbound HTTP stack: it reads the port's policy for every request (a policy change applies to the
next request on a connection already open), finds the route with the pure matcher, checks the
route's authorizations and then the rate limit. Denials are typed errors answered by the one
rescue: 403 (gRPC PERMISSION_DENIED), 404 for no route, 429 (RESOURCE_EXHAUSTED), each with
``l5d-proxy-error``. An ``audit`` default authorization permits and logs (at INFO: audit mode is
asked for to see what deny would refuse); denials are counted and logged at DEBUG only, so a flood
of refused clients does not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

from tether.core.policy.authz import Authz, Meta, authorize, parse_ip
from tether.core.policy.ratelimit import LocalRateLimit, RateLimited, RateLimitSpec
from tether.proxy.errors import ProxyError, rescue
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.inbound.policy import InboundRoute, PortPolicy
from tether.proxy.inbound.policy_source import PolicySource
from tether.proxy.layers.policy_routes import ApplyFilters
from tether.proxy.metrics import escape_label

log = logging.getLogger(__name__)


class UnauthorizedError(ProxyError):
    """No authorization of the route permits the client (403; gRPC PERMISSION_DENIED)."""

    status = 403
    grpc_status = 7


class RouteNotFoundError(ProxyError):
    """No route of the server matches the request (404; gRPC NOT_FOUND)."""

    status = 404
    grpc_status = 5


class RateLimitedError(ProxyError):
    """Over the server's local rate limit (429; gRPC RESOURCE_EXHAUSTED)."""

    status = 429
    grpc_status = 8


def _meta_labels(prefix: str, m: Meta) -> str:
    return (f'{prefix}_group="{escape_label(m.group)}",{prefix}_kind="{escape_label(m.kind)}",'
            f'{prefix}_name="{escape_label(m.name)}"')


def _conn_labels(target: tuple[str, int], tls: bool, client_id: str | None) -> tuple[str, str]:
    host = f"[{target[0]}]" if ":" in target[0] else target[0]
    head = f'target_addr="{host}:{target[1]}",target_ip="{target[0]}",target_port="{target[1]}"'
    tail = f'tls="true",client_id="{escape_label(client_id or "")}"' if tls else 'tls="disabled"'
    return head, tail


# Counter keys: (family, target, server, port, route, authz, rate-limit labels, tls, client id), formatted
# into labels only when /metrics is read.
_Key = tuple[str, tuple[str, int], Meta | None, Meta | None, Meta | None, str, bool, str | None]
_CELLS_MAX = 4096
# Filtering layers kept per authorization layer (one per rule with filters of the port's policy).
_FILTERED_MAX = 256
# A layer's shortcut: (id of the route, client address) -> (the route, its allow counter cell).
FastPath = dict[tuple[int, str], tuple[InboundRoute, list[int]]]


class Authorizer:
    """Policy decisions for every inbound connection of the proxy, and their counters."""

    def __init__(self, source: PolicySource, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self._counters: dict[_Key, list[int]] = {}

    def _count(self, key: _Key) -> None:
        cell = self._counters.get(key)  # one hash per request: the cell is mutated in place
        if cell is None:
            cell = self._counters[key] = [0]
        cell[0] += 1

    # -- connections -----------------------------------------------------------------------------------
    def check_tcp(self, policy: PortPolicy | None, target: tuple[str, int], peer_ip: str, tls: bool,
                  client_id: str | None) -> Authz | None:
        """The connection's authorization, counted; None: refuse the connection."""
        server = policy.server if policy is not None else None
        found = authorize(policy.authorizations, parse_ip(peer_ip), client_id if tls else None) \
            if policy is not None else None
        if found is None:
            self._count(("inbound_tcp_authz_deny_total", target, server, None, None, "", tls, client_id))
            log.debug("connection denied: port %d, client %s (tls=%s, id=%s)", target[1], peer_ip, tls, client_id)
            return None
        if found.meta.is_audit:
            log.info("connection allowed by audit: port %d, client %s (tls=%s, id=%s)", target[1], peer_ip, tls,
                     client_id)
        self._count(("inbound_tcp_authz_allow_total", target, server, None, found.meta, "", tls, client_id))
        return found

    def still_authorized(self, policy: PortPolicy, target: tuple[str, int], peer_ip: str, tls: bool,
                         client_id: str | None) -> bool:
        """Whether an open connection is still authorized under a new policy (counted when not)."""
        if authorize(policy.authorizations, parse_ip(peer_ip), client_id if tls else None) is not None:
            return True
        self._count(("inbound_tcp_authz_terminate_total", target, policy.server, None, None, "", tls, client_id))
        log.info("open connection from %s closed: no longer authorized on port %d", peer_ip, target[1])
        return False

    # -- requests --------------------------------------------------------------------------------------
    def check_request(self, policy: PortPolicy | None, req: Request, target: tuple[str, int], tls: bool,
                      client_id: str | None, fast: FastPath | None = None) -> ProxyError | None:
        """None when the request may pass; else the error the client gets (counted)."""
        if policy is None:
            self._count(("inbound_http_authz_deny_total", target, None, _DEFAULT_ROUTE, None, "", tls, client_id))
            return UnauthorizedError(f"no inbound policy for port {target[1]}")
        route = policy.route_for(req.method, req.path, req.authority, req.headers)
        if route is None:
            self._count(("inbound_http_route_not_found_total", target, policy.server, None, None, "", tls,
                         client_id))
            return RouteNotFoundError("no route found for request")
        conn = req.conn
        peer = conn.peer[0] if conn is not None else "0.0.0.0"
        found = route.decide(peer, client_id if tls else None)
        if found is None:
            self._count(("inbound_http_authz_deny_total", target, policy.server, route.meta, None, "", tls,
                         client_id))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request denied: %s %s, route %s, client %s (tls=%s, id=%s)",
                          req.method.decode("latin-1"), req.path.decode("latin-1")[:200], route.meta.name, peer,
                          tls, client_id)
            return UnauthorizedError("unauthorized request on route")
        if found.meta.is_audit:
            log.info("request allowed by audit: %s %s, route %s, client %s (tls=%s, id=%s)",
                     req.method.decode("latin-1"), req.path.decode("latin-1")[:200], route.meta.name, peer, tls,
                     client_id)
        key: _Key = ("inbound_http_authz_allow_total", target, policy.server, route.meta, found.meta, "", tls,
                     client_id)
        cell = self._counters.get(key)
        if cell is None:
            cell = self._counters[key] = [0]
        cell[0] += 1
        if fast is not None and not found.meta.is_audit:
            # The layer's shortcut for this route and client address (its target and identity are
            # the layer's own): the next request counts into the same cell without deciding again.
            if len(fast) >= _CELLS_MAX:
                fast.clear()
            fast[(id(route), peer)] = (route, cell)
        return self.check_rate(policy, target, tls, client_id)

    def check_rate(self, policy: PortPolicy, target: tuple[str, int], tls: bool,
                   client_id: str | None) -> ProxyError | None:
        """The port's rate limit for one more request (None: admitted)."""
        lim = policy.limiter
        if lim is not None:
            try:
                lim.check(client_id if tls else None, self.clock())
            except RateLimited as e:
                return self.limited(policy, lim, e, target, tls, client_id)
        return None

    def limited(self, policy: PortPolicy, lim: LocalRateLimit, e: RateLimited, target: tuple[str, int], tls: bool,
                client_id: str | None) -> ProxyError:
        """Count a request over the limit; the error its client gets."""
        self._count(("inbound_http_local_ratelimit_total", target, policy.server, None, None,
                     _ratelimit_labels(lim.spec, e.scope), tls, client_id))
        return RateLimitedError(e.reason)

    # -- metrics ---------------------------------------------------------------------------------------
    _HELP = {
        "inbound_http_authz_allow_total": "The total number of inbound HTTP requests that were authorized",
        "inbound_http_authz_deny_total": "The total number of inbound HTTP requests that were denied",
        "inbound_http_route_not_found_total":
            "The total number of inbound HTTP requests that could not be associated with a route",
        "inbound_http_local_ratelimit_total": "The total number of inbound HTTP requests that were rate-limited",
        "inbound_tcp_authz_allow_total": "The total number of inbound TCP connections that were authorized",
        "inbound_tcp_authz_deny_total": "The total number of inbound TCP connections that were denied",
        "inbound_tcp_authz_terminate_total":
            "The total number of inbound TCP connections that were terminated due to an authorization change",
    }

    def lines(self) -> list[str]:
        rows: dict[str, list[tuple[str, int]]] = {}
        for key, cell in list(self._counters.items()):
            rows.setdefault(key[0], []).append((_labels(key), cell[0]))
        out: list[str] = []
        for family, help_text in self._HELP.items():
            if family not in rows:
                continue
            out.append(f"# HELP {family} {help_text}.")
            out.append(f"# TYPE {family} counter")
            out.extend(f"{family}{{{labels}}} {n}" for labels, n in sorted(rows[family]))
        return out


_DEFAULT_ROUTE = Meta.default("default")


def _ratelimit_labels(spec: RateLimitSpec, scope: str) -> str:
    rl = spec.meta
    if rl is None:
        return f'ratelimit_scope="{scope}"'
    return (f'ratelimit_group="{escape_label(rl[0])}",ratelimit_kind="{escape_label(rl[1])}",'
            f'ratelimit_name="{escape_label(rl[2])}",ratelimit_scope="{scope}"')


def _labels(key: _Key) -> str:
    _, target, server, route, authz, extra, tls, client_id = key
    head, tail = _conn_labels(target, tls, client_id)
    if server is None:
        # Never received (or never valid): the port denies and says it has no server.
        srv = f'srv_group="",srv_kind="",srv_name="",srv_port="{target[1]}"'
    else:
        srv = f'{_meta_labels("srv", server)},srv_port="{target[1]}"'
    parts = [head, srv]
    if route is not None:
        parts.append(_meta_labels("route", route))
    if authz is not None:
        parts.append(_meta_labels("authz", authz))
    if extra:
        parts.append(extra)
    parts.append(tail)
    return ",".join(parts)


class HttpAuthorize:
    """Layer: authorize each request on its route and apply the rate limit, from the port's current policy.

    Not a coroutine itself: a permitted request is the inner service's awaitable as is (no extra
    frame per request); only a port whose first policy has not arrived waits here."""

    __slots__ = ("authorizer", "client_id", "fast", "filtered", "inner", "last", "target", "tls")

    def __init__(self, inner: Service, authorizer: Authorizer, target: tuple[str, int], tls: bool,
                 client_id: str | None) -> None:
        self.inner = inner
        # The filtering layer of each rule with filters (a new policy brings new route objects).
        self.filtered: dict[int, tuple[InboundRoute, Service]] = {}
        self.authorizer = authorizer
        self.target = target
        self.tls = tls
        self.client_id = client_id
        self.fast: FastPath = {}
        # The last shortcut taken, and where it leads: (route, client address, cell, service). A
        # connection's requests mostly take one route: no key tuple to hash, no filters to check.
        self.last: tuple[InboundRoute, str, list[int], Service] | None = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        a = self.authorizer
        policy = a.source.current(self.target[1])
        if policy is None:
            return self._first_policy(req)
        route = policy.only_route
        if route is None:
            chosen = policy.chosen  # the policy's memo of routes per (method, target, authority)
            route = chosen.get((req.method, req.path, req.authority)) if chosen is not None else None
            if route is None:
                route = policy.route_for(req.method, req.path, req.authority, req.headers)
        if route is not None:
            # A client already permitted on this route (the route object is the policy's: a new
            # policy brings new routes, so a shortcut never outlives the decision it remembers).
            conn = req.conn
            peer = conn.peer[0] if conn is not None else "0.0.0.0"
            last = self.last
            if last is None or last[0] is not route or last[1] != peer:
                hit = self.fast.get((id(route), peer))
                # The shortcut is the fast path's entry as it stands (the same route object: the
                # same decision), with the service it leads to.
                last = self.last = (route, peer, hit[1], self._to(route)) if hit is not None and hit[0] is route \
                    else None
            if last is not None:
                last[2][0] += 1
                lim = policy.limiter
                if lim is not None:
                    try:
                        lim.check(self.client_id if self.tls else None, a.clock())
                    except RateLimited as e:
                        return _answer(rescue(a.limited(policy, lim, e, self.target, self.tls, self.client_id), req))
                return last[3](req)
        err = a.check_request(policy, req, self.target, self.tls, self.client_id, self.fast)
        if err is not None:
            return _answer(rescue(err, req))
        return self._to(route)(req) if route is not None else self.inner(req)

    def _to(self, route: InboundRoute) -> Service:
        """The application, behind the matched rule's filters when it has any."""
        if route.filters.empty:
            return self.inner
        f = self.filtered.get(id(route))
        if f is None or f[0] is not route:
            if len(self.filtered) >= _FILTERED_MAX:
                self.filtered.clear()
            f = self.filtered[id(route)] = (route, ApplyFilters(self.inner, route.filters, grpc=route.grpc))
        return f[1]

    async def _first_policy(self, req: Request) -> Response:
        policy = await self.authorizer.source.get(self.target[1])  # bounded wait for the port's first policy
        err = self.authorizer.check_request(policy, req, self.target, self.tls, self.client_id)
        if err is not None:
            return rescue(err, req)
        route = policy.route_for(req.method, req.path, req.authority, req.headers) if policy is not None else None
        return await (self._to(route)(req) if route is not None else self.inner(req))


async def _answer(resp: Response) -> Response:
    return resp


_METHOD_START = re.compile(rb"(?:\r?\n)*[A-Z]{3,20}(?:[^A-Za-z]|$)")


def looks_like_http(head: bytes) -> bool:
    """Bytes that start as an HTTP/1 request would (an upper-case method token) without parsing as one."""
    return _METHOD_START.match(head) is not None


def refuse_unparsed_http(transport: asyncio.Transport, head: bytes, always: bool) -> bool:
    """Answer 400 and close when ``head`` looks like HTTP (or ``always``: the port is HTTP-only).

    True when refused. The application never sees the bytes."""
    if not (always or looks_like_http(head)):
        return False
    reason = b"request could not be parsed as HTTP on a port whose policy needs HTTP"
    transport.write(b"HTTP/1.1 400 Bad Request\r\nl5d-proxy-error: " + reason
                    + b"\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%b\n"
                    % (len(reason) + 1, reason))
    transport.close()
    log.debug("unparsed HTTP-looking bytes refused with 400 (%d bytes)", len(head))
    return True
