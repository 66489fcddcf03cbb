"""Machinery the HTTP/2 server and client codecs share, over :mod:`tether.core.http.h2proto`.

One :class:`H2Protocol` is an asyncio Protocol around one sans-I/O
:class:`~tether.core.http.h2proto.H2Connection`. It owns the things both sides need: the received
body (:class:`H2Body`, whose window is acknowledged only as its reader consumes it), sending a body
with flow control and trailers, coalesced writes, the transport's write backpressure.

The codec is an implementation detail behind the interfaces in :mod:`tether.proxy.http.h2codec`
(``H2ServerCodec``, ``H2ClientCodec`` and the error types), so a faster codec can replace this module,
h2server and h2client without touching the layers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final, cast

from tether.core.http import h2frames, h2proto
from tether.core.http.h2headers import trailer_fields
from tether.proxy.config import H2Settings
from tether.proxy.counters import TcpMetrics
from tether.proxy.http.body import Body, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.h2codec import CANCEL, INTERNAL_ERROR, H2ConnectionClosed, H2Error, H2StreamReset, error_code_for

__all__ = ["H2ConnectionClosed", "H2Error", "H2Protocol", "H2StreamReset", "error_code_for"]

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# How many closed streams the connection remembers (to tell a late frame after RST_STREAM from a
# protocol error); a few times the concurrency bound covers every frame still in flight after a reset.
CLOSED_STREAMS_REMEMBERED: Final = 1024

# Bytes parsed per loop iteration: 16 KiB of the smallest frames is about 1,000 PINGs or 800
# SETTINGS, a few milliseconds of work; a larger read is parsed over several iterations.
RECEIVE_SLICE: Final = 16 * 1024


class H2Body(PipeBody):
    """A received HTTP/2 body: DATA frames are acknowledged to the peer only once read."""

    # The body names its connection and stream (not a callback): calling the connection's methods
    # is a direct call when compiled, a closure is a generic call and two objects per body. The
    # stream by id, not by its state: the state holds the body (a cycle per call otherwise).
    __slots__ = ("_proto", "_stream_id", "discarded")

    def __init__(self, length: int | None, proto: H2Protocol, stream_id: int) -> None:
        # The peer's flow-control window bounds what is buffered, so PipeBody's own pause is unused.
        super().__init__(length)
        self._proto = proto
        self._stream_id = stream_id
        self.discarded = False

    async def read(self) -> bytes:
        data = await super().read()
        if data:
            self._proto._ack(self._stream_id, len(data))
        return data

    def take(self) -> bytes | None:
        data = super().take()
        if data:
            self._proto._ack(self._stream_id, len(data))
        return data

    def discard(self) -> None:
        if self.discarded:
            return
        buffered = self._buffered
        super().discard()
        self.discarded = True
        if buffered:
            self._proto._ack(self._stream_id, buffered)
        if not self.done:
            self._proto._body_discarded(self._stream_id)


class StreamState:
    """One stream's codec state."""

    __slots__ = (
        "body",
        "head",
        "headers_sent",
        "local_closed",
        "opened_at",
        "remote_closed",
        "reset",
        "response",
        "task",
        "trailers",
        "upload",
        "window_waiter",
    )

    def __init__(self) -> None:
        self.body: H2Body | None = None  # what the peer sends us on this stream
        self.trailers: Headers | None = None
        self.task: object | None = None  # server: the worker serving it (h2server), until it is done
        self.upload: asyncio.Task[None] | None = None  # client: the request body sender
        self.response: asyncio.Future[object] | None = None  # client: the Response, or the H2Error
        self.window_waiter: asyncio.Future[None] | None = None
        self.headers_sent = False
        self.head = False  # client: the request is a HEAD (its response's Content-Length has no body)
        self.opened_at = 0.0  # server: loop time the peer opened the stream (rapid-reset judgement)
        self.local_closed = False
        self.remote_closed = False
        self.reset: H2Error | None = None


