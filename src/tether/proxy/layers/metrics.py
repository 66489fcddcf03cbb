"""HTTP metrics layer: request_total, response_latency_ms and response_total around an inner service.

request_total counts on entry; the latency (time to the response head) is observed when the inner
service returns; response_total counts when the response body ends, so a gRPC status sent in the
trailers classifies the response (as linkerd2-proxy does). A body already complete when the head
arrives (empty, buffered) is counted at once, without wrapping it.

Labels come from the request:

- ``req.extensions["metrics"]``: an :class:`HttpMetrics` already bound by the stack. When present,
  nothing else is read (the fastest path: bind once per endpoint or route).
- ``req.conn.direction``, or the layer's ``direction`` argument when there is no conn.
- ``req.extensions["authority"]`` (str): the ``authority`` label; default ``req.authority``.
- ``req.extensions["target_addr"]`` (tuple[str, int]): the ``target_addr/ip/port`` labels;
  default ``req.conn.orig_dst``.
- ``req.extensions["server_id"]`` (str): outbound, the identity the upstream proved (``tls="true"``).
- ``req.conn.tls`` / ``req.conn.client_id``: inbound mTLS and the client's identity.
- ``req.extensions["no_tls_reason"]`` (str): ``tls="no_identity"`` with this reason when not TLS
  (otherwise ``tls="disabled"``).
- ``req.extensions["metrics_labels"]`` (tuple of (name, value)): extra labels, e.g. dst_*, srv_*.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from tether.proxy.http.body import Body, BodyError, Headers
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.metrics import FAILURE, HttpKey, HttpMetrics, MetricsRegistry, StatusMetrics, classify

# error label values (bounded vocabulary: never an exception's text).
ERROR_UNEXPECTED: Final = "unexpected"  # the inner service raised before a response head
ERROR_BODY: Final = "body"  # the response body failed mid-stream
ERROR_CANCELED: Final = "canceled"  # the response body was dropped before its end


def _grpc_status(headers: Headers | None) -> int | None:
    if headers:
        for k, v in headers:
            if k == b"grpc-status":
                try:
                    return int(v)
                except ValueError:
                    return 2  # UNKNOWN: an unreadable status is not OK
    return None


def _is_grpc(rsp: Response) -> bool:
    ct = rsp.header(b"content-type")
    return ct is not None and ct.startswith(b"application/grpc")


class MeteredBody(Body):
    """A response body that counts response_total once, at its end (or when dropped)."""

    __slots__ = ("_done", "_grpc", "_inner", "_metrics", "_status", "_status_code")

    def __init__(
        self, inner: Body, metrics: HttpMetrics, status: StatusMetrics, status_code: int, grpc: bool
    ) -> None:
        self._inner = inner
        self._metrics = metrics  # holds the series live while the body streams
        self._status = status
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

    def __del__(self) -> None:
        # Nobody read the body to its end nor discarded it: still count the response.
        self._abandoned()


class HttpMetricsService:
    """Counts a request and its response into the registry; see the module doc for the labels."""

    __slots__ = ("_clock", "_direction", "_inner", "_registry")

    def __init__(
        self,
        inner: Service,
        registry: MetricsRegistry,
        *,
        direction: str = "outbound",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._inner = inner
        self._registry = registry
        self._direction = direction
        self._clock = clock

    def bind(self, req: Request) -> HttpMetrics:
        """The series this request counts into."""
        ext = req.extensions
        conn = req.conn
        if conn is not None:
            direction, target, tls = conn.direction, conn.orig_dst, conn.tls
            client_id = conn.client_id if tls else None
        else:
            direction, target, tls, client_id = self._direction, None, False, None
        if not ext:
            key: HttpKey = (
                direction,
                target,
                req.authority.decode("latin-1"),
                tls,
                client_id,
                None,
                None,
                (),
            )
            return self._registry.http_for(key)
        m = ext.get("metrics")
        if isinstance(m, HttpMetrics):
            return m
        authority = ext.get("authority")
        if not isinstance(authority, str):
            authority = req.authority.decode("latin-1")
        t = ext.get("target_addr")
        if isinstance(t, tuple):
            target = t
        server_id = ext.get("server_id")
        if not isinstance(server_id, str):
            server_id = None
        reason = ext.get("no_tls_reason")
        extra = ext.get("metrics_labels", ())
        key = (
            direction,
            target,
            authority,
            tls or server_id is not None,
            client_id,
            server_id,
            reason if isinstance(reason, str) else None,
            extra if isinstance(extra, tuple) else (),
        )
        return self._registry.http_for(key)

    async def __call__(self, req: Request, /) -> Response:
        # Bound after the inner stack ran: the router and balancer below decide the target
        # (authority, endpoint address) that labels the series.
        clock = self._clock
        start = clock()
        try:
            rsp = await self._inner(req)
        except BaseException as e:
            m = self.bind(req)
            m.requests += 1
            st = m.status(None)
            st.latency.observe((clock() - start) * 1000.0)
            # Not an Exception: the caller was cancelled (client gone, shutdown).
            error = ERROR_UNEXPECTED if isinstance(e, Exception) else ERROR_CANCELED
            st.response(FAILURE, None, error).count += 1
            raise
        m = self.bind(req)
        m.requests += 1
        code = rsp.status
        st = m.status(code)
        st.latency.observe((clock() - start) * 1000.0)
        grpc = _is_grpc(rsp)
        if grpc:
            head_status = _grpc_status(rsp.headers)
            if head_status is not None:
                # Trailers-only gRPC response: the status is already known.
                st.response(classify(code, head_status), head_status).count += 1
                return rsp
        body = rsp.body
        if body.is_end_known():
            # Already whole (empty, buffered, or fully received with the head): its end, and any
            # trailers, are known now, so count without wrapping the body.
            trailer_status = _grpc_status(body.trailers) if grpc else None
            if grpc and trailer_status is None:
                st.response(FAILURE).count += 1
            else:
                st.response(classify(code, trailer_status), trailer_status).count += 1
        else:
            rsp.body = MeteredBody(body, m, st, code, grpc)
        return rsp


def metrics_layer(
    registry: MetricsRegistry, *, direction: str = "outbound"
) -> Callable[[Service], HttpMetricsService]:
    """A layer for stack assembly: ``metrics_layer(registry, direction="inbound")(inner)``."""

    def layer(inner: Service) -> HttpMetricsService:
        return HttpMetricsService(inner, registry, direction=direction)

    return layer
