"""Tap layer: report requests to the taps that match them (see :mod:`tether.proxy.tap`).

While nobody taps, a request costs one check: ``hub.running`` is an empty list. While a tap
runs, a matching request queues a request-init event, a response-init event when the head comes
back and a response-end event when the body ends (with its byte count and gRPC status); the
events go to bounded queues and are dropped, never waited for, when a tap client reads too slowly.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from tether.core.discovery.endpoints import Addr
from tether.proxy.http.body import Body, BodyError, Headers
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.tap import INBOUND, Facts, Observer, TapHub

_UNKNOWN: Addr = ("0.0.0.0", 0)
_RESET_INTERNAL = 2  # HTTP/2 INTERNAL_ERROR: how Linkerd reports a stream that failed mid-body


class TapLayer:
    """Layer: a request any running tap matches is reported to it."""

    __slots__ = ("direction", "dst", "hub", "inner", "meshed", "running")

    def __init__(self, inner: Service, hub: TapHub, direction: int, dst: Addr | None = None,
                 meshed: bool = False) -> None:
        self.inner = inner
        self.hub = hub
        self.running = hub.running  # the hub's list, changed in place
        self.direction = direction
        self.dst = dst  # the target's address when the connection has no original destination
        self.meshed = meshed  # outbound: the destination is reached over mesh mTLS

    def __call__(self, req: Request) -> Awaitable[Response]:
        if self.running:
            return self._tapped(req)
        return self.inner(req)

    def _facts(self, req: Request) -> Facts:
        conn = req.conn
        if conn is None:
            return Facts(self.direction, _UNKNOWN, self.dst or _UNKNOWN, "", "", req)
        dst = conn.orig_dst or self.dst or conn.local
        if self.direction == INBOUND:
            src_tls = "true" if conn.tls else "not_provided_by_remote"
            return Facts(INBOUND, conn.peer, dst, src_tls, "", req)
        dst_tls = "true" if self.meshed else "no_identity"
        return Facts(self.direction, conn.peer, dst, "loopback", dst_tls, req)

    async def _tapped(self, req: Request) -> Response:
        now = time.monotonic()
        facts = self._facts(req)
        taps = [o for o in self.hub.observers if o.wants(facts, now)]
        if not taps:
            return await self.inner(req)
        stream = self.hub.next_stream()
        start = time.perf_counter_ns()
        for o in taps:
            o.offer(("req", stream, facts, req.headers if o.extract_headers else None))
        try:
            rsp = await self.inner(req)
        except BaseException:
            end_ns = time.perf_counter_ns() - start
            for o in taps:
                o.offer(("end", stream, facts, end_ns, 0, 0, None, _RESET_INTERNAL, None))
                o.request_done()
            raise
        head_ns = time.perf_counter_ns()
        for o in taps:
            o.offer(("rsp", stream, facts, head_ns - start, rsp.status,
                     rsp.headers if o.extract_headers else None))
        grpc = _is_grpc(rsp.headers)
        status = _grpc_status(rsp.headers) if grpc else None
        body = rsp.body
        if status is not None or body.is_end_known():
            # Trailers-only gRPC, or a body already whole: its end is known now.
            if status is None and grpc:
                status = _grpc_status(body.trailers)
            _ended(taps, stream, facts, start, head_ns, body.length or 0, status, None, body.trailers)
        else:
            rsp.body = TapBody(body, taps, stream, facts, start, head_ns, grpc)
        return rsp


def _ended(taps: list[Observer], stream: int, facts: Facts, start: int, head: int, nbytes: int,
           grpc_status: int | None, reset: int | None, trailers: Headers | None) -> None:
    now = time.perf_counter_ns()
    for o in taps:
        o.offer(("end", stream, facts, now - start, now - head, nbytes, grpc_status, reset,
                 trailers if o.extract_headers else None))
        o.request_done()


def _is_grpc(headers: Headers) -> bool:
    for k, v in headers:
        if k == b"content-type":
            return v.startswith(b"application/grpc")
    return False


def _grpc_status(headers: Headers | None) -> int | None:
    if headers:
        for k, v in headers:
            if k == b"grpc-status":
                return int(v) if v.isdigit() else 2
    return None


class TapBody(Body):
    """A response body that counts its bytes and reports its end to the taps."""

    def __init__(self, inner: Body, taps: list[Observer], stream: int, facts: Facts, start: int, head: int,
                 grpc: bool) -> None:
        self._inner = inner
        self._taps = taps
        self._stream = stream
        self._facts = facts
        self._start = start
        self._head = head
        self._grpc = grpc
        self._bytes = 0
        self._done = False
        self.length = inner.length

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    def is_end_known(self) -> bool:
        return self._inner.is_end_known()

    async def read(self) -> bytes:
        try:
            chunk = await self._inner.read()
        except BodyError:
            self._end(_RESET_INTERNAL)
            raise
        if chunk:
            self._bytes += len(chunk)
        else:
            self._end(None)
        return chunk

    def discard(self) -> None:
        self._inner.discard()
        self._end(None if self._inner.is_end_known() else _RESET_INTERNAL)

    def _end(self, reset: int | None) -> None:
        if self._done:
            return
        self._done = True
        trailers = self._inner.trailers
        status = _grpc_status(trailers) if self._grpc and reset is None else None
        _ended(self._taps, self._stream, self._facts, self._start, self._head, self._bytes, status, reset, trailers)

    def __del__(self) -> None:
        if not self._done:
            self._end(_RESET_INTERNAL)
