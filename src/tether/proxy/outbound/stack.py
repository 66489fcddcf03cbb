"""The outbound path, read top to bottom: what happens to a connection from the local application.

accept -> detect protocol -> HTTP: route by authority -> logical stack -> balancer -> endpoint stack
                          -> opaque TCP: original destination (mTLS + transport header when meshed)

Stacks are built per target and cached while used (:class:`~tether.proxy.cache.IdleCache`): one
per logical destination (its route policy, balancer and metrics), one per endpoint inside its
balancer (its connection pool, TLS identity and metric labels). Nothing is decided per request
that could be decided per target.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tether.core.discovery.endpoints import Addr, Endpoint, EndpointSet, format_addr
from tether.core.http.detect import Detected
from tether.core.routing.policy import Backend, ClientPolicy, RouteRule
from tether.core.routing.profile import Profile, ProfileRoute, WeightedDst
from tether.core.routing.retry_budget import BudgetPolicy, RetryBudget
from tether.core.routing.retry_policy import RetryPolicy
from tether.proxy import connect
from tether.proxy.balancer import Balancer
from tether.proxy.cache import IdleCache, Stack
from tether.proxy.config import (
    ProxyConfig,
    balancer_settings,
    client_settings,
    detect_settings,
    h1_server_settings,
    h2_settings,
)
from tether.proxy.detect import DetectProtocol
from tether.proxy.discovery import Discovery, feed
from tether.proxy.endpoint import HttpEndpoint
from tether.proxy.errors import ProxyError, UnavailableError
from tether.proxy.http.body import EmptyBody
from tether.proxy.http.h1client import Upgraded
from tether.proxy.http.message import Connection, Request, Response, Service
from tether.proxy.layers.connect_retry import ConnectRetry
from tether.proxy.layers.metrics import EndpointMeter, HttpMetricsService, RouteMeter
from tether.proxy.layers.policy_routes import ApplyFilters, Measure, PolicyRouteMetrics, PolicyRouter
from tether.proxy.layers.rescue import Rescue
from tether.proxy.layers.retry import Retry, RetryStats
from tether.proxy.layers.routes import ProfileRouter, RouteCounters, RouteMetrics, Split
from tether.proxy.layers.tap import TapLayer
from tether.proxy.layers.timeout import ResponseTimeout
from tether.proxy.layers.trace import TraceLayer
from tether.proxy.metrics import MetricsRegistry, escape_label
from tether.proxy.outbound.router import Router, is_ip, split_authority
from tether.proxy.server import Connections, hold_opaque
from tether.proxy.tap import OUTBOUND, TapHub
from tether.proxy.targets import Logical, Route
from tether.proxy.tcp import Pending
from tether.proxy.tracing import KIND_CLIENT, Tracer

if TYPE_CHECKING:
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)

# A ServiceProfile route's retries are bounded by its budget; this caps the attempts of one request.
PROFILE_RETRY_CAP = 10
# An opaque connection refused by one endpoint of a Service is tried on up to this many.
OPAQUE_CONNECT_ATTEMPTS = 3


class Outbound:
    """The outbound listener's stacks and live connections."""

    def __init__(self, cfg: ProxyConfig, metrics: MetricsRegistry, discovery: Discovery | None,
                 identity: IdentityClient | None, own_addrs: set[Addr], tap: TapHub | None = None,
                 tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.tap = tap if tap is not None else TapHub()
        self.tracer = tracer
        self.discovery = discovery
        # Asked for each accepted connection's original destination (bound once, not per connection).
        self._dst_opaque = discovery.opaque_dst if discovery is not None else None
        self.identity = identity
        self.detect = detect_settings(cfg)
        self.client = client_settings(cfg, cfg.outbound_connect_timeout)
        self.balancer = balancer_settings(cfg)
        self.handshake_timeout = cfg.identity_handshake_timeout
        self.h2_upgrade = cfg.outbound_h2_upgrade
        self.connect_timeout = cfg.outbound_connect_timeout
        # Until routes come from the control plane, every destination has the default route.
        self.route = Route(timeout=cfg.response_timeout, connect_retry_attempts=cfg.connect_retry_attempts)
        self.connections = Connections("outbound", h1_server_settings(cfg), h2_settings(cfg), cfg.tcp_zero_copy)
        self.route_metrics = RouteMetrics()
        self.policy_metrics = PolicyRouteMetrics()
        self._budgets: dict[tuple[str, BudgetPolicy | None], RetryBudget] = {}
        self._rng = random.Random()
        self.logicals: IdleCache[Logical, Stack] = IdleCache(
            self.logical_stack, cfg.cache_max_idle_age, close=Stack.aclose, name="outbound")
        generation = discovery.changes if discovery is not None else None
        self._own_addrs = own_addrs
        self.http: Service = Rescue(Router(discovery, self.logicals, own_addrs, generation, self.tunnel))

    # -- accept and detect --------------------------------------------------------------------------
    def accept(self) -> DetectProtocol:
        """The protocol of a newly accepted connection: detected, unless discovery says its original
        destination is opaque (its Service's or pod's opaque ports), as Linkerd's proxy decides."""
        return DetectProtocol("outbound", self.detect, self.on_detected, dst_opaque=self._dst_opaque)

    def on_detected(self, what: Detected, transport: asyncio.Transport, conn: Connection, buf: bytes,
                    eof: bool) -> None:
        if what is Detected.HTTP1 or what is Detected.H2:
            # Every accepted connection counts in tcp_open_total/tcp_open_connections, HTTP too.
            tcp = self.metrics.tcp("outbound", "src", conn.orig_dst, tls=conn.tls)
            tcp.opened()
            serve = self.connections.serve_h1 if what is Detected.HTTP1 else self.connections.serve_h2
            serve(self.http, transport, conn, buf, tcp)  # route -> logical stack, per request
        else:
            self.connections.spawn(self.tcp(transport, conn, hold_opaque(transport, buf, eof)))

    # -- HTTP: one stack per logical destination ---------------------------------------------------
    def logical_stack(self, target: Logical) -> Stack:
        route = self.route
        closers: list[Callable[[], object]] = []
        inner: Balancer | EndpointMeter
        if target.watch is not None:
            inner = self._balancer(target, closers)  # P2C over peak-EWMA, failure accrual, fail-fast
        else:
            assert target.fallback is not None
            inner = self.endpoint_stack(target, Endpoint(target.fallback))  # the one address it names
        closers.append(inner.aclose)
        svc: Service = ConnectRetry(inner, route.connect_retry_attempts)  # a refused connect sent nothing
        if route.timeout is not None:
            svc = ResponseTimeout(svc, route.timeout)  # 504 when the response head is late
        svc = Rescue(svc)  # errors -> 502/503/504 with l5d-proxy-error (gRPC: grpc-status)
        profile_router: ProfileRouter | None = None
        if target.profile is not None:
            # The destination's ServiceProfile: a stack per route (timeout, retries, split).
            profile_router = ProfileRouter(target.authority, target.profile,
                                           lambda r, p: self.route_stack(target, r, p, inner, closers))
            closers.append(profile_router.aclose)
        if target.policy is not None:
            # Its HTTPRoutes/GRPCRoutes: a stack per rule (the profile, when it has routes, first).
            backends: dict[str, Service] = {}
            router = PolicyRouter(target.authority, target.policy, target.profile,
                                  lambda rule, pol: self.rule_stack(target, rule, pol, inner, closers, backends),
                                  svc, profile_router)
            closers.append(router.aclose)
            svc = router
        elif profile_router is not None:
            svc = profile_router
        svc = HttpMetricsService(svc, self.metrics.http(  # request_total, response_total, latency
            "outbound", target.fallback, authority=target.authority), routes=target.profile is not None)
        if self.tracer is not None:
            svc = TraceLayer(svc, self.tracer, KIND_CLIENT, "outbound")  # a span per sampled request
        svc = TapLayer(svc, self.tap, OUTBOUND, target.fallback,  # live events for running taps (else: nothing)
                       meshed=self.identity is not None and target.watch is not None)
        return Stack(svc, closers, inner if isinstance(inner, Balancer) else None)

    # -- HTTP: one stack per profile route ------------------------------------------------------------
    def route_stack(self, target: Logical, route: ProfileRoute, profile: Profile, own: Service,
                    closers: list[Callable[[], object]]) -> Service:
        svc: Service = own  # the destination's balancer
        if profile.dst_overrides:
            svc = Split([(d, self._backend(d.authority, own, target, closers))  # TrafficSplit weights
                         for d in profile.dst_overrides])
        svc = ConnectRetry(svc, self.route.connect_retry_attempts)  # a refused connect sent nothing
        if not route.retryable:
            self.route_metrics.same_actual(target.authority, route.name)  # one try a request: route_actual_ = route_
        else:
            svc = RouteCounters(svc, self.route_metrics, target.authority, route)  # route_actual_*, per try
            budget = self._budget(target.authority, profile)
            policy = RetryPolicy(limit=route.max_retries if route.max_retries is not None else PROFILE_RETRY_CAP,
                                 per_try_timeout=route.retry_timeout, budget=profile.budget,
                                 is_failure=route.is_failure)
            svc = Retry(svc, policy, budget, RetryStats())  # within the profile's retry budget
        if route.timeout is not None:
            svc = ResponseTimeout(svc, route.timeout)  # 504 when the route's timeout passes
        svc = Rescue(svc)  # errors -> 502/503/504 with l5d-proxy-error (gRPC: grpc-status)
        return RouteMeter(svc, self.route_metrics.series(  # route_request_total, ...: counted by the logical
            "route_", target.authority, route.name))       # stack's metrics layer, once per request

    # -- HTTP: one stack per HTTPRoute/GRPCRoute rule -------------------------------------------------
    def rule_stack(self, target: Logical, rule: RouteRule, policy: ClientPolicy, own: Service,
                   closers: list[Callable[[], object]], backends: dict[str, Service]) -> Service:
        proto = "grpc" if policy.grpc else "http"
        parent = policy.parent.labels("parent", with_port=True)
        route = rule.route.labels("route", with_port=False)
        picks: list[tuple[WeightedDst, Service]] = []
        for b in rule.backends:
            bsvc = self._policy_backend(target, b, own, closers, backends)
            if b.timeout is not None:
                bsvc = ResponseTimeout(bsvc, b.timeout)  # backendRequest timeout, per try
            if not b.filters.empty:
                bsvc = ApplyFilters(bsvc, b.filters, grpc=policy.grpc)  # the backend's own filters
            bsvc = Measure(bsvc, self.policy_metrics.backend(  # backend_requests_total, backend_response_*
                proto, f"{parent},{route},{b.meta.labels('backend', with_port=True)}"), grpc=policy.grpc, backend=True)
            picks.append((WeightedDst(b.authority or b.forward or "", 1 if rule.first_available else b.weight), bsvc))
        svc: Service
        if not picks:
            svc = _NoBackends(rule.route.name or rule.route.kind)
        else:
            svc = Split(picks[:1] if rule.first_available else picks)  # backendRefs weights
        svc = ConnectRetry(svc, self.route.connect_retry_attempts)  # a refused connect sent nothing
        if rule.retry is not None:
            svc = Retry(svc, rule.retry, None, self.policy_metrics.retry(  # retry_* counters
                proto, f"{parent},{route}"))
        elif rule.response_timeout is not None:
            svc = ResponseTimeout(svc, rule.response_timeout)  # the response head, per try
        if not rule.filters.empty:
            svc = ApplyFilters(svc, rule.filters, grpc=policy.grpc)  # header modifiers, failures, redirects
        if rule.request_timeout is not None:
            svc = ResponseTimeout(svc, rule.request_timeout)  # the whole request, retries included
        svc = Measure(svc, self.policy_metrics.request(  # request_duration_seconds, request_statuses_total
            proto, f'{parent},{route},hostname="{_egress_host(policy, target)}"'), grpc=policy.grpc)
        return Rescue(svc)  # errors -> 502/503/504 with l5d-proxy-error (gRPC: grpc-status)

    def _policy_backend(self, target: Logical, b: Backend, own: Service, closers: list[Callable[[], object]],
                        backends: dict[str, Service]) -> Service:
        """A rule's backend: the destination's own balancer, another destination's, or one address."""
        if b.authority is None and b.forward is None:
            return _NoBackends(b.meta.name or b.meta.kind)  # an invalid backend: its failure filter answers
        key = b.authority or b.forward or ""
        svc = backends.get(key)
        if svc is None:
            if b.authority is not None and b.authority == target.authority:
                svc = own
            elif b.authority is not None:
                svc = _Concrete(self, b.authority, closers)
            else:
                ep = Endpoint.of(key, identity=b.forward_identity)
                meter = self.endpoint_stack(target, ep)
                closers.append(meter.aclose)
                svc = meter
            backends[key] = svc
        return svc

    def _budget(self, authority: str, profile: Profile) -> RetryBudget:
        # One budget per destination, shared by its routes (as the profile's retryBudget is).
        key = (authority, profile.budget)
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RetryBudget(profile.budget or BudgetPolicy(), time.monotonic())
        return budget

    def _backend(self, authority: str, own: Service, target: Logical, closers: list[Callable[[], object]]) -> Service:
        """A split's backend: the destination itself, or another destination's balancer."""
        if authority == target.authority:
            return own
        return _Concrete(self, authority, closers)

    def _balancer(self, target: Logical, closers: list[Callable[[], object]]) -> Balancer:
        assert target.watch is not None
        bal = Balancer(lambda ep: self.endpoint_stack(target, ep), self.balancer, name=target.authority)
        bal.replace(target.watch.state)  # the snapshot now, so the first request need not queue
        sub = target.watch.subscribe()
        task = asyncio.get_running_loop().create_task(feed(sub, bal))
        closers += [sub.close, task.cancel]
        return bal

    # -- HTTP: one stack per endpoint ----------------------------------------------------------------
    def endpoint_stack(self, logical: Logical, ep: Endpoint) -> EndpointMeter:
        t = connect.reach(ep, mtls=self.identity is not None)  # plain, or mTLS to its proxy
        svc: Service = HttpEndpoint(t.dial, self.client,  # pooled HTTP/1, one HTTP/2 connection
                                    connect.connector(t, self.identity, self.handshake_timeout),
                                    upgrade=self.h2_upgrade and t.server_id is not None and ep.protocol_hint == "h2")
        return EndpointMeter(svc, self.metrics.http(  # the request counts as this endpoint's
            "outbound", t.addr, authority=logical.authority, tls=t.server_id is not None,
            server_id=t.server_id, extra=t.labels))

    # -- opaque TCP: one connection at a time --------------------------------------------------------
    async def tcp(self, transport: asyncio.Transport, conn: Connection, client_pending: Pending) -> None:
        dst = conn.orig_dst
        if dst is None:
            self.metrics.tcp_error("outbound", "unexpected")
            log.info("outbound opaque connection from %s:%d has no original destination; closing", *conn.peer)
            transport.close()
            return
        candidates = await self._opaque_targets(dst)
        if isinstance(candidates, str):
            self.metrics.tcp_error("outbound", "forbidden", dst)
            log.info("outbound connection from %s:%d to %s:%d refused: %s", *conn.peer, *dst, candidates)
            transport.abort()  # refused before any byte goes anywhere
            return
        mtls = self.identity is not None and self.identity.ready
        targets = [connect.reach(ep, mtls=mtls, opaque=True) for ep in candidates]
        await self.connections.connect_and_forward(self.metrics, self.identity, conn, transport, client_pending,
                                                   targets[0], self.connect_timeout, self.handshake_timeout,
                                                   fallbacks=targets[1:OPAQUE_CONNECT_ATTEMPTS])

    # -- CONNECT: a tunnel for an application that uses the proxy as its HTTP_PROXY -------------------
    async def tunnel(self, req: Request) -> Response:
        """``CONNECT host:port``: an opaque stream to the destination (gRPC and TLS clients in
        explicit mode send this). A known destination is balanced over its endpoints, meshed ones
        over mTLS; an address goes through its policy like any opaque connection; any other name is
        dialled as it is. Answered 200 once connected, then spliced; a failure is a 502/503."""
        host, port = split_authority(req.authority)
        if (host, port) in self._own_addrs or (port in {a[1] for a in self._own_addrs}
                                               and host in ("127.0.0.1", "localhost", "0.0.0.0")):
            raise ProxyError(f"CONNECT {host}:{port} would loop back into the proxy", 502)
        candidates: list[Endpoint] | str
        resolved = await self.discovery.resolve(f"{host}:{port}") if self.discovery is not None else None
        if resolved is not None and len(resolved.endpoints.state):
            ready = list(resolved.endpoints.state)
            self._rng.shuffle(ready)
            candidates = ready
        elif is_ip(host):
            candidates = await self._opaque_targets((host, port))
        else:
            candidates = [Endpoint((host, port))]
        if isinstance(candidates, str):
            self.metrics.tcp_error("outbound", "forbidden", (host, port))
            raise ProxyError(candidates, 403)
        if resolved is not None and not candidates:
            raise UnavailableError(f"{host}:{port} has no endpoints")
        mtls = self.identity is not None and self.identity.ready
        tries = [connect.reach(ep, mtls=mtls, opaque=True) for ep in candidates[:OPAQUE_CONNECT_ATTEMPTS]]
        last: Exception | None = None
        for t in tries:
            try:
                upstream, pending = await connect.connect_tcp(t, self.identity, self.connect_timeout,
                                                              self.handshake_timeout)
            except (OSError, TimeoutError) as e:
                self.metrics.tcp_error("outbound", "connect_timeout" if isinstance(e, TimeoutError)
                                       else "unexpected", t.addr)
                last = e
                continue
            dst = self.metrics.tcp("outbound", "dst", t.addr, tls=t.server_id is not None, server_id=t.server_id)
            dst.opened()
            return Response(200, [], EmptyBody(), upgrade=Upgraded(upstream, bytes(pending.buffer), dst))
        raise ProxyError(f"CONNECT {host}:{port}: {last}", 502)

    async def _opaque_targets(self, dst: Addr) -> list[Endpoint] | str:
        """Where an opaque connection to ``dst`` goes, in the order to try (str: refused, and why).

        A pod's address is itself. Anything else asks the control plane for the address's policy:
        an EgressNetwork may refuse it; a TCPRoute may send it to weighted Services; a Service's
        virtual IP is balanced over its endpoints. Without a policy (static discovery) a
        destination's endpoints are used when ``dst`` is not one of them."""
        if self.discovery is None:
            return [Endpoint(dst)]
        resolved = await self.discovery.resolve(format_addr(dst))
        endpoints = resolved.endpoints.state if resolved is not None else EndpointSet()
        known = endpoints.get(dst)
        if known is not None:
            return [known]
        watch = await self.discovery.policy_for_addr(dst)
        policy = watch.state if watch is not None else None
        if policy is not None and policy.forbidden is not None:
            return policy.forbidden
        if policy is not None and policy.opaque_backends:
            b = _pick(policy.opaque_backends, self._rng)
            if b.filters.invalid is not None:
                return b.filters.invalid
            if b.forward is not None:
                return [Endpoint.of(b.forward, identity=b.forward_identity)]
            if b.authority is not None:
                chosen = await self.discovery.resolve(b.authority)
                if chosen is not None:
                    endpoints = chosen.endpoints.state
        if endpoints:
            ready = list(endpoints)
            self._rng.shuffle(ready)  # connections spread evenly; a refused connect tries the next
            return ready
        return [Endpoint(dst)]

    # -- scrape time ---------------------------------------------------------------------------------
    def balancer_lines(self) -> list[str]:
        """Each cached destination's balancer: endpoints ready and pending, and its counters.

        ``outbound_http_balancer_endpoints`` is Linkerd's name; until the control plane streams
        parent and backend references, its series are labelled by the destination's authority."""
        out = ["# HELP outbound_http_balancer_endpoints Endpoints of a destination's balancer, by state.",
               "# TYPE outbound_http_balancer_endpoints gauge"]
        counters: list[str] = []
        for stack in self.logicals.values():
            bal = stack.balancer
            if not isinstance(bal, Balancer):
                continue
            who = f'authority="{escape_label(bal.name)}"'
            out.append(f'outbound_http_balancer_endpoints{{{who},endpoint_state="ready"}} {bal.endpoints_ready}')
            out.append(f'outbound_http_balancer_endpoints{{{who},endpoint_state="pending"}} {bal.endpoints_pending}')
            counters += [f"tether_balancer_failfast_total{{{who}}} {bal.failfast_total}",
                         f"tether_balancer_loadshed_total{{{who}}} {bal.loadshed_total}",
                         f"tether_balancer_ejections_total{{{who}}} {bal.ejections_total}"]
        for name, text in (("failfast", "Requests failed because the destination was in fail-fast."),
                           ("loadshed", "Requests refused because the balancer's queue was full."),
                           ("ejections", "Endpoints ejected by failure accrual.")):
            out += [f"# HELP tether_balancer_{name}_total {text}", f"# TYPE tether_balancer_{name}_total counter"]
            out += [c for c in counters if c.startswith(f"tether_balancer_{name}_total")]
        return out

    async def aclose(self) -> None:
        await self.logicals.aclose()


def _egress_host(policy: ClientPolicy, target: Logical) -> str:
    """The ``hostname`` label: the host an egress request named (empty for a Service's routes)."""
    if policy.parent.kind != "EgressNetwork":
        return ""
    return escape_label(target.authority.rsplit(":", 1)[0] if target.authority.count(":") == 1 else target.authority)


def _pick(backends: tuple[Backend, ...], rng: random.Random) -> Backend:
    """One backend by weight."""
    if len(backends) == 1:
        return backends[0]
    r = rng.random() * sum(b.weight for b in backends)
    for b in backends:
        r -= b.weight
        if r < 0:
            return b
    return backends[-1]


class _NoBackends:
    """A rule with no backend the proxy can use: 500, as Linkerd answers an empty distribution."""

    __slots__ = ("route",)

    def __init__(self, route: str) -> None:
        self.route = route

    async def __call__(self, req: Request) -> Response:
        raise ProxyError(f"route {self.route} has no backends", 500)


class _Concrete:
    """A TrafficSplit backend that is another destination: its own balancer over its endpoints,
    resolved on first use (no logical stack of its own: the request is counted once, by the apex)."""

    __slots__ = ("authority", "closers", "outbound", "service")

    def __init__(self, outbound: Outbound, authority: str, closers: list[Callable[[], object]]) -> None:
        self.outbound = outbound
        self.authority = authority
        self.closers = closers
        self.service: Service | None = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        svc = self.service
        if svc is not None:
            return svc(req)
        return self._first(req)

    async def _first(self, req: Request) -> Response:
        if self.service is None:
            ob = self.outbound
            resolved = await ob.discovery.resolve(self.authority) if ob.discovery is not None else None
            if resolved is None:
                raise UnavailableError(f"split backend {self.authority} is not a known destination")
            bal = ob._balancer(Logical(resolved.authority, watch=resolved.endpoints), self.closers)
            self.closers.append(bal.aclose)
            self.service = bal
        return await self.service(req)