class H2Protocol(asyncio.Protocol):
    """The half of an HTTP/2 endpoint that does not depend on being client or server."""

    def __init__(self, config: H2Settings, client_side: bool, stream_limit: int | None = None) -> None:
        self.config = config
        # tcp_read_bytes_total / tcp_write_bytes_total of the connection, when the proxy counts it
        # (the compiled class, not a protocol: its counters are then plain fields when compiled).
        self.tcp: TcpMetrics | None = None
        self._h2 = h2proto.H2Connection(
            client_side,
            max_concurrent_streams=config.h2_max_concurrent_streams,
            initial_window_size=config.h2_initial_window,
            max_header_list_size=config.max_header_bytes,
            stream_limit=stream_limit,
            max_closed_streams=CLOSED_STREAMS_REMEMBERED,
            max_continuations=config.h2_max_continuation_frames,
        )
        self._transport: asyncio.Transport | None = None
        # The transport's write and is_closing and the loop's call_soon, bound once per connection
        # (a method call on a Python object costs a lookup per call when compiled), and our own
        # _flush as a callback (a new bound method per schedule otherwise). Set by connection_made;
        # connection_lost drops them (the bound _flush would keep a cycle through this protocol).
        self._write: Callable[[bytes], object] | None = None
        self._is_closing: Callable[[], bool] | None = None
        self._call_soon: Callable[[Callable[[], None]], object] | None = None
        self._flush_cb: Callable[[], None] | None = None
        self._loop = asyncio.get_event_loop()
        # The loop's methods used per stream, bound once (no lookup per call when compiled).
        self._now: Callable[[], float] = self._loop.time
        self._new_future: Callable[[], asyncio.Future[Any]] = self._loop.create_future
        self._streams: dict[int, StreamState] = {}
        # The stream state last looked up (see _state); dropped whenever a state leaves the table.
        self._last_sid = 0
        self._last_st: StreamState | None = None
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._stall_timer: asyncio.TimerHandle | None = None
        self._backlog = b""  # read but not yet parsed (see RECEIVE_SLICE)
        self._closed = False
        self._close_error: H2Error | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = t = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self._now = loop.time
        self._new_future = loop.create_future
        self._write = t.write
        self._is_closing = t.is_closing
        self._call_soon = self._loop.call_soon
        self._flush_cb = self._flush
        self._h2.initiate_connection()
        # The connection window covers every stream's full window, so one slow reader can only
        # stall its own stream, never its siblings (stream windows bound the memory instead).
        extra = self.config.h2_max_concurrent_streams * self.config.h2_initial_window - 65535
        if extra > 0:
            self._h2.increment_flow_control_window(min(extra, 2**31 - 1 - 65535))
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.tcp is not None:
            self.tcp.read_bytes += len(data)
        if self._closed:
            return
        if self._backlog:
            # Reading should be paused while a backlog is parsed; whoever resumed it, pause again
            # so the backlog stays bounded by what one read delivers.
            self._backlog += data
            if self._transport is not None:
                self._transport.pause_reading()
            return
        if len(data) > RECEIVE_SLICE:
            # A read can hold thousands of small frames (a PING or SETTINGS flood): parse them a
            # slice per loop iteration, so no connection holds the loop for long.
            self._backlog = data[RECEIVE_SLICE:]
            data = data[:RECEIVE_SLICE]
            if self._transport is not None:
                self._transport.pause_reading()
            self._loop.call_soon(self._receive_backlog)
        self._receive(data)

    @property
    def parsing_backlog(self) -> bool:
        """True while bytes already read wait to be parsed (reading stays paused until then)."""
        return bool(self._backlog)

    def _receive_backlog(self) -> None:
        if self._closed:
            self._backlog = b""
            return
        if self._write_paused:
            return  # resume_writing continues (our answers must drain before we read on)
        data, self._backlog = self._backlog[:RECEIVE_SLICE], self._backlog[RECEIVE_SLICE:]
        self._receive(data)
        if self._closed:
            self._backlog = b""
        elif self._backlog:
            self._loop.call_soon(self._receive_backlog)
        elif not self._write_paused and self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _receive(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2proto.ProtocolError as e:
            # A GOAWAY naming the error is queued; send it and end the connection.
            self._flush()
            self._abort(H2ConnectionClosed(f"HTTP/2 protocol error from peer: {e}"), linger=1.0)
            return
        except Exception as bug:
            # A bug in the protocol code must not escape into the event loop: end this connection.
            log.exception("HTTP/2 connection failed on input: %r", bug)
            self._write_goaway(INTERNAL_ERROR, 0)
            self._abort(H2ConnectionClosed(f"HTTP/2 internal error: {bug}"))
            return
        for event in events:
            if self._closed:
                break  # e.g. rapid-reset protection ended the connection mid-batch
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._write = self._is_closing = self._call_soon = self._flush_cb = None
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        err = self._close_error or H2ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed by peer")
        self._fail_all(err)
        self._wake_drain(err)

    def pause_writing(self) -> None:
        # The peer is not reading: stop reading from it too, so the frames answered on their own
        # (PING and SETTINGS acks) cannot pile up in our write buffer (PING flood).
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()
        # A peer that reads nothing for write_stall_timeout holds our buffered frames for ever
        # otherwise (CVE-2019-9517, and a PING or SETTINGS flood from a peer that never reads).
        if self._stall_timer is None and self.config.write_stall_timeout > 0:
            self._stall_timer = self._loop.call_later(self.config.write_stall_timeout, self._on_write_stall)

    def _on_write_stall(self) -> None:
        self._stall_timer = None
        if self._write_paused and not self._closed:
            log.info("HTTP/2 peer read nothing for %gs; closing the connection", self.config.write_stall_timeout)
            t = self._transport
            self._abort(H2ConnectionClosed(f"peer read nothing for {self.config.write_stall_timeout:g}s"))
            if t is not None:
                t.abort()  # close() would wait for the unread buffer to drain

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._backlog:
            self._loop.call_soon(self._receive_backlog)
        elif self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
        self._wake_drain(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport: HTTP/2 has no half-closed connection

    # -- events -------------------------------------------------------------------------------
    def _dispatch(self, event: h2proto.Event) -> None:
        if isinstance(event, h2proto.DataReceived):
            self._on_data(event.stream_id, event.data, event.flow_controlled_length)
        elif isinstance(event, h2proto.StreamEnded):
            self._on_remote_end(event.stream_id)
        elif isinstance(event, h2proto.TrailersReceived):
            st = self._state(event.stream_id)
            if st is not None:
                st.trailers = event.headers
        elif isinstance(event, h2proto.WindowUpdated):
            if event.stream_id:
                st = self._state(event.stream_id)
                if st is not None:
                    self._wake_window(st)
            else:
                for st in self._streams.values():
                    self._wake_window(st)
        elif isinstance(event, h2proto.RemoteSettingsChanged):
            for st in self._streams.values():
                self._wake_window(st)
            self._settings_changed()
        elif isinstance(event, h2proto.StreamReset):
            self._on_reset(event.stream_id, event.error_code, event.remote)
        elif isinstance(event, h2proto.ConnectionTerminated):
            self._on_goaway(event.error_code, event.last_stream_id)
        else:
            self._on_other(event)

    def _on_data(self, stream_id: int, data: bytes, flow_len: int) -> None:
        st = self._state(stream_id)
        if st is None or st.body is None or st.body.discarded or st.body.done:
            self._ack(stream_id, flow_len)
            return
        if flow_len > len(data):
            self._ack(stream_id, flow_len - len(data))  # padding: nobody will read it
        st.body.feed(data)

    def _on_remote_end(self, stream_id: int) -> None:
        st = self._state(stream_id)
        if st is None:
            return
        st.remote_closed = True
        if st.body is not None:
            st.body.finish(st.trailers)
        self._maybe_forget(stream_id, st)

    def _on_reset(self, stream_id: int, code: int, remote: bool) -> None:
        st = self._state(stream_id)
        if st is None:
            return
        err = H2StreamReset(stream_id, code, remote)
        st.reset = err
        st.local_closed = st.remote_closed = True
        if st.body is not None:
            st.body.fail(err)
        self._wake_window(st)
        self._stream_reset(stream_id, st, err)
        self._maybe_forget(stream_id, st)

    def _on_goaway(self, error_code: int, last_stream_id: int) -> None:
        """Subclasses decide (streams at or below ``last_stream_id`` may still finish)."""

    def _on_other(self, event: h2proto.Event) -> None:
        """Events a subclass cares about (requests, responses)."""

    def _settings_changed(self) -> None:
        """The peer changed its settings (a client re-checks its stream budget)."""

    def _stream_reset(self, stream_id: int, st: StreamState, err: H2Error) -> None:
        """A stream was reset: cancel whatever works on it."""

    def _stream_forgotten(self, stream_id: int) -> None:
        """A stream finished on both sides and left the table."""

    # -- stream bookkeeping ---------------------------------------------------------------------
    def _state(self, stream_id: int) -> StreamState | None:
        """``self._streams.get(stream_id)``: consecutive events are mostly for one stream, and a
        lookup by id boxes the id (an allocation) first."""
        st = self._last_st
        if st is not None and self._last_sid == stream_id:
            return st
        st = self._streams.get(stream_id)
        if st is not None:
            self._last_sid = stream_id
            self._last_st = st
        return st

    def _new_body(self, stream_id: int, length: int | None) -> H2Body:
        return H2Body(length, self, stream_id)

    def _body_discarded(self, stream_id: int) -> None:
        """The reader of a body we receive abandoned it before its end (a client resets upstream)."""

    def _ack(self, stream_id: int, n: int) -> None:
        if self._closed or n <= 0:
            return
        self._h2.acknowledge_received_data(n, stream_id)
        self._schedule_flush()

    def _maybe_forget(self, stream_id: int, st: StreamState) -> None:
        if st.local_closed and st.remote_closed and self._state(stream_id) is st:
            del self._streams[stream_id]
            self._last_st = None
            self._stream_forgotten(stream_id)

    def _reset_stream(self, stream_id: int, st: StreamState, code: int) -> None:
        """Reset a stream from our side (idempotent)."""
        if st.reset is None:
            st.reset = H2StreamReset(stream_id, code, remote=False)
            if not self._closed:
                self._h2.reset_stream(stream_id, code)  # a no-op when already closed
                self._schedule_flush()
            if st.body is not None:
                st.body.fail(st.reset)
            self._wake_window(st)
        st.local_closed = st.remote_closed = True
        self._maybe_forget(stream_id, st)

    def _fail_all(self, err: H2Error) -> None:
        for sid, st in list(self._streams.items()):
            if st.reset is None:
                st.reset = err
            if st.body is not None:
                st.body.fail(err)
            self._wake_window(st)
            self._stream_reset(sid, st, err)
        self._streams.clear()
        self._last_st = None

    def _abort(self, err: H2Error, linger: float = 0.0) -> None:
        """End the connection and fail its streams.

        With ``linger``, the write side is shut after the pending frames (a GOAWAY) and what the
        peer still sends is read and dropped for up to ``linger`` seconds: closing at once with
        unread input makes the kernel send RST, which can destroy the GOAWAY before it is read.
        """
        self._close_error = self._close_error or err
        t = self._transport
        self._closed = True
        if t is not None and not t.is_closing():
            if linger > 0 and t.can_write_eof():
                t.write_eof()
                self._loop.call_later(linger, t.close)
            else:
                t.close()
        self._fail_all(err)

    # -- writing --------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        # Once closed (possibly lingering after write_eof), nothing more may be written.
        if data and not self._closed:
            write = self._write
            is_closing = self._is_closing
            if write is not None and is_closing is not None and not is_closing():
                write(data)
                if self.tcp is not None:
                    self.tcp.write_bytes += len(data)

    def _schedule_flush(self) -> None:
        # Coalesce frames from many streams into one write per loop iteration. Nothing queued
        # (e.g. consumed bytes that do not yet earn a WINDOW_UPDATE): no loop callback.
        if not self._flush_scheduled and self._h2.output_pending:
            self._flush_scheduled = True
            call_soon = self._call_soon
            flush = self._flush_cb
            if call_soon is not None and flush is not None:
                call_soon(flush)
            else:
                self._loop.call_soon(self._flush)

    def _write_goaway(self, error_code: int, last_stream_id: int) -> None:
        """Send GOAWAY now; in-flight streams at or below ``last_stream_id`` may still finish."""
        self._h2.goaway(error_code, last_stream_id)
        self._flush()

    def _wake_window(self, st: StreamState) -> None:
        w = st.window_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self, err: H2Error | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait_writable(self) -> None:
        if self._write_paused and not self._closed:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    def _check_open(self, st: StreamState) -> None:
        if st.reset is not None:
            raise st.reset.renewed()  # see H2Error.renewed
        if self._closed:
            err = self._close_error
            raise err.renewed() if err is not None else H2ConnectionClosed("connection closed")

    async def _send_data(self, stream_id: int, st: StreamState, data: bytes, end: bool) -> None:
        """Send DATA frames as the peer's windows allow, ending the stream if ``end``."""
        h2c = self._h2
        off, total = 0, len(data)
        while True:
            self._check_open(st)
            if off == total:
                if end:
                    h2c.send_data(stream_id, b"", end_stream=True)
                    self._schedule_flush()
                return
            window = h2c.local_flow_control_window(stream_id)
            if window <= 0:
                # A window the peer keeps shut would hold this stream and its buffered body for
                # ever (zero-window stall): after write_stall_timeout the stream is given up.
                st.window_waiter = self._loop.create_future()
                stall = self.config.write_stall_timeout
                try:
                    if stall > 0:
                        await asyncio.wait_for(st.window_waiter, stall)
                    else:
                        await st.window_waiter
                except TimeoutError:
                    raise H2StreamReset(stream_id, CANCEL, remote=False) from None
                finally:
                    st.window_waiter = None
                continue
            n = total - off  # min(window, frame size, rest) spelled out: min() is a generic call compiled
            if window < n:
                n = window
            if h2c.max_outbound_frame_size < n:
                n = h2c.max_outbound_frame_size
            last = off + n == total
            h2c.send_data(stream_id, data[off : off + n] if n != total else data, end_stream=end and last)
            off += n
            self._schedule_flush()
            if last and end:
                return
            if self._write_paused:
                self._flush()
                await self._wait_writable()

    def _send_taken(self, stream_id: int, st: StreamState, data: bytes, trailers: Headers | None) -> bool:
        """Send a whole body already taken (:meth:`Body.take`) and its trailers now, without a
        coroutine, when nothing has to wait: the peer's windows take it and the transport is not
        pushing back. False when something would: nothing is sent then (see _send_body)."""
        if self._write_paused or st.reset is not None or self._closed:
            return False
        h2c = self._h2
        n = len(data)
        if n and h2c.local_flow_control_window(stream_id) < n:
            return False
        if n or not trailers:
            h2c.send_data(stream_id, data, end_stream=not trailers)
        if trailers:
            h2c.send_headers(stream_id, trailer_fields(trailers), end_stream=True)
        st.local_closed = True
        self._schedule_flush()
        return True

    async def _send_body(self, stream_id: int, st: StreamState, body: Body, taken: bytes | None = None) -> None:
        """Send a whole body, then its trailers (or END_STREAM); ``taken``: all of it, already taken."""
        if taken is not None:
            trailers = body.trailers
            if taken or not trailers:
                await self._send_data(stream_id, st, taken, not trailers)
            if trailers:
                self._check_open(st)
                self._h2.send_headers(stream_id, trailer_fields(trailers), end_stream=True)
                self._schedule_flush()
            st.local_closed = True
            return
        while True:
            chunk = await body.read()
            if not chunk:
                break
            # A body that is all buffered can end the stream on its last DATA frame.
            end = body.is_end_known() and not body.trailers and _is_drained(body)
            await self._send_data(stream_id, st, chunk, end)
            if end:
                st.local_closed = True
                return
        self._check_open(st)
        trailers = body.trailers
        if trailers:
            self._h2.send_headers(stream_id, trailer_fields(trailers), end_stream=True)
            self._schedule_flush()
        else:
            await self._send_data(stream_id, st, b"", True)
        st.local_closed = True

    def _send_fields(self, stream_id: int, fields: Headers, end: bool) -> None:
        self._h2.send_headers(stream_id, fields, end_stream=end)
        self._schedule_flush()


def body_is_empty(body: Body) -> bool:
    """True for a body known to carry no data and no trailers (HEADERS can end the stream)."""
    t = type(body)
    if t is EmptyBody or t is Body:  # (``in`` a tuple of types: a generic comparison per type)
        return not body.trailers
    if isinstance(body, BytesBody):
        return body.length == 0 and not body.trailers
    return False


def add_content_length(fields: Headers, body: Body) -> None:
    """Give a message whose body length is known (an HTTP/1 message framed by Content-Length, whose
    framing header the codec consumed) a ``content-length`` field, as an HTTP/2 peer may be told
    (RFC 9113 section 8.1.1): a proxy that turns it back into HTTP/1 frames it by that length, not
    chunked (which an HTTP/1.0 peer cannot take, nor some applications in a request)."""
    length = body.length
    if length is None or length <= 0:
        return
    for k, _ in fields:
        if k == b"content-length":
            return
    fields.append((b"content-length", str(length).encode()))


def _is_drained(body: Body) -> bool:
    # After a read of a fully-buffered body, is there more? PipeBody returns everything buffered
    # in one read; BytesBody has one chunk.
    if isinstance(body, PipeBody):
        return body.done and not body._buf
    return isinstance(body, BytesBody)


def goaway_frame(error_code: int, last_stream_id: int) -> bytes:
    """A GOAWAY frame (RFC 9113 section 6.8): 9-byte frame header, last stream id, error code."""
    return h2frames.goaway_frame(last_stream_id, error_code)
