"""Per-route stacks from a destination's ServiceProfile, and the ``route_*`` metrics.

:class:`ProfileRouter` is the layer of a logical destination that has a profile: per request it
finds the route (the first whose condition matches, else the default route) and calls that
route's stack, built once per route and rebuilt when the profile changes (the control plane
streams new versions). A route's stack counts ``route_request_total``,
``route_response_total`` and ``route_response_latency_ms`` once per request (labels ``dst``,
``rt_route``), and ``route_actual_*`` once per attempt, below the retries, so the two differ by
what retries added.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from tether.core.routing.profile import DEFAULT_ROUTE, Profile, ProfileRoute, WeightedDst
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.layers.metrics import HttpMetricsService
from tether.proxy.metrics import HttpMetrics, escape_label, http_family
from tether.runtime.watch import Snapshot, Watched

log = logging.getLogger(__name__)


class RouteMetrics:
    """The route_* and route_actual_* series, one pair per (destination, route)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], HttpMetrics] = {}
        self.retryable: dict[tuple[str, str], int] = {}

    def series(self, family: str, dst: str, route: str) -> HttpMetrics:
        key = (family, dst, route)
        m = self._series.get(key)
        if m is None:
            label = f'direction="outbound",dst="{escape_label(dst)}",rt_route="{escape_label(route)}"'
            m = self._series[key] = HttpMetrics(label)
        return m

    def same_actual(self, dst: str, route: str) -> None:
        """A route without retries makes one try per request: its route_actual_* series is its
        route_* series (counted once, rendered under both names)."""
        self._series[("route_actual_", dst, route)] = self.series("route_", dst, route)

    def actual(self, dst: str, route: str) -> HttpMetrics:
        """The route_actual_* series of a route with retries: its own, even when the route made one
        try per request before (the shared series is split, both keeping the counts so far)."""
        key = ("route_actual_", dst, route)
        m = self._series.get(key)
        if m is None:
            return self.series("route_actual_", dst, route)
        if m is self._series.get(("route_", dst, route)):
            m = self._series[key] = m.copy()
        return m

    def lines(self) -> list[str]:
        out: list[str] = []
        for family in ("route_", "route_actual_"):
            series = [m for (f, _, _), m in list(self._series.items()) if f == family]
            if series:
                out.extend(http_family(series, family))
        if self.retryable:
            out.append("# HELP route_retryable_total Requests to a retryable route that failed and could be retried."
                       "\n# TYPE route_retryable_total counter\n")
            for (dst, route), n in list(self.retryable.items()):
                out.append(f'route_retryable_total{{direction="outbound",dst="{escape_label(dst)}",'
                           f'rt_route="{escape_label(route)}"}} {n}\n')
        return ["".join(out).rstrip("\n")] if out else []


RouteStackFactory = Callable[[ProfileRoute, Profile], Service]


class ProfileRouter:
    """Layer: send each request to its profile route's stack."""

    __slots__ = ("_authority", "_build", "_default", "_profile", "_stacks", "_sub", "_task")

    def __init__(self, authority: str, profile: Watched[Profile, Profile], build: RouteStackFactory) -> None:
        self._authority = authority
        self._build = build
        self._profile = profile.state
        self._stacks: list[Service | None] = [None] * len(self._profile.routes)
        self._default: Service | None = None
        self._sub = profile.subscribe()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        async for update in self._sub:
            new = update.state if isinstance(update, Snapshot) else update.change
            if new != self._profile:
                self._profile = new
                # Route stacks rebuilt from the new profile on next use.
                self._stacks = [None] * len(new.routes)
                self._default = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        profile = self._profile
        i = profile.route_index(req.method, req.path) if profile.routes else -1
        if i < 0:
            stack = self._default
            if stack is None:
                stack = self._default = self._build(DEFAULT_ROUTE, profile)
            return stack(req)
        stack = self._stacks[i]
        if stack is None:
            stack = self._stacks[i] = self._build(profile.routes[i], profile)
        return stack(req)

    def aclose(self) -> None:
        self._sub.close()
        self._task.cancel()


class RouteCounters:
    """Layer below the retries of a route: counts attempts as route_actual_* and, for a retryable
    route, the failures that could be retried (route_retryable_total)."""

    __slots__ = ("inner", "key", "metrics", "route")

    def __init__(self, inner: Service, metrics: RouteMetrics, dst: str, route: ProfileRoute) -> None:
        self.inner = HttpMetricsService(inner, metrics.actual(dst, route.name), per_endpoint=False)
        self.metrics = metrics
        self.route = route
        self.key = (dst, route.name)

    async def __call__(self, req: Request) -> Response:
        rsp = await self.inner(req)
        if self.route.retryable and self.route.is_failure(rsp.status):
            self.metrics.retryable[self.key] = self.metrics.retryable.get(self.key, 0) + 1
        return rsp


class Split:
    """Layer: each request to one of the destination's backends (TrafficSplit weights)."""

    __slots__ = ("_backends", "_random", "_services", "_thresholds")

    def __init__(self, backends: list[tuple[WeightedDst, Service]], rng: random.Random | None = None) -> None:
        self._backends = backends
        self._services = [svc for _, svc in backends]
        # Cumulative shares, precomputed: a request draws r in [0, 1) and takes the first backend
        # whose threshold is above it (each with probability weight / total).
        total = sum(b.weight for b, _ in backends)
        acc = 0
        self._thresholds: list[float] = []
        for b, _ in backends:
            acc += b.weight
            self._thresholds.append(acc / total if total > 0 else 1.0)
        self._random = (rng or random.Random()).random

    def __call__(self, req: Request) -> Awaitable[Response]:
        services = self._services
        if len(services) == 1:
            return services[0](req)
        r = self._random()
        for i, t in enumerate(self._thresholds):
            if r < t:
                return services[i](req)
        return services[-1](req)
