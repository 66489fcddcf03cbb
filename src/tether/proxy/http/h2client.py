"""The HTTP/2 client codec: one connection to one endpoint, many requests multiplexed on it.

Usage (the endpoint layer connects, plain TCP or TLS with ALPN h2)::

    transport, client = await loop.create_connection(lambda: H2ClientConnection(config), host, port)
    resp = await client.send(req)     # returns at response headers; resp.body streams, has trailers
    client.usable                     # False after GOAWAY, an error or close(): pool a new one
    client.close()

Errors are :class:`~tether.proxy.http.h2conn.H2Error` subclasses with ``retryable`` set when the
server never processed the request (GOAWAY above its last stream id, REFUSED_STREAM, connection
unusable before the request was sent). A reset from upstream after the response head surfaces as a
``BodyError`` from ``resp.body.read()`` whose ``__cause__`` is an :class:`H2StreamReset` carrying the
code, so a server stream can propagate it; ``resp.body.discard()`` before the end resets upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

from tether.core.http import h2proto
from tether.core.http.h2headers import H2HeaderError, parse_response, request_fields
from tether.proxy.config import ClientSettings, H2Settings
from tether.proxy.errors import ConnectError, ConnectTimeoutError, StreamCapacityError, UpstreamError
from tether.proxy.http.body import Body, BodyError, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.h2codec import CANCEL, INTERNAL_ERROR, NO_ERROR, PROTOCOL_ERROR
from tether.proxy.http.h2conn import (
    H2ConnectionClosed,
    H2Error,
    H2Protocol,
    H2StreamReset,
    StreamState,
    add_content_length,
    body_is_empty,
)
from tether.proxy.http.message import Headers, Request, Response

if TYPE_CHECKING:
    from tether.proxy.http.h1client import Connector

__all__ = ["H2ClientConnection", "H2ConnectionClosed", "H2Error", "H2NoStreamSlot", "H2Pool", "H2StreamReset"]

log = logging.getLogger(__name__)


# The largest request body kept to send again when an HTTP/2 upstream refuses the stream.
MAX_REPLAY_BYTES: Final = 64 * 1024
_ASSUMED_MAX_STREAMS: Final = 100  # RFC 9113 section 6.5.2: SETTINGS_MAX_CONCURRENT_STREAMS "no smaller than 100"


class H2NoStreamSlot(H2ConnectionClosed):
    """The peer's stream limit kept the request waiting too long: the connection is busy, not broken."""


