"""HTTP metrics layer: request_total, response_latency_ms and response_total around an inner service.

request_total counts on entry; the latency (time to the response head) is observed when the inner
service returns; response_total counts when the response body ends, so a gRPC status sent in the
trailers classifies the response (as linkerd2-proxy does). A body already complete when the head
arrives (empty, buffered) is counted at once, without wrapping it.

Series are bound once per target, never per request:

- :class:`HttpMetricsService` is built per target with that target's series. A request counts into
  ``req.meter`` when the endpoint stack that served it set one (:class:`EndpointMeter`, bound once
  per endpoint with its address, identity and labels), else into the layer's own series (a request
  that failed before reaching an endpoint: fail-fast, no route, timeout).
- :class:`InboundHttpMetrics` is built per inbound target (application port, TLS, client
  identity) and keeps one series per request authority.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

from tether.core.http.authority import normalize_authority
from tether.core.http.classify import parse_grpc_status
from tether.proxy.counters import FAILURE, HttpMetrics, StatusMetrics, classify
from tether.proxy.http.body import Body, BodyError, Headers
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.metrics import MetricsRegistry
from tether.proxy.targets import InboundTarget

# error label values (bounded vocabulary: never an exception's text).
ERROR_UNEXPECTED: Final = "unexpected"  # the inner service raised before a response head
ERROR_BODY: Final = "body"  # the response body failed mid-stream
ERROR_CANCELED: Final = "canceled"  # the response body was dropped before its end
_MAX_AUTHORITIES: Final = 1024  # bound series per inbound target (one per request authority)


def _grpc_status(headers: Headers | None) -> int | None:
    if headers:
        for k, v in headers:
            if k == b"grpc-status":
                return parse_grpc_status(v)  # an unreadable status is UNKNOWN (2), not OK
    return None


def _is_grpc(rsp: Response) -> bool:
    ct = rsp.header(b"content-type")
    return ct is not None and ct.startswith(b"application/grpc")


class MeteredBody(Body):
    """A response body that counts response_total once, at its end (or when dropped)."""

    __slots__ = ("_also", "_done", "_grpc", "_inner", "_metrics", "_status", "_status_code")

    def __init__(
        self, inner: Body, metrics: HttpMetrics, status: StatusMetrics, status_code: int, grpc: bool,
        also: StatusMetrics | None = None,
    ) -> None:
        self._inner = inner
        self._metrics = metrics  # holds the series live while the body streams
        self._status = status
        self._also = also  # a second series counting the same response (the route's)
        self._status_code = status_code
        self._grpc = grpc
        self._done = False
        self.length = inner.length

    async def read(self) -> bytes:
        try:
            chunk = await self._inner.read()
        except BodyError:
            self._finish(FAILURE, None, ERROR_BODY)
            raise
        if not chunk and not self._done:
            self._end()
        return chunk

    # The codecs read trailers while streaming (h2 decides END_STREAM from them): stay live.
    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    def is_end_known(self) -> bool:
        return self._inner.is_end_known()

    def discard(self) -> None:
        self._inner.discard()
        self._abandoned()

    def _abandoned(self) -> None:
        # The reader stopped early: a body that had fully arrived still ended well (a codec may
        # stop at the last byte); otherwise the response was cut short.
        if not self._done:
            if self._inner.is_end_known():
                self._end()
            else:
                self._finish(FAILURE, None, ERROR_CANCELED)

    def _end(self) -> None:
        grpc_status = _grpc_status(self._inner.trailers) if self._grpc else None
        if self._grpc and grpc_status is None:
            # gRPC without a grpc-status trailer: the call did not complete.
            self._finish(FAILURE, None, None)
            return
        self._finish(classify(self._status_code, grpc_status), grpc_status, None)

    def _finish(self, cls: str, grpc_status: int | None, error: str | None) -> None:
        if not self._done:
            self._done = True
            self._status.response(cls, grpc_status, error).count += 1
            if self._also is not None:
                self._also.response(cls, grpc_status, error).count += 1

    def __del__(self) -> None:
        # Nobody read the body to its end nor discarded it: still count the response.
        self._abandoned()


def count_response(m: HttpMetrics, rsp: Response, elapsed_ms: float, also: HttpMetrics | None = None) -> Response:
    """Count a request and its response head into ``m`` (and ``also``, a route's series); the
    response's end is counted when its body ends (the returned response may carry a wrapped body)."""
    m.requests += 1
    code = rsp.status
    st = m.status(code)
    st.latency.observe(elapsed_ms)
    st2: StatusMetrics | None = None
    if also is not None:
        also.requests += 1
        st2 = also.status(code)
        st2.latency.observe(elapsed_ms)
    grpc = _is_grpc(rsp)
    if grpc:
        head_status = _grpc_status(rsp.headers)
        if head_status is not None:
            # Trailers-only gRPC response: the status is already known.
            _count(st, st2, classify(code, head_status), head_status)
            return rsp
    body = rsp.body
    if body.is_end_known():
        # Already whole (empty, buffered, or fully received with the head): its end, and any
        # trailers, are known now, so count without wrapping the body.
        trailer_status = _grpc_status(body.trailers) if grpc else None
        if grpc and trailer_status is None:
            _count(st, st2, FAILURE, None)
        else:
            _count(st, st2, classify(code, trailer_status), trailer_status)
    else:
        rsp.body = MeteredBody(body, m, st, code, grpc, st2)
    return rsp


def _count(st: StatusMetrics, st2: StatusMetrics | None, cls: str, grpc_status: int | None) -> None:
    st.response(cls, grpc_status).count += 1
    if st2 is not None:
        st2.response(cls, grpc_status).count += 1


def count_error(m: HttpMetrics, e: BaseException, elapsed_ms: float, also: HttpMetrics | None = None) -> None:
    """Count a request whose inner service raised before a response head."""
    # Not an Exception: the caller was cancelled (client gone, shutdown).
    error = ERROR_UNEXPECTED if isinstance(e, Exception) else ERROR_CANCELED
    for series in (m, also):
        if series is not None:
            series.requests += 1
            st = series.status(None)
            st.latency.observe(elapsed_ms)
            st.response(FAILURE, None, error).count += 1


class HttpMetricsService:
    """Layer: count each request once, into the serving endpoint's series or this target's
    (``per_endpoint=False``: always this target's, as route metrics are)."""

    __slots__ = ("_clock", "_inner", "_stamp", "per_endpoint", "routes", "series")

    def __init__(self, inner: Service, series: HttpMetrics, *, per_endpoint: bool = True, routes: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self.series = series
        self.per_endpoint = per_endpoint
        self.routes = routes  # also count into the route series a RouteMeter below set
        self._clock = clock
        # The balancer below reuses the start (Request.started) only when both read the same clock.
        self._stamp = clock is time.monotonic

    async def __call__(self, req: Request, /) -> Response:
        clock = self._clock
        start = clock()
        if self._stamp:
            req.started = start
        try:
            rsp = await self._inner(req)
        except BaseException as e:
            m = req.meter if self.per_endpoint else None
            count_error(m if m is not None else self.series, e, (clock() - start) * 1000.0,
                        req.route_meter if self.routes else None)
            raise
        m = req.meter if self.per_endpoint else None
        return count_response(m if m is not None else self.series, rsp, (clock() - start) * 1000.0,
                              req.route_meter if self.routes else None)


class RouteMeter:
    """Layer at the top of a route's stack: the request counts into this route's series too, by the
    logical stack's metrics layer (one clock read and one response wrapper for both)."""

    __slots__ = ("inner", "series")

    def __init__(self, inner: Service, series: HttpMetrics) -> None:
        self.inner = inner
        self.series = series

    def __call__(self, req: Request) -> Awaitable[Response]:
        req.route_meter = self.series
        return self.inner(req)


class EndpointMeter:
    """Layer at the top of an endpoint's stack: the request counts into this endpoint's series
    (bound once, when the endpoint's stack is built)."""

    __slots__ = ("inner", "series")

    def __init__(self, inner: Service, series: HttpMetrics) -> None:
        self.inner = inner
        self.series = series

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the inner awaitable: no coroutine frame of its own.
        req.meter = self.series
        return self.inner(req)

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()


class InboundHttpMetrics:
    """Layer: count inbound requests into the series of their target and authority."""

    __slots__ = ("_by_authority", "_clock", "_inner", "_registry", "_target")

    def __init__(self, inner: Service, registry: MetricsRegistry, target: InboundTarget, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._inner = inner
        self._registry = registry
        self._target = target
        self._clock = clock
        self._by_authority: dict[bytes, HttpMetrics] = {}

    def _series(self, authority: bytes) -> HttpMetrics:
        m = self._by_authority.get(authority)
        if m is None:
            if len(self._by_authority) >= _MAX_AUTHORITIES:
                # Clients choose the Host header: keep the bindings bounded (the registry keeps
                # the series, and expires the ones nobody counts into any more).
                self._by_authority.clear()
            t = self._target
            try:
                label = normalize_authority(authority, 80)
            except ValueError:
                label = authority.decode("latin-1")
            m = self._by_authority[authority] = self._registry.http(
                "inbound", t.app, authority=label, tls=t.tls, client_id=t.client_id if t.tls else None)
        return m

    async def __call__(self, req: Request, /) -> Response:
        clock = self._clock
        start = clock()
        m = self._series(req.authority)
        try:
            rsp = await self._inner(req)
        except BaseException as e:
            count_error(m, e, (clock() - start) * 1000.0)
            raise
        return count_response(m, rsp, (clock() - start) * 1000.0)
