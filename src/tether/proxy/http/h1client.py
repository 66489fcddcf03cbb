"""HTTP/1.1 client side of the proxy: a pool of keep-alive connections to one endpoint.

``H1Pool`` is a Service: ``await pool(request)`` returns the upstream Response as soon as its
head arrives, with the body streaming behind it. A connection goes back to the pool when its
response body has been read to the end. A request that fails on a reused connection before any
response byte arrived (the server closed it while idle) is sent again once on a new connection.

An upstream may answer before it has read the whole request body (a 413 for a large declared
length, an early 401). Its response is relayed as any other; once that response is complete the
rest of the body is not sent, and the connection is closed instead of pooled (the request was
never finished on it, so its framing is lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import httptools

from tether.core.http import h1
from tether.proxy.config import ClientSettings
from tether.proxy.counters import TcpMetrics
from tether.proxy.errors import ConnectError, ConnectTimeoutError, UpstreamError
from tether.proxy.http.body import Body, BodyError, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.message import Request, Response, forward_headers

log = logging.getLogger(__name__)

Connector = Callable[[Callable[[], asyncio.Protocol]], Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]]]

_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})
# Futures made directly: loop.create_future() is one more call around the same constructor.
_Future: Final = asyncio.Future


@dataclass(slots=True)
class Upgraded:
    """The raw upstream byte stream after a ``101 Switching Protocols`` (or a tunnel's 200 to
    CONNECT, whose upstream connection has its own ``tcp`` series, closed with the splice)."""

    transport: asyncio.Transport
    leftover: bytes
    tcp: TcpMetrics | None = None


class _Stale(Exception):
    """A reused connection closed before any response byte: safe to send again."""


class H1ClientConnection(asyncio.Protocol):
    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # kept: get_running_loop() costs a getpid()
        # The parser holds bound methods of this protocol: a reference cycle, so it exists only
        # while connected (made by connection_made, dropped by connection_lost); else every closed
        # or never-connected connection would wait for a full cyclic collection.
        self._parser: httptools.HttpResponseParser | None = None
        self._reset_parser = False
        self._head: asyncio.Future[Response] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._in_head = True
        self._head_bytes = 0
        self._body: PipeBody | None = None
        self._method = b""
        self._got_bytes = False
        self._request_sent = True
        self._busy = False
        self._closed = False
        self._between = True  # llhttp is between two messages (no response begun)
        self._interim = False
        self.reused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._keep_alive = True
        self.idle_since = 0.0
        self._pump: asyncio.Task[None] | None = None
        self._pause: Callable[[], None] | None = None
        self._resume: Callable[[], None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._parser = httptools.HttpResponseParser(self)
        # Bound once: each response body pauses and resumes the same transport.
        t = self.transport
        assert t is not None
        self._pause = t.pause_reading
        self._resume = t.resume_reading

    def data_received(self, data: bytes) -> None:
        if self._head is None and self._body is None:
            # Bytes from upstream with no request outstanding: protocol violation.
            self._abort()
            return
        self._got_bytes = True
        if self._in_head:
            # Bounded like the request side: an upstream that never ends its head is cut off.
            # Only the bytes up to the end of the head count (the body may follow in this chunk).
            limit = self.pool.max_header_bytes
            if self._head_bytes + len(data) <= limit:
                # Within the limit even counting the whole read (the common case): no search.
                self._head_bytes += len(data)
            else:
                end = data.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > limit:
                self._fail(UpstreamError(
                    f"upstream response header block exceeds {self.pool.max_header_bytes} bytes"))
                self._abort()
                return
        parser = self._parser
        if parser is None:  # released: the connection is lost or handed over
            return
        if self._between and self._head is not None and self._fast_response(data):
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            self._upgraded(data[offset:])
        except (httptools.HttpParserError, h1.H1Error) as e:
            self._fail(UpstreamError(f"invalid HTTP/1 response from upstream: {e}"))
            self._abort()
            return
        if self._reset_parser and not self._closed:
            self._reset_parser = False
            self._parser = httptools.HttpResponseParser(self)
            self._between = True

    def eof_received(self) -> bool:
        # Close-delimited bodies end here; llhttp finishes them on feed_data(b"")? No: on EOF.
        if self._body is not None and self._body_until_close:
            self._body.finish(None)
            self._body = None
            self._keep_alive = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._parser = None  # see __init__
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._head is not None and not self._head.done():
            if self.reused and not self._got_bytes:
                self._head.set_exception(_Stale())
            else:
                reason = f"upstream closed the connection: {exc}" if exc else "upstream closed the connection"
                self._head.set_exception(UpstreamError(reason))
        if self._body is not None:
            if self._body_until_close and exc is None:
                self._body.finish(None)
            else:
                self._body.fail(BodyError("upstream connection lost mid-body"))
            self._body = None
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("upstream connection lost"))
        self.pool._lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        # An upstream that reads none of the request body for write_stall_timeout is cut off: the
        # request fails (502) instead of holding the client and the buffered body for ever.
        stall = self.pool.cfg.write_stall_timeout
        if self._stall_timer is None and stall > 0:
            self._stall_timer = self._loop.call_later(stall, self._on_write_stall)

    def _on_write_stall(self) -> None:
        self._stall_timer = None
        if self._write_paused and not self._closed:
            stall = self.pool.cfg.write_stall_timeout
            log.info("upstream read nothing of the request for %gs; closing the connection", stall)
            self._fail(UpstreamError(f"upstream read nothing of the request for {stall:g}s"))
            self._abort()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------
    _body_until_close = False

    def on_message_begin(self) -> None:
        self._between = False
        self._headers = []
        self._trailers = None
        self._in_head = True
        self._head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name.lower(), value))
        else:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        assert parser is not None  # called by it
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): the proxy handles Expect itself.
            self._interim = True
            return
        self._interim = False
        headers = self._headers
        framing = h1.check_response_head(status, headers, self._method)
        self._keep_alive = parser.should_keep_alive()
        self._respond(status, headers, framing)

    def _fast_response(self, data: bytes) -> bool:
        """Take a read that is exactly one simple HTTP/1.1 response with its whole Content-Length
        body without llhttp; False: not that case, llhttp parses the read."""
        method = self._method
        if method == b"HEAD" or method == b"CONNECT":  # no body, or a tunnel: llhttp's rules
            return False
        status, start = h1.parse_status_line(data)
        if status < 0:
            return False
        headers: h1.Headers = []
        end = h1.parse_fields(data, start, headers, h1.LLHTTP_RESPONSE_FIELDS)
        if end < 0:
            return False
        # One Content-Length of plain digits (no Transfer-Encoding: refused above), and the whole
        # body in this read. Anything else (duplicates, lists, a short read) is llhttp's to judge.
        length = h1.simple_content_length(headers)
        if length < 0 or length != len(data) - end:
            return False
        # What llhttp's callbacks would have done: a keep-alive HTTP/1.1 response (no Connection
        # header) whose body is all here, so held as bytes (no pipe, no backpressure to apply).
        self._trailers = None
        self._in_head = False
        self._interim = False
        self._keep_alive = True
        self._hand_over(Response(status, forward_headers(headers),
                                 BytesBody(data[end:]) if length else EmptyBody()))
        self._message_done()
        return True

    def _respond(self, status: int, headers: h1.Headers, framing: h1.Framing) -> None:
        """Hand the response whose head was read and checked to the waiting request."""
        out = forward_headers(headers)
        if status == 101:
            # The server side re-emits Upgrade (hop-by-hop) for the client: keep its value.
            out += [(k, v) for k, v in headers if k == b"upgrade"]
        body: Body
        if status == 101:
            body = EmptyBody()
        elif framing.has_body or (framing.content_length is None and not framing.chunked
                                  and self._method != b"HEAD" and status not in (204, 304)):
            self._body_until_close = framing.content_length is None and not framing.chunked
            if self._body_until_close:
                self._keep_alive = False
            self._body = PipeBody(framing.content_length, self._pause, self._resume, self.pool.cfg.body_buffer_high)
            body = self._body
        else:
            body = EmptyBody()
            if self._method == b"HEAD":
                # llhttp would wait for Content-Length bytes that never come after a HEAD.
                cl = next((v for k, v in headers if k == b"content-length"), None)
                if cl is not None and cl.isdigit():
                    body.length = int(cl)
                self._reset_parser = True
        self._hand_over(Response(status, out, body))
        if isinstance(body, EmptyBody) and status != 101:
            self._message_done()

    def _hand_over(self, resp: Response) -> None:
        fut = self._head
        self._head = None
        if fut is not None:
            # No done() call first (a method call per response): a future is done here only when
            # the sender was cancelled, which set_result reports.
            try:
                fut.set_result(resp)
            except asyncio.InvalidStateError:
                pass

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        self._between = True
        if self._interim:
            self._interim = False
            return
        if self._body is not None:
            self._body.finish(self._trailers)
            self._body = None
            self._message_done()

    # -- sending ------------------------------------------------------------------------------
    async def send(self, req: Request) -> Response:
        transport = self.transport
        assert transport is not None
        self._busy = True
        self._method = req.method
        self._got_bytes = False
        self._body_until_close = False
        self._in_head = True
        self._head_bytes = 0
        loop = self._loop
        self._head = _Future(loop=loop)
        body = req.body
        # The client's Connection: close is hop-by-hop: the pooled upstream connection stays open.
        headers = req.headers
        host = req.authority
        pump = None
        if type(body) is EmptyBody:
            framing = h1.Framing(0, False) if req.method in _BODY_METHODS else h1.NO_BODY
            transport.write(h1.encode_request_head(req.method, req.path, "1.1", headers, framing, host))
            self._request_sent = True
        elif body.is_end_known():
            data = await body.read()
            rest = await body.read() if data else b""
            data += rest
            framing = h1.Framing(len(data), False) if data or req.method in _BODY_METHODS else h1.NO_BODY
            transport.write(h1.encode_request_head(req.method, req.path, "1.1", headers, framing, host) + data)
            self._request_sent = True
        else:
            length = body.length
            framing = h1.Framing(length, False) if length is not None else h1.Framing(None, True)
            transport.write(h1.encode_request_head(req.method, req.path, "1.1", headers, framing, host))
            self._request_sent = False
            pump = self._pump = loop.create_task(self._send_body(body, framing))
        try:
            resp = await self._head
        except BaseException:
            if pump is not None:
                pump.cancel()
            raise
        if resp.status == 101:
            resp.upgrade = self._detach_upgrade()
        return resp

    async def _send_body(self, body: Body, framing: h1.Framing) -> None:
        transport = self.transport
        assert transport is not None
        left = framing.content_length
        try:
            while chunk := await body.read():
                transport.write(h1.encode_chunk(chunk) if framing.chunked else chunk)
                if left is not None:
                    left -= len(chunk)
                    if left <= 0:
                        break  # the declared length is out: the request is whole
                if self._write_paused:
                    await self._drain()
            if framing.chunked:
                transport.write(h1.encode_last_chunk(body.trailers))
            self._request_sent = True
            self._pump = None
            if self._head is None and self._body is None and self._busy:
                self._message_done()
        except (BodyError, ConnectionError) as e:
            log.debug("request body to upstream failed: %s", e)
            self._fail(UpstreamError(f"request body failed: {e}"))
            self._abort()

    async def _drain(self) -> None:
        if not self._write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    _upgrade_leftover: bytes | None = None

    def _upgraded(self, leftover: bytes) -> None:
        self._upgrade_leftover = leftover
        if self.transport is not None:
            self.transport.pause_reading()

    def _detach_upgrade(self) -> Upgraded:
        self.pool._detach(self)
        self._parser = None  # the connection is the splice's now (see __init__)
        t = self.transport
        assert t is not None
        return Upgraded(t, self._upgrade_leftover or b"")

    def _message_done(self) -> None:
        if not self._request_sent:
            # The response is complete before the request body was sent (an early 413 or 401):
            # stop sending it, and don't reuse a connection whose request was cut short.
            pump, self._pump = self._pump, None
            if pump is not None:
                pump.cancel()
            self._busy = False
            self._keep_alive = False
            log.debug("upstream answered before the request body was sent; closing that connection")
            self._close()
            return
        self._busy = False
        if self._keep_alive and not self._closed:
            self.pool._release(self)
        else:
            self._close()

    def _fail(self, err: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(err)
        if self._body is not None:
            self._body.fail(err)
            self._body = None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()


class H1Pool:
    """Keep-alive HTTP/1.1 connections to one endpoint; a Service."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self.connect_timeout = cfg.connect_timeout
        # Read per request: kept as native attributes (a settings field read costs ~160 instructions).
        self.max_header_bytes = cfg.max_header_bytes
        self._max_idle = cfg.pool_max_idle_per_endpoint
        self._connector = connector
        self._idle: list[H1ClientConnection] = []
        self._all: set[H1ClientConnection] = set()
        self._closed = False
        self._expiry: asyncio.TimerHandle | None = None

    async def __call__(self, req: Request) -> Response:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await conn.send(req)
            except _Stale:
                # Only a bodiless request can be sent again: a body was consumed by the first try.
                if not isinstance(req.body, EmptyBody):
                    raise UpstreamError("upstream closed a reused connection") from None
        conn = await self._connect()
        try:
            return await conn.send(req)
        except _Stale:
            raise UpstreamError("upstream closed the connection") from None

    def _take_idle(self) -> H1ClientConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                conn.reused = True
                return conn
        return None

    async def _connect(self) -> H1ClientConnection:
        loop = asyncio.get_running_loop()
        host, port = self.address
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._connector is not None:
                    _, proto = await self._connector(lambda: H1ClientConnection(self))
                else:
                    _, proto = await loop.create_connection(lambda: H1ClientConnection(self), host, port)
        except TimeoutError:
            raise ConnectTimeoutError(f"connect to {host}:{port} timed out after {self.connect_timeout:g}s") from None
        except OSError as e:
            raise ConnectError(f"connect to {host}:{port} failed: {e.strerror or e}") from None
        assert isinstance(proto, H1ClientConnection)
        self._all.add(proto)
        return proto

    def _release(self, conn: H1ClientConnection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn._close()
            return
        loop = conn._loop
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._expiry is None:
            self._expiry = loop.call_later(self.cfg.pool_idle_timeout, self._expire_idle)

    def _expire_idle(self) -> None:
        """Close the connections idle for ``pool_idle_timeout`` (one timer per pool, not per request)."""
        self._expiry = None
        if not self._idle:
            return
        loop = self._idle[0]._loop
        horizon = loop.time() - self.cfg.pool_idle_timeout
        keep: list[H1ClientConnection] = []
        for conn in self._idle:
            if conn.idle_since <= horizon:
                conn._close()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self._expiry = loop.call_later(max(oldest + self.cfg.pool_idle_timeout - loop.time(), 0.01),
                                           self._expire_idle)

    def _lost(self, conn: H1ClientConnection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _detach(self, conn: H1ClientConnection) -> None:
        self._all.discard(conn)

    @property
    def connections(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conn in list(self._idle):
            conn._close()
        self._idle.clear()
