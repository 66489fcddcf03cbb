"""Per-route stacks from a destination's outbound policy (HTTPRoute, GRPCRoute) and their metrics.

:class:`PolicyRouter` is the layer of a logical destination the control plane serves a policy for.
Per request it picks the rule (:func:`~tether.core.routing.http_match.select_rule`) and calls that
rule's stack, built once per rule and rebuilt when a new policy arrives. It defers to the
destination's ServiceProfile when that profile has routes or a traffic split (a profile takes
precedence over routes, as in Linkerd), and to the plain stack while no policy is known. A request
no rule matches gets 404 (gRPC NOT_FOUND) with ``l5d-proxy-error``.

Metrics, Linkerd's families and labels (``outbound_http_route_*``, ``outbound_grpc_route_*``):

- ``request_duration_seconds`` (request start to response end) and ``request_statuses_total``
  (``http_status`` or ``grpc_status``, and ``error``), once per request, labelled ``parent_*``,
  ``route_*`` and ``hostname``;
- ``backend_requests_total``, ``backend_response_duration_seconds`` and
  ``backend_response_statuses_total``, once per attempt and backend, with ``backend_*`` too;
- ``retry_requests_total``, ``retry_successes_total``, ``retry_limit_exceeded_total`` and
  ``retry_overflow_total`` per route.
"""

from __future__ import annotations

import asyncio
import random
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final

from tether.core.routing.http_match import RequestInfo, select_rule
from tether.core.routing.policy import L5D_REQUEST_HEADERS, ClientPolicy, Filters, RouteRule
from tether.core.routing.profile import Profile
from tether.proxy.discovery import PolicyWatch
from tether.proxy.errors import (
    ConnectError,
    FailFastError,
    LoadShedError,
    ProxyError,
    ResponseTimeoutError,
    error_response,
    is_grpc_request,
)
from tether.proxy.http.body import Body, BodyError, BytesBody, Headers
from tether.proxy.http.message import Request, Response, Service
from tether.runtime.watch import Snapshot, Watched

REQUEST_BUCKETS = (0.05, 0.5, 1.0, 10.0)
RESPONSE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0)
_GRPC_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                      "UNAUTHENTICATED")
GRPC_NOT_FOUND: Final = 5
_MAX_DERIVED: Final = 64  # rules amended by l5d-* headers kept at once (the values are the client's)


class Histogram:
    """Seconds over fixed bounds; counts per bucket (cumulated at render)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class Series:
    """One label set's duration histogram and its statuses."""

    __slots__ = ("duration", "label", "requests", "statuses")

    def __init__(self, label: str, bounds: tuple[float, ...]) -> None:
        self.label = label
        self.requests = 0
        self.duration = Histogram(bounds)
        self.statuses: dict[tuple[int | None, str], int] = {}

    def done(self, seconds: float, status: int | None, error: str) -> None:
        self.duration.observe(seconds)
        key = (status, error)
        self.statuses[key] = self.statuses.get(key, 0) + 1


class RetryCounters:
    """outbound_*_route_retry_*_total of one route (the retry layer counts into it)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = 0  # retries sent
        self.successes = 0  # retries that succeeded
        self.limit_exceeded = 0  # failures the limit left unretried
        self.overflow = 0  # retries the body's size did not allow


def error_label(exc: BaseException) -> str:
    """Linkerd's ``error`` label for a request that ended in ``exc``."""
    if isinstance(exc, ResponseTimeoutError):
        return "RESPONSE_HEADERS_TIMEOUT" if "per try" in exc.reason else "REQUEST_TIMEOUT"
    if isinstance(exc, FailFastError):
        return "FAIL_FAST"
    if isinstance(exc, LoadShedError):
        return "LOAD_SHED"
    if isinstance(exc, (ConnectError, BodyError)):
        return "IO"
    if not isinstance(exc, Exception):
        return "CANCEL"
    return "UNKNOWN"


