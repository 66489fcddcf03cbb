"""HTTP/1.1 server side of the proxy: bytes from a client to Requests, Responses to bytes.

One protocol object per accepted connection. llhttp (httptools) parses; the RFC 9112 rules of
:mod:`tether.core.http.h1` reject ambiguous framing with 400 and close. Requests on a connection
are served in order (pipelining is allowed, bounded), each by ``await service(request)``;
bodies stream both ways through :class:`PipeBody` with backpressure.

A request that closes the connection (``Connection: close``, or HTTP/1.0 without keep-alive) is
the last one: whatever the client sent after it is dropped unread (RFC 9112 section 9.6), and the
connection closes after its response without a reset (the client's unread bytes would otherwise
make its kernel discard the response).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import httptools

from tether.core.http import h1
from tether.proxy.config import H1ServerSettings
from tether.proxy.counters import TcpMetrics
from tether.proxy.errors import ProxyError, rescue
from tether.proxy.http.body import Body, BodyError, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response, Service, forward_headers
from tether.proxy.tcp import Splice, linger_close

log = logging.getLogger(__name__)

_MAX_PIPELINED: Final = 16
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Futures made directly: loop.create_future() is one more call around the same constructor.
_Future: Final = asyncio.Future


class _ContinueBody(PipeBody):
    """A request body whose first read sends ``100 Continue`` to the client."""

    __slots__ = ("_send_continue",)

    def __init__(self, length: int | None, pause: Callable[[], None], resume: Callable[[], None],
                 high: int, send_continue: Callable[[], None]) -> None:
        super().__init__(length, pause, resume, high)
        self._send_continue: Callable[[], None] | None = send_continue

    def take(self) -> bytes | None:
        # Until the first read has sent ``100 Continue`` the client holds its body back: the body
        # is never wholly here, and taking it must not skip the interim answer.
        if self._send_continue is not None:
            return None
        return super().take()

    async def read(self) -> bytes:
        if self._send_continue is not None:
            send, self._send_continue = self._send_continue, None
            send()
        return await super().read()


class H1ServerProtocol(asyncio.Protocol):
    """Serves HTTP/1.x on one client connection."""

    def __init__(
        self,
        service: Service,
        conn: Connection,
        cfg: H1ServerSettings,
        registry: ConnectionRegistry | None = None,
        tcp: TcpMetrics | None = None,
    ) -> None:
        self.service = service
        self.conn = conn
        self.cfg = cfg
        # Read per request: kept as native attributes (a settings field read costs ~160 instructions).
        self._max_header_bytes = cfg.max_header_bytes
        self._idle_timeout = cfg.idle_timeout
        self.registry = registry
        self.tcp = tcp  # tcp_* series of the accepted connection (bytes read counted here)
        self.transport: asyncio.Transport | None = None
        # Kept: asyncio.get_running_loop() costs a getpid() system call on Python 3.11.
        self._loop = asyncio.get_running_loop()
        # The parser holds six bound methods of this protocol: a reference cycle, so it exists only
        # while the connection is this protocol's (made by connection_made; dropped when it is lost
        # or handed over). Left to the cyclic GC, every closed connection would wait for a full
        # collection, and each full collection examines every live connection.
        self._parser: httptools.HttpRequestParser | None = None
        # Requests read and not yet answered (at most _MAX_PIPELINED). A list, not a deque: a deque
        # allocates a 64-slot block up front (~0.7 KiB per connection, most of them idle).
        self._queue: list[Request] = []
        # One task serves the connection's requests in order. It waits on ``_wakeup`` between
        # requests (a future per request is cheaper than a task per request), and ends once the
        # connection has been idle for a tick of the timer (_on_tick): an idle keep-alive connection
        # holds no Task, future or frames (~0.7 KiB); its next request starts another task.
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[bool] | None = None
        self._serving = False  # a request is being served (not merely waiting for one)
        self._closing = False
        self._lost = False
        self._draining = False
        # Parse state of the request being read.
        self._headers: list[tuple[bytes, bytes]] = []
        self._url = b""
        self._in_head = False
        self._head_bytes = 0
        self._body: PipeBody | None = None
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._upgrade_leftover: bytes | None = None
        self._parse_error: h1.H1Error | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # loop time the timer fires
        self._deadline = 0.0
        self._deadline_cb: Callable[[], None] | None = None
        self._tick = min(cfg.header_read_timeout, cfg.idle_timeout) / 4
        self._write_paused = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self.requests_served = 0
        # Request-line check (llhttp tolerates repeated spaces): armed at each message boundary
        # that starts a read; the line's bytes gather in ``_line`` until its LF arrives.
        self._line_check = True
        self._line = bytearray()
        self._line_method: bytes | None = None  # of the checked line, until its head is parsed
        self._line_version = "1.1"
        self._line_end = -1  # the line's LF when the line began the read (the fast path's start)
        self._between = True  # the parser is between two messages
        self._final = False  # the request being read is the connection's last
        self._final_done = False  # ... and it has been read whole: later bytes are dropped

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        parser = self._parser = httptools.HttpRequestParser(self)
        # Any version parses; on_headers_complete answers 505 to a major other than 1 and reads a
        # higher 1.x as 1.1 (RFC 9110 section 2.5), which llhttp alone would refuse with 400.
        parser.set_dangerous_leniencies(lenient_version=True)
        if self.registry is not None:
            self.registry.add(self)
        self._arm(self._idle_timeout, self._on_idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tcp is not None:
            self.tcp.read_bytes += len(data)
        if self._parse_error is not None or self._upgrade_leftover is not None or self._final_done:
            return
        if self._line_check:
            if not self._check_request_line(data):
                return
            eol = self._line_end
            if eol > 0:
                self._line_end = -1
                if self._between and self._fast_head(data, eol):
                    return
        if self._in_head:
            # Only the bytes up to the end of the head count (the body may follow in this chunk).
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self._max_header_bytes:
                self._fail_parse(h1.H1Error(431, "request header block too large"))
                return
        parser = self._parser
        if parser is None:  # released: the connection is done, or handed over (upgrade)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0] if e.args else len(data)
            self._upgrade_leftover = data[offset:]
            self.transport.pause_reading()  # type: ignore[union-attr]
        except httptools.HttpParserError as e:
            if self._final_done:
                # Bytes after the last request (llhttp: "data after Connection: close"): not ours
                # to judge. The request is answered; the rest is never read.
                self._pause_reading()
                return
            # An H1Error raised in a callback reaches us wrapped as a callback error.
            err = e.__context__ if isinstance(e.__context__, h1.H1Error) else None
            if self._parse_error is None:
                self._fail_parse(err or h1.H1Error(400, f"malformed request: {e}"))
            return
        except h1.H1Error as e:
            self._fail_parse(e)
            return
        if self._final_done:
            self._pause_reading()
        elif self._between:
            # The read ended on a message boundary: the next byte starts a request line.
            self._line_check = True

    def _check_request_line(self, data: bytes) -> bool:
        """Gather the request line starting at this read; check it once whole. False: rejected."""
        if not self._line:
            # The commonest case: the read starts with a whole valid line (one scan).
            method_length, eol = h1.request_line_end(data)
            if eol > 0:
                self._line_check = False
                self._line_method = data[:method_length]
                self._line_version = "1.0" if data[eol - 2] == 0x30 else "1.1"
                self._line_end = eol
                return True
            # The common case: the whole line is in this read (no copy).
            start = 0
            n = len(data)
            while start < n:  # RFC 9112 2.2: skip empty lines ("\r\n" or "\n")
                c = data[start]
                if c == 0x0A:
                    start += 1
                elif c == 0x0D and start + 1 < n and data[start + 1] == 0x0A:
                    start += 2
                else:
                    break
            eol = h1.find_lf(data, start)
            if eol >= 0:
                if start == 0:
                    self._line_end = eol
                return self._judge_line(data[start:eol])
            if start < len(data):
                self._line += data[start:] if start else data
            return True
        line = self._line
        seen = len(line)
        line += data
        while line[:1] == b"\n" or line[:2] == b"\r\n":
            del line[: 1 if line[0] == 0x0A else 2]
            seen = 1
        eol = line.find(b"\n", seen - 1)
        if eol >= 0:
            self._line = bytearray()
            return self._judge_line(bytes(line[:eol]))
        if len(line) > self._max_header_bytes:
            self._line_check = False  # the header size limit answers this one
            self._line = bytearray()
        return True

    def _fast_head(self, data: bytes, eol: int) -> bool:
        """Serve a read that is exactly one simple bodiless HTTP/1.1 head (the request line at
        ``eol`` already checked) without llhttp; False: not that case, llhttp parses the read."""
        n = len(data)
        method = self._line_method
        if method is None or self._line_version != "1.1" or n > self._max_header_bytes \
                or data[n - 1] != 0x0A or data[n - 3] != 0x0A:
            return False
        headers: h1.Headers = []
        url = data[len(method) + 1:eol - 10]
        if not h1.fast_request_target(method, url) or h1.parse_fields(data, eol + 1, headers, h1.LLHTTP_FIELDS) != n:
            return False
        try:
            framing = h1.check_request_head("1.1", headers)
            authority, target = h1.split_target(method, url)
        except h1.H1Error:
            return False  # llhttp and on_headers_complete judge it, as any other head
        # What on_message_begin, on_url, on_header, on_headers_complete and on_message_complete
        # would have done (the head is whole: no header timer to arm; no body).
        self._line_method = None
        self.conn.first_byte_at = 0.0
        self._trailers = None
        self._cancel_timer()
        self._accept(method, "1.1", authority, target, headers, framing, None)
        self._line_check = True
        return True

    def _judge_line(self, line: bytes) -> bool:
        self._line_check = False
        try:
            method_length = h1.check_request_line(line)
        except h1.H1Error as e:
            self._fail_parse(e)
            return False
        # The head llhttp is about to parse starts with this line: its method and version are
        # known now, so on_headers_complete need not ask the parser for them.
        self._line_method = line[:method_length]
        self._line_version = "1.0" if line[len(line) - 2] == 0x30 else "1.1"  # "HTTP/1.x\r"
        return True

    def eof_received(self) -> bool:
        if self._body is not None and not self._body.done:
            self._body.fail(BodyError("client closed the connection mid-body"))
        # Keep the write side open while a response is in progress (half-closed client).
        return bool(self._queue) or self._serving

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._parser = None  # see __init__
        self._cancel_timer(release=True)
        if self.tcp is not None:
            self.tcp.closed(None if exc is None else "i/o")
            self.tcp = None
        self._cancel_timer()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._body is not None and not self._body.done:
            self._body.fail(BodyError("client connection lost"))
        task = self._task
        if task is not None and not task.done():
            wakeup = self._wakeup
            if wakeup is not None and not wakeup.done() and not self._queue and not self._serving:
                # Waiting for a next request (the usual end of a connection): let it return as
                # _on_tick does, rather than raise CancelledError through it (~8k instructions).
                self._wakeup = None
                self._task = None
                wakeup.set_result(False)
            else:
                task.cancel()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("client connection lost"))
        if self.registry is not None:
            self.registry.remove(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        # A client that reads nothing of its response for write_stall_timeout is cut off: the
        # response (and the upstream behind it) is not held for ever.
        if self._stall_timer is None and self.cfg.write_stall_timeout > 0:
            self._stall_timer = self._loop.call_later(self.cfg.write_stall_timeout, self._on_write_stall)

    def _on_write_stall(self) -> None:
        self._stall_timer = None
        if self._write_paused and not self._lost:
            log.info("client %s read nothing of its response for %gs; closing", self.conn.peer,
                     self.cfg.write_stall_timeout)
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
    def on_message_begin(self) -> None:
        self._between = False
        self._in_head = True
        self._head_bytes = 0
        self._headers = []
        self._url = b""
        self._trailers = None
        delay = self.cfg.header_read_timeout
        started = self.conn.first_byte_at
        if started:
            # The first request's head began while protocol detection was still reading it: its
            # time counts too (a slowloris client gets header_read_timeout in all, not twice).
            self.conn.first_byte_at = 0.0
            delay = max(0.0, started + delay - self._loop.time())
        self._arm(delay, self._on_header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self._max_header_bytes:
            raise h1.H1Error(431, "request header block too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name.lower(), value))
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_header_bytes:
            raise h1.H1Error(431, "request header block too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_timer()
        parser = self._parser
        assert parser is not None  # called by it
        method = self._line_method
        if method is not None:  # read from the request line as it was checked
            self._line_method = None
            version = self._line_version
        else:  # a pipelined request that began inside an earlier read
            version = parser.get_http_version()
            if version[:2] != "1.":
                raise h1.H1Error(505, "HTTP version not supported")
            if version != "1.0":
                version = "1.1"
            method = parser.get_method()
        headers = self._headers
        framing = h1.check_request_head(version, headers)
        # An absolute-form target carries the authority (explicit proxy use); Host is then ignored
        # (RFC 9112 section 3.2.2). CONNECT has only an authority.
        authority, target = h1.split_target(method, self._url)
        self._accept(method, version, authority, target, headers, framing, parser)

    def _accept(self, method: bytes, version: str, authority: bytes, target: bytes, headers: h1.Headers,
                framing: h1.Framing, parser: httptools.HttpRequestParser | None) -> None:
        """Queue the request whose head was read and checked. ``parser``: llhttp's, asked about
        the Connection header; None when the head had none (the fast path)."""
        expect_continue = False
        # Without a Connection header llhttp has seen no "Connection: upgrade" nor "close":
        # the parser need not be asked (each call into it costs as much as this whole loop).
        connection = False
        out_headers: list[tuple[bytes, bytes]] = []
        for kv in headers:
            k = kv[0]
            if k == b"host":
                if not authority:
                    authority = kv[1]
                continue
            if k == b"expect" and kv[1].lower() == b"100-continue":
                expect_continue = version == "1.1"
                continue
            if k == b"connection" or k == b"proxy-connection":  # llhttp reads both
                connection = True
            out_headers.append(kv)
        out_headers = forward_headers(out_headers)
        upgrade = connection and parser is not None and parser.should_upgrade() and method != b"CONNECT"
        if upgrade:
            up = next((v for k, v in headers if k == b"upgrade"), None)
            if up is not None:
                out_headers += [(b"connection", b"upgrade"), (b"upgrade", up)]
        body: Body
        if framing.has_body:
            transport = self.transport
            assert transport is not None
            if expect_continue:
                pb: PipeBody = _ContinueBody(
                    framing.content_length, self._pause_reading, self._resume_reading,
                    self.cfg.body_buffer_high, self._send_continue,
                )
            else:
                pb = PipeBody(framing.content_length, self._pause_reading, self._resume_reading,
                              self.cfg.body_buffer_high)
            self._body = pb
            body = pb
        else:
            self._body = None
            body = EmptyBody()
        req = Request(
            method=method,
            path=target,
            authority=authority,
            headers=out_headers,
            body=body,
            version=version,
            conn=self.conn,
        )
        # HTTP/1.1 keeps the connection unless "Connection: close"; HTTP/1.0 closes it unless
        # "Connection: keep-alive" (llhttp's rule, which it applies to the headers it parsed).
        if (connection or version == "1.0") and parser is not None and not parser.should_keep_alive():
            req.close = True
            self._final = True
        if upgrade or method == b"CONNECT":
            req.upgrade = True  # the connection is the upstream's after a 101 (or a 2xx to CONNECT)
        self._queue.append(req)
        if len(self._queue) >= _MAX_PIPELINED:
            self._pause_reading()
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        else:
            w = self._wakeup
            if w is not None:
                # Woken once: a second request before the task runs finds no waiter. No done()
                # call first (a method call per request): only a cancelled task's waiter is done.
                self._wakeup = None
                try:
                    w.set_result(True)
                except asyncio.InvalidStateError:
                    pass

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.feed(body)

    def on_message_complete(self) -> None:
        self._between = True
        if self._final:
            self._final_done = True
        if self._body is not None:
            self._body.finish(self._trailers)
            self._body = None

    # -- serving ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        loop = self._loop
        parked = False
        try:
            while not self._lost:
                if not self._queue:
                    w: asyncio.Future[bool] = _Future(loop=loop)
                    self._wakeup = w
                    if not await w:
                        # Parked by _on_tick, which has let go of this task: another may be
                        # serving already, so return without touching the connection's state.
                        parked = True
                        return
                    self._wakeup = None
                    continue
                self._serving = True
                while self._queue and not self._lost:
                    req = self._queue[0]
                    if self._parse_error is not None and len(self._queue) == 1 and isinstance(req.body, PipeBody) \
                            and req.body.done and not req.body.is_end_known():
                        # The body of this request was malformed before we began serving it:
                        # answer the framing error instead of forwarding half a request.
                        self._queue.clear()
                        break
                    close = await self._serve_one(req)
                    self._queue.pop(0)
                    self.requests_served += 1
                    if close or self._lost:
                        self._close_after_response()
                        return
                    if self._reading_paused and len(self._queue) < _MAX_PIPELINED:
                        self._resume_reading()
                self._serving = False
                if self._parse_error is not None:
                    self._write_error_and_close(self._parse_error)
                    return
                if self._draining:
                    self._close()
                    return
                self._arm(self._idle_timeout, self._on_idle_timeout)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, BodyError) as e:
            log.debug("client connection ended while responding: %s", e)
            self._abort()
        except Exception:
            log.exception("unexpected error serving HTTP/1 connection from %s", self.conn.peer)
            self._abort()
        finally:
            if not parked:
                self._serving = False

    async def _serve_one(self, req: Request) -> bool:
        """Serve one request; True when the connection must close afterwards."""
        try:
            resp = await self.service(req)
        except ProxyError as e:
            resp = rescue(e, req)
        except BodyError as e:
            resp = rescue(e, req)
            req.close = True
        upgraded = resp.upgrade is not None and req.upgrade and (
            resp.status == 101 or (200 <= resp.status < 300 and req.method == b"CONNECT"))
        close = req.close or self._draining or self._closing
        if resp.status >= 400 and isinstance(req.body, PipeBody) and not req.body.done:
            # An error answered before the request body arrived: the rest of the body won't be
            # read, so the connection ends with this response (and the client should stop).
            close = True
        if resp.header(b"connection") == b"close":
            close = True
        head, framing, body_close = self._response_head(req, resp, close)
        transport = self.transport
        assert transport is not None
        if upgraded:
            self._write(transport, head)
            self._start_splice(resp)
            return False
        body = resp.body
        if framing is None and not body_close:
            self._write(transport, head)  # no body
        elif type(body) is BytesBody and framing is not None and framing.content_length is not None \
                and not framing.chunked:
            # A body held whole (read in one piece from upstream, or made by the proxy): one
            # write, no awaits.
            data = body.take()
            if len(data) != framing.content_length:
                self._abort()
                raise BodyError("upstream body length differs from its Content-Length")
            self._write(transport, head + data)
        else:
            await self._write_body(body, head, framing)
        if req.body is not None and isinstance(req.body, PipeBody) and not req.body.done:
            # The service answered without reading the whole request body: the rest of the
            # stream is unparsed, so the connection can't be reused.
            return True
        return close or body_close or req.upgrade

    def _response_head(
        self, req: Request, resp: Response, close: bool
    ) -> tuple[bytes, h1.Framing | None, bool]:
        """Head bytes, body framing (None: no body) and whether the body is close-delimited."""
        status = resp.status
        headers = forward_headers(resp.headers)
        if status == 101:
            up = resp.header(b"upgrade")
            if up is not None:
                headers += [(b"connection", b"upgrade"), (b"upgrade", up)]
            return h1.encode_response_head(101, "1.1", headers, None), None, False
        if req.method == b"CONNECT" and 200 <= status < 300 and resp.upgrade is not None:
            # A tunnel: no framing (RFC 9110 section 9.3.6), the bytes that follow are the stream's.
            return h1.encode_response_head(status, "1.1", headers, None), None, False
        if close:
            headers.append((b"connection", b"close"))
        elif req.version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        version = "1.1"
        if req.method == b"HEAD" or status in (204, 304) or status < 200:
            length = resp.body.length
            framing = h1.Framing(length, False) if (length and req.method == b"HEAD") else None
            head = h1.encode_response_head(status, version, headers, framing)
            return head, None, False
        length = resp.body.length
        if length is not None and not resp.body.trailers:
            framing = h1.Framing(length, False)
        elif req.version == "1.1":
            framing = h1.Framing(None, True)
        else:
            # An HTTP/1.0 client: delimit by closing.
            return h1.encode_response_head(status, version, headers, None), h1.Framing(None, False), True
        return h1.encode_response_head(status, version, headers, framing), framing, False

    async def _write_body(self, body: Body, head: bytes, framing: h1.Framing | None) -> None:
        transport = self.transport
        assert transport is not None
        if framing is None:
            framing = h1.Framing(None, False)
        chunked = framing.chunked
        expected = framing.content_length
        if not chunked and expected is not None and body.is_end_known():
            # The whole body is already here (a small response): one write, no loop.
            data = await body.read()
            if len(data) != expected or await body.read():
                self._abort()
                raise BodyError("upstream body length differs from its Content-Length")
            self._write(transport, head + data)
            return
        sent = 0
        first = head
        try:
            while True:
                chunk = await body.read()
                if not chunk:
                    break
                sent += len(chunk)
                if expected is not None and sent > expected:
                    raise BodyError("upstream body longer than its Content-Length")
                out = h1.encode_chunk(chunk) if chunked else chunk
                if first:
                    self._write(transport, first + out)
                    first = b""
                else:
                    self._write(transport, out)
                if self._write_paused:
                    await self._drain()
        except BodyError as e:
            # Headers may be out already: the only honest signal left is to cut the connection.
            log.info("response body from upstream failed: %s", e)
            if first:
                self._write(transport, first)
            self._abort()
            raise
        if chunked:
            tail = h1.encode_last_chunk(body.trailers)
            self._write(transport, first + tail if first else tail)
        else:
            if first:
                self._write(transport, first)
            if expected is not None and sent != expected:
                self._abort()
                raise BodyError("upstream body shorter than its Content-Length")

    def _write(self, transport: asyncio.Transport, data: bytes) -> None:
        transport.write(data)
        if self.tcp is not None:
            self.tcp.write_bytes += len(data)

    async def _drain(self) -> None:
        if not self._write_paused:
            return
        self._drain_waiter = self._loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def _start_splice(self, resp: Response) -> None:
        from tether.proxy.http.h1client import Upgraded

        up = resp.upgrade
        assert isinstance(up, Upgraded)
        self._cancel_timer()
        self._parser = None  # the connection is the splice's: see __init__
        if self.registry is not None:
            self.registry.remove(self)
        leftover = self._upgrade_leftover or b""
        self._upgrade_leftover = b""
        tcp = self.tcp
        self.tcp = None  # the splice owns the connection's series from here on

        upstream_tcp = up.tcp

        def on_close(_splice: Splice, exc: Exception | None) -> None:
            if tcp is not None:
                tcp.closed(None if exc is None else "i/o")
            if upstream_tcp is not None:
                upstream_tcp.closed(None if exc is None else "i/o")

        splice = Splice(self.conn, on_close, src=tcp, dst=upstream_tcp)
        transport = self.transport
        assert transport is not None
        splice.attach(transport, up.transport, leftover, up.leftover)

    # -- errors, timeouts, lifecycle ----------------------------------------------------------
    def _send_continue(self) -> None:
        if self.transport is not None and not self._lost:
            self._write(self.transport, _CONTINUE)

    def _fail_parse(self, err: h1.H1Error) -> None:
        # Kept without the frames it was raised through: they hold this protocol (a cycle).
        err.__traceback__ = None
        err.__context__ = None
        self._parse_error = err
        self._cancel_timer()
        if self._body is not None:
            self._body.fail(BodyError(err.reason))
            self._body = None
        if self.transport is not None:
            self.transport.pause_reading()
        log.info("rejecting request from %s: %s", self.conn.peer, err.reason)
        if not self._serving and not self._queue:
            # Otherwise the requests read before the bad one are answered first (in order),
            # then _serve writes this error.
            self._write_error_and_close(err)

    def _write_error_and_close(self, err: h1.H1Error) -> None:
        data = (err.reason + "\n").encode()
        headers = [
            (b"l5d-proxy-error", err.reason.encode("ascii", "replace")),
            (b"content-type", b"text/plain"),
            (b"connection", b"close"),
        ]
        head = h1.encode_response_head(err.status, "1.1", headers, h1.Framing(len(data), False))
        transport = self.transport
        if transport is None or self._lost:
            return
        self._write(transport, head + data)
        self._closing = True
        self.connection_lost(None)  # this protocol is done: release its bookkeeping now
        linger_close(transport, self.cfg.linger_timeout)

    def _on_header_timeout(self) -> None:
        self._timer = None
        if not self._serving and self._in_head:
            self._fail_parse(h1.H1Error(408, "timed out reading request headers"))
        elif not self._serving:
            self._close()

    def _on_idle_timeout(self) -> None:
        self._timer = None
        if not self._serving and not self._in_head:
            self._close()

    # Header and idle timeouts share one deadline and one timer that ticks while a deadline is
    # set: setting a deadline per request is two attribute writes, not a call_later and a cancel.
    # A deadline earlier than the pending tick reschedules it, so none fires late.
    def _arm(self, delay: float, cb: Callable[[], None]) -> None:
        loop = self._loop
        deadline = self._deadline = loop.time() + delay
        self._deadline_cb = cb
        timer = self._timer
        if timer is None:
            self._schedule_tick(min(delay, self._tick))
        elif self._timer_at > deadline:
            # A deadline before the next tick (the first head's timeout counted from a byte that
            # arrived during detection) must not wait for that tick.
            timer.cancel()
            self._schedule_tick(delay)

    def _schedule_tick(self, delay: float) -> None:
        # At least 1 ms: uvloop answers call_later with a delay that rounds to 0 ms by call_soon,
        # whose handle has no when() (a head whose timeout ran out during detection got a 400).
        timer = self._timer = self._loop.call_later(max(delay, 0.001), self._on_tick)
        self._timer_at = timer.when()  # kept: asking the handle costs a call per request

    def _cancel_timer(self, release: bool = False) -> None:
        self._deadline_cb = None
        if release and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_tick(self) -> None:
        self._timer = None
        w = self._wakeup
        if w is not None and not w.done() and not self._queue and not self._serving:
            # Idle since the last tick at least: the serving task ends (see __init__).
            self._wakeup = None
            self._task = None
            w.set_result(False)
        cb = self._deadline_cb
        if cb is None or self._lost:
            return
        loop = self._loop
        left = self._deadline - loop.time()
        if left <= 0:
            self._deadline_cb = None
            cb()
        else:
            self._schedule_tick(min(left, self._tick))

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and self._parse_error is None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _close_after_response(self) -> None:
        """Close once the response is written, reading and dropping what the client still sends."""
        transport = self.transport
        if transport is None or self._lost:
            return
        if not transport.can_write_eof():
            self._close()  # TLS: close_notify ends it; there is no half-close
            return
        self._closing = True
        self._task = None  # called from that task, which returns right after
        self.connection_lost(None)  # this protocol is done: release its bookkeeping now
        linger_close(transport, self.cfg.linger_timeout)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return not self._serving and not self._in_head

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else after the response in progress."""
        self._draining = True
        if self.idle:
            self._close()


class ConnectionRegistry:
    """The live server connections of a listener, so SIGTERM can drain them."""

    def __init__(self) -> None:
        self.conns: set[H1ServerProtocol] = set()
        self._empty: asyncio.Event | None = None

    def add(self, c: H1ServerProtocol) -> None:
        self.conns.add(c)

    def remove(self, c: H1ServerProtocol) -> None:
        self.conns.discard(c)
        if not self.conns and self._empty is not None:
            self._empty.set()

    async def drain(self, timeout: float) -> bool:
        """Ask every connection to finish; True when all closed within ``timeout``."""
        for c in list(self.conns):
            c.drain()
        if not self.conns:
            return True
        self._empty = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
            return True
        except TimeoutError:
            return False