class H2ClientConnection(H2Protocol):
    """A multiplexed HTTP/2 client over an already-connected transport."""

    def __init__(self, config: H2Settings, max_pending: int | None = None) -> None:
        super().__init__(config, client_side=True)
        # Requests waiting for a stream slot (the peer's MAX_CONCURRENT_STREAMS); bounded.
        self._max_pending = max(256, config.h2_max_concurrent_streams) if max_pending is None else max_pending
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._goaway = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public ------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """True while new requests may be sent on this connection."""
        return not (self._closed or self._goaway)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def max_concurrent_streams(self) -> int:
        limit = self._h2.remote_max_concurrent_streams
        if not self._h2.remote_settings_received:
            # Until the peer's SETTINGS arrive, assume RFC 9113's recommended minimum rather than
            # "no limit": streams above the real limit would only be refused.
            return min(limit, _ASSUMED_MAX_STREAMS)
        return limit

    @property
    def has_free_slot(self) -> bool:
        """True when a request sent now would open its stream at once (no wait for a slot)."""
        return self.usable and not self._slot_waiters and len(self._streams) < self.max_concurrent_streams

    def start(self, transport: asyncio.Transport) -> None:
        """Take over an already-connected transport (e.g. from the endpoint layer)."""
        transport.set_protocol(self)
        self.connection_made(transport)

    async def send(self, req: Request) -> Response:
        """Send ``req``; return at the response head. The request body streams in the background."""
        if not self.usable:
            raise self._unusable()
        await self._acquire_slot()
        st = StreamState()
        st.head = req.method == b"HEAD"
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2proto.StreamIdsExhausted:
            self._goaway = True
            raise H2ConnectionClosed("stream ids exhausted", retryable=True) from None
        fields = request_fields(req.method, req.scheme, req.authority, req.path, req.headers)
        empty = body_is_empty(req.body)
        if not empty:
            add_content_length(fields, req.body)  # an HTTP/1 request's Content-Length
        st.response = self._new_future()
        self._streams[stream_id] = st
        try:
            self._send_fields(stream_id, fields, empty)
        except h2proto.H2UsageError as e:
            del self._streams[stream_id]
            self._last_st = None
            self._wake_slot()
            raise H2ConnectionClosed(f"cannot open stream: {e}", retryable=True) from e
        st.headers_sent = True
        if empty:
            st.local_closed = True
        else:
            # A body that is all here and fits the peer's windows goes now, in the same write as
            # the head, with no coroutine or Task; a larger or streaming one is sent by a Task.
            body = req.body
            rest = body.take()
            if rest is None or not self._send_taken(stream_id, st, rest, body.trailers):
                task = self._loop.create_task(self._upload(stream_id, st, body, rest))
                st.upload = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        try:
            out = await st.response
        except asyncio.CancelledError:
            # The caller gave up (its own client reset, a timeout): reset upstream too.
            self._reset_stream(stream_id, st, CANCEL)
            raise
        if isinstance(out, Response):
            return out
        # A failure is the future's result, not its exception, and a copy of it is raised: an
        # exception raised out of the future would keep this frame, whose ``st`` keeps the future
        # that keeps the exception (a reference cycle through the connection per failed call).
        assert isinstance(out, H2Error)
        raise out.renewed()

    def close(self) -> None:
        """Close the connection now (GOAWAY, then close); in-flight streams fail."""
        if self._transport is not None and not self._closed:
            self._write_goaway(NO_ERROR, 0)
            self._abort(H2ConnectionClosed("connection closed by proxy"))
        for t in list(self._tasks):
            t.cancel()

    async def ping(self, deadline: float) -> float:
        """Round-trip a PING within ``deadline`` seconds (keepalive / liveness); returns the RTT."""
        if not self.usable:
            raise self._unusable()
        start = self._loop.time()
        self._pong = self._loop.create_future()
        self._h2.ping(b"tether\x00\x00")
        self._schedule_flush()
        async with asyncio.timeout(deadline):
            await self._pong
        return self._loop.time() - start

    # -- internals -------------------------------------------------------------------------------
    _pong: asyncio.Future[None] | None = None

    def _unusable(self) -> H2ConnectionClosed:
        if self._close_error is not None and isinstance(self._close_error, H2ConnectionClosed):
            return H2ConnectionClosed(f"connection unusable: {self._close_error}", retryable=True)
        return H2ConnectionClosed("connection unusable (GOAWAY or closed)", retryable=True)

    async def _acquire_slot(self) -> None:
        if len(self._streams) < self.max_concurrent_streams and not self._slot_waiters:
            return
        if len(self._slot_waiters) >= self._max_pending:
            raise H2NoStreamSlot("too many requests waiting for a stream on this connection", True)
        try:
            async with asyncio.timeout(self.config.failfast_timeout):
                while True:
                    w: asyncio.Future[None] = self._loop.create_future()
                    self._slot_waiters.append(w)
                    try:
                        await w
                    finally:
                        if w in self._slot_waiters:
                            self._slot_waiters.remove(w)
                    if not self.usable:
                        raise self._unusable()
                    if len(self._streams) < self.max_concurrent_streams:
                        return
        except TimeoutError:
            raise H2NoStreamSlot("no stream slot within the fail-fast timeout", True) from None
        except asyncio.CancelledError:
            # A wake-up we were given but cannot use goes to the next waiter.
            if len(self._streams) < self.max_concurrent_streams:
                self._wake_slot()
            raise

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _wake_all_slots(self) -> None:
        while self._slot_waiters:
            w = self._slot_waiters.popleft()
            if not w.done():
                w.set_result(None)

    def _settings_changed(self) -> None:
        # A peer with no limit advertises 2**32-1: wake at most the waiters there are.
        free = min(self.max_concurrent_streams - len(self._streams), len(self._slot_waiters))
        for _ in range(max(0, free)):
            self._wake_slot()

    def _stream_forgotten(self, stream_id: int) -> None:
        self._wake_slot()
        if self._goaway and not self._streams and not self._closed:
            self._abort(H2ConnectionClosed("connection drained after GOAWAY", retryable=True))

    async def _upload(self, stream_id: int, st: StreamState, body: Body, taken: bytes | None = None) -> None:
        try:
            await self._send_body(stream_id, st, body, taken)
        except asyncio.CancelledError:
            body.discard()
            self._reset_stream(stream_id, st, CANCEL)
        except H2Error:
            body.discard()  # the stream or connection is gone; the response side reports it
        except BodyError:
            # The request body's producer failed (e.g. our client reset): reset upstream.
            err = H2StreamReset(stream_id, CANCEL, remote=False)
            self._reset_stream(stream_id, st, CANCEL)
            if st.response is not None and not st.response.done():
                st.response.set_result(err)
        except h2proto.H2UsageError as usage_err:
            self._reset_stream(stream_id, st, INTERNAL_ERROR)
            if st.response is not None and not st.response.done():
                st.response.set_result(H2ConnectionClosed(f"protocol error sending body: {usage_err}"))
        finally:
            self._maybe_forget(stream_id, st)

    def _on_other(self, event: h2proto.Event) -> None:
        if isinstance(event, h2proto.ResponseReceived):
            self._on_response(event.stream_id, event.headers, event.end_stream)
        elif isinstance(event, h2proto.PingAckReceived) and self._pong is not None and not self._pong.done():
            self._pong.set_result(None)

    def _on_response(self, stream_id: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        st = self._state(stream_id)
        if st is None or st.response is None or st.response.done():
            return
        try:
            status, headers = parse_response(fields)
        except H2HeaderError as e:
            self._reset_stream(stream_id, st, PROTOCOL_ERROR)
            st.response.set_result(H2ConnectionClosed(f"bad response head: {e}"))
            return
        body: Body
        if ended:
            body = EmptyBody()
            if st.head:
                # The length a GET would have (RFC 9110 section 9.3.2), for an HTTP/1 client's head.
                for k, v in headers:
                    if k == b"content-length" and v.isdigit():
                        body.length = int(v)
        else:
            length = None
            for k, v in headers:
                if k == b"content-length" and v.isdigit():
                    length = int(v)
            st.body = self._new_body(stream_id, length)
            body = st.body
        st.response.set_result(Response(status=status, headers=headers, body=body))

    def _body_discarded(self, stream_id: int) -> None:
        # The reader abandoned the response body before its end: stop the upstream stream.
        st = self._state(stream_id)
        if st is not None and not st.remote_closed:
            self._reset_stream(stream_id, st, CANCEL)

    def _stream_reset(self, stream_id: int, st: StreamState, err: H2Error) -> None:
        if st.response is not None and not st.response.done():
            st.response.set_result(err)
        if st.upload is not None and not st.upload.done():
            st.upload.cancel()

    def _on_goaway(self, error_code: int, last_stream_id: int) -> None:
        self._goaway = True
        # Streams the server never saw are safe to retry elsewhere.
        for sid, st in list(self._streams.items()):
            if sid > last_stream_id:
                err = H2ConnectionClosed(f"GOAWAY: stream {sid} above last stream {last_stream_id}", True)
                st.reset = err
                if st.body is not None:
                    st.body.fail(err)
                self._wake_window(st)
                self._stream_reset(sid, st, err)
                del self._streams[sid]
                self._last_st = None
        self._wake_all_slots()
        if error_code != NO_ERROR:
            self._abort(H2ConnectionClosed(f"GOAWAY({error_code}) from server"))
        elif not self._streams:
            self._abort(H2ConnectionClosed("connection drained after GOAWAY", retryable=True))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake_all_slots()
        for t in list(self._tasks):
            t.cancel()


class H2Pool:
    """HTTP/2 connections to one address (an endpoint's): requests share a connection until the
    peer's stream limit is reached on it, then another one is opened, up to
    ``h2_max_connections_per_endpoint``; only when all are full does a request wait for a stream."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self._connector = connector
        self._conns: list[H2ClientConnection] = []
        self._connecting: asyncio.Future[H2ClientConnection] | None = None

    async def send(self, req: Request) -> Response:
        """Send ``req`` on a connection with a free stream; errors are the proxy's (502, 503)."""
        # A request the upstream never processed (REFUSED_STREAM, a GOAWAY below its stream, a
        # connection lost before it was sent) is sent once more, but only whole: sending consumes
        # the body, so a small body that is already here is kept as bytes for the second try; one
        # still arriving goes once and is not retried.
        replay = _replayable(req)
        for attempt in range(2):
            conn = await self._connection()
            try:
                return await conn.send(req)
            except H2NoStreamSlot as busy:  # (a name of its own: compiled, ``e`` below has another type)
                raise StreamCapacityError(
                    f"HTTP/2 upstream {self.address[0]}:{self.address[1]} busy: {busy}") from None
            except H2Error as e:
                if not conn.usable and conn in self._conns:
                    self._conns.remove(conn)
                if e.retryable and attempt == 0 and replay is not None:
                    if replay:
                        req.body = BytesBody(replay[0], replay[1])
                    continue
                raise UpstreamError(f"HTTP/2 upstream error: {e}") from None
        raise UpstreamError("HTTP/2 upstream refused the request twice")

    def close(self) -> None:
        """Close every connection (in-flight streams fail)."""
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    async def _connection(self) -> H2ClientConnection:
        """A connection with a free stream; a new one when all are full and the pool may grow."""
        conns = self._conns
        for c in conns:  # the common case: the first connection is usable and has a free stream
            if c.has_free_slot:
                return c
        while True:
            conns = self._conns
            conns[:] = [c for c in conns if c.usable]
            for c in conns:
                if c.has_free_slot:
                    return c
            if self._connecting is not None:
                # One connect at a time; whoever waited looks again (the new one may be full too).
                await asyncio.shield(self._connecting)
                continue
            if len(conns) < max(1, self.cfg.h2_max_connections_per_endpoint):
                if conns:
                    log.debug("HTTP/2 endpoint %s:%d: %d connections at the stream limit; opening another",
                              self.address[0], self.address[1], len(conns))
                return await self._connect()
            # The pool is full: wait for a stream on the least busy connection.
            least = conns[0]
            for c in conns:
                if c.active_streams < least.active_streams:
                    least = c
            return least

    async def _connect(self) -> H2ClientConnection:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[H2ClientConnection] = loop.create_future()
        self._connecting = fut
        h2 = self.cfg.h2
        try:
            host, port = self.address
            timeout = self.cfg.connect_timeout
            try:
                async with asyncio.timeout(timeout):
                    if self._connector is not None:
                        _, proto = await self._connector(lambda: H2ClientConnection(h2))
                    else:
                        _, proto = await loop.create_connection(lambda: H2ClientConnection(h2), host, port)
            except TimeoutError:
                raise ConnectTimeoutError(f"connect to {host}:{port} timed out after {timeout:g}s") from None
            except OSError as e:
                raise ConnectError(f"connect to {host}:{port} failed: {e.strerror or e}") from None
            assert isinstance(proto, H2ClientConnection)
            self._conns.append(proto)
            fut.set_result(proto)
            return proto
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._connecting = None


def _replayable(req: Request) -> tuple[bytes, Headers | None] | tuple[()] | None:
    """What a second try of ``req`` needs: () for a body that is empty (it can be sent again as is);
    the bytes and trailers of a body wholly buffered and at most MAX_REPLAY_BYTES (``req.body`` is
    replaced by a copy it can send); None when the body cannot be sent twice."""
    body = req.body
    if isinstance(body, EmptyBody):
        return ()
    if isinstance(body, PipeBody):
        if not body.is_end_known() or body.buffered > MAX_REPLAY_BYTES:
            return None
    elif type(body) is BytesBody:
        if body.length is None or body.length > MAX_REPLAY_BYTES:
            return None
    else:
        return None
    data = body.take()  # all of it: it is buffered
    if data is None:
        return None
    trailers = body.trailers
    req.body = BytesBody(data, trailers)
    return data, trailers