class PolicyRouteMetrics:
    """All outbound_http_route_* and outbound_grpc_route_* series of a proxy."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], Series] = {}
        self.backends: dict[tuple[str, str], Series] = {}
        self.retries: dict[tuple[str, str], RetryCounters] = {}

    def request(self, proto: str, label: str) -> Series:
        s = self.requests.get((proto, label))
        if s is None:
            s = self.requests[(proto, label)] = Series(label, REQUEST_BUCKETS)
        return s

    def backend(self, proto: str, label: str) -> Series:
        s = self.backends.get((proto, label))
        if s is None:
            s = self.backends[(proto, label)] = Series(label, RESPONSE_BUCKETS)
        return s

    def retry(self, proto: str, label: str) -> RetryCounters:
        r = self.retries.get((proto, label))
        if r is None:
            r = self.retries[(proto, label)] = RetryCounters(label)
        return r

    def lines(self) -> list[str]:
        return ["".join(self._render(proto)) for proto in ("http", "grpc")
                if any(p == proto for p, _ in self.requests) or any(p == proto for p, _ in self.backends)]

    def _render(self, proto: str) -> Iterator[str]:
        prefix = f"outbound_{proto}_route_"
        requests = [s for (p, _), s in list(self.requests.items()) if p == proto]
        backends = [s for (p, _), s in list(self.backends.items()) if p == proto]
        yield from _histogram(f"{prefix}request_duration_seconds",
                              "The time between request initialization and response completion", requests)
        yield from _statuses(f"{prefix}request_statuses_total", "Completed request-response streams", requests,
                             proto)
        name = f"{prefix}backend_requests_total"
        yield f"# HELP {name} The total number of requests dispatched to a route backend\n# TYPE {name} counter\n"
        for s in backends:
            yield f"{name}{{{s.label}}} {s.requests}\n"
        yield from _histogram(f"{prefix}backend_response_duration_seconds",
                              "The time between request completion and response completion", backends)
        yield from _statuses(f"{prefix}backend_response_statuses_total", "Completed responses", backends, proto)
        retries = [r for (p, _), r in list(self.retries.items()) if p == proto]
        for attr, help_ in (("limit_exceeded", "Retryable requests not sent due to retry limits"),
                            ("overflow", "Retryable requests not sent due to the retry budget or body size"),
                            ("requests", "Retry requests emitted"),
                            ("successes", "Successful responses to retry requests")):
            name = f"{prefix}retry_{attr}_total"
            yield f"# HELP {name} {help_}\n# TYPE {name} counter\n"
            for r in retries:
                yield f"{name}{{{r.label}}} {getattr(r, attr)}\n"


def _histogram(name: str, help_: str, series: list[Series]) -> Iterator[str]:
    yield f"# HELP {name} {help_}\n# TYPE {name} histogram\n"
    for s in series:
        h = s.duration
        counts = h.counts.copy()
        cum = 0
        for bound, n in zip((*(f"{b:g}" for b in h.bounds), "+Inf"), counts, strict=True):
            cum += n
            yield f'{name}_bucket{{{s.label},le="{bound}"}} {cum}\n'
        yield f"{name}_sum{{{s.label}}} {h.total:.6f}\n{name}_count{{{s.label}}} {cum}\n"


def _statuses(name: str, help_: str, series: list[Series], proto: str) -> Iterator[str]:
    yield f"# HELP {name} {help_}\n# TYPE {name} counter\n"
    for s in series:
        for (status, error), n in list(s.statuses.items()):
            if proto == "grpc":
                code = "" if status is None else (_GRPC_NAMES[status] if 0 <= status < 17 else "UNKNOWN")
                yield f'{name}{{{s.label},grpc_status="{code}",error="{error}"}} {n}\n'
            else:
                code = "" if status is None else str(status)
                yield f'{name}{{{s.label},http_status="{code}",error="{error}"}} {n}\n'


# -- measuring a request to its response's end -------------------------------------------------------


def _grpc_code(headers: Headers | None) -> int | None:
    if headers:
        for k, v in headers:
            if k == b"grpc-status":
                try:
                    return int(v)
                except ValueError:
                    return 2
    return None


class _EndBody(Body):
    """A response body that reports its end (trailers, or an error label) once."""

    __slots__ = ("_done", "_inner", "_report")  # `length` is Body's own (a native attribute when compiled)

    def __init__(self, inner: Body, report: Callable[[Headers | None, str], None]) -> None:
        self._inner = inner
        self._report = report
        self._done = False
        self.length = inner.length

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    async def read(self) -> bytes:
        try:
            chunk = await self._inner.read()
        except BodyError:
            self._end(None, "IO")
            raise
        if not chunk:
            self._end(self._inner.trailers, "")
        return chunk

    def is_end_known(self) -> bool:
        return self._inner.is_end_known()

    def discard(self) -> None:
        self._inner.discard()
        self._end(self._inner.trailers, "" if self._inner.is_end_known() else "CANCEL")

    def _end(self, trailers: Headers | None, error: str) -> None:
        if not self._done:
            self._done = True
            self._report(trailers, error)

    def __del__(self) -> None:
        if not self._done:
            self._end(None, "CANCEL")


class Measure:
    """Layer: time each request to its response's end and count its status into ``series``
    (``backend``: also count the request when it is sent)."""

    __slots__ = ("backend", "grpc", "inner", "series")

    def __init__(self, inner: Service, series: Series, *, grpc: bool, backend: bool = False) -> None:
        self.inner = inner
        self.series = series
        self.grpc = grpc
        self.backend = backend

    async def __call__(self, req: Request) -> Response:
        series = self.series
        if self.backend:
            series.requests += 1
        start = time.perf_counter()
        try:
            rsp = await self.inner(req)
        except BaseException as e:
            series.done(time.perf_counter() - start, None, error_label(e))
            raise
        grpc = self.grpc
        head_code = _grpc_code(rsp.headers) if grpc else None
        if head_code is not None or rsp.body.is_end_known():
            code = head_code if head_code is not None else (_grpc_code(rsp.body.trailers) if grpc else rsp.status)
            series.done(time.perf_counter() - start, code, "")
            return rsp

        def report(trailers: Headers | None, error: str) -> None:
            code = _grpc_code(trailers) if grpc else rsp.status
            series.done(time.perf_counter() - start, code, error)

        rsp.body = _EndBody(rsp.body, report)
        return rsp


# -- filters ------------------------------------------------------------------------------------------


class ApplyFilters:
    """Layer: a rule's (or backend's) filters: a redirect or an injected failure answers at once;
    header modifiers rewrite the request and the response."""

    __slots__ = ("filters", "grpc", "inner", "random")

    def __init__(self, inner: Service, filters: Filters, *, grpc: bool, rng: random.Random | None = None) -> None:
        self.inner = inner
        self.filters = filters
        self.grpc = grpc
        self.random = (rng or random.Random()).random

    async def __call__(self, req: Request) -> Response:
        f = self.filters
        if f.invalid is not None:
            raise ProxyError(f"route has an invalid filter: {f.invalid}", 500)
        if f.failure is not None and f.failure.fires(self.random()):
            if self.grpc:
                return error_response(200, f.failure.message or "injected failure", grpc=True,
                                      grpc_status=f.failure.status)
            return error_response(f.failure.status, f.failure.message or "injected failure")
        if f.redirect is not None:
            path = req.path.decode("latin-1")
            location = f.redirect.location(req.scheme.decode("latin-1"), req.authority.decode("latin-1"), path, None)
            return Response(f.redirect.status, [(b"location", location.encode("latin-1")),
                                                (b"content-length", b"0")], BytesBody(b""))
        if f.request_headers is not None:
            req.headers = f.request_headers.apply(req.headers)
        rsp = await self.inner(req)
        if f.response_headers is not None:
            rsp.headers = f.response_headers.apply(rsp.headers)
        return rsp


# -- the router ---------------------------------------------------------------------------------------

RuleStackFactory = Callable[[RouteRule, ClientPolicy], Service]


class PolicyRouter:
    """Layer: send each request to its rule's stack (or defer: profile routes, no policy yet)."""

    __slots__ = ("_authority", "_build", "_default", "_defer", "_derived", "_policy", "_profile", "_profile_router",
                 "_routes", "_stacks", "_subs", "_tasks")

    def __init__(self, authority: str, policy: PolicyWatch, profile: Watched[Profile, Profile] | None,
                 build: RuleStackFactory, default: Service, profile_router: Service | None) -> None:
        self._authority = authority
        self._build = build
        self._default = default
        self._profile_router = profile_router
        self._policy: ClientPolicy | None = None
        self._profile: Profile | None = None
        self._routes: tuple[Any, ...] = ()
        self._stacks: dict[int, Service] = {}
        self._derived: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], RouteRule] = {}
        self._defer: Service | None = default
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        self._set(policy.state, profile.state if profile is not None else None)
        sub = policy.subscribe()
        self._subs.append(sub)
        self._tasks.append(loop.create_task(self._follow(sub, is_policy=True)))
        if profile is not None:
            psub = profile.subscribe()
            self._subs.append(psub)
            self._tasks.append(loop.create_task(self._follow(psub, is_policy=False)))

    async def _follow(self, sub: Any, *, is_policy: bool) -> None:
        async for update in sub:
            new = update.state if isinstance(update, Snapshot) else update.change
            if is_policy:
                self._set(new, self._profile)
            else:
                self._set(self._policy, new)

    def _set(self, policy: ClientPolicy | None, profile: Profile | None) -> None:
        if policy is not self._policy:
            self._stacks = {}  # rule stacks rebuilt from the new policy on next use
            self._derived = {}
        self._policy = policy
        self._profile = profile
        self._routes = policy.routes if policy is not None else ()
        if profile is not None and (profile.routes or profile.dst_overrides) and self._profile_router is not None:
            self._defer = self._profile_router  # a ServiceProfile takes precedence over routes
        elif policy is None or not policy.applies:
            self._defer = self._default
        else:
            self._defer = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        defer = self._defer
        if defer is not None:
            return defer(req)
        policy = self._policy
        assert policy is not None
        chosen = select_rule(self._routes, RequestInfo(req.method, req.path, self._authority, req.headers))
        if chosen is None:
            return self._no_route(req)
        rule = chosen[0]
        if rule.allow_l5d_request_headers:
            rule = self._overridden(rule, req, policy.grpc)
        stack = self._stacks.get(id(rule))
        if stack is None:
            stack = self._stacks[id(rule)] = self._build(rule, policy)
        return stack(req)

    def _overridden(self, rule: RouteRule, req: Request, grpc: bool) -> RouteRule:
        """The rule as this request's ``l5d-*`` headers amend it (the headers are removed)."""
        values = {k: v for k, v in req.headers if k in L5D_REQUEST_HEADERS}
        if not values:
            return rule
        req.headers = [(k, v) for k, v in req.headers if k not in L5D_REQUEST_HEADERS]
        key = (id(rule), tuple(sorted(values.items())))
        derived = self._derived.get(key)
        if derived is None:
            if len(self._derived) >= _MAX_DERIVED:
                self._derived.clear()
                self._stacks = {}
            derived = self._derived[key] = rule.with_request_headers(values, grpc)
        return derived

    async def _no_route(self, req: Request) -> Response:
        grpc = is_grpc_request(req.version, req.header(b"content-type"))
        return error_response(404, f"no route found for {req.method.decode('latin-1')} "
                                   f"{req.path.decode('latin-1')}", grpc, GRPC_NOT_FOUND if grpc else None)

    def aclose(self) -> None:
        for sub in self._subs:
            sub.close()
        for task in self._tasks:
            task.cancel()
