"""The HTTP/2 server codec: serves one accepted connection, one Service call per stream.

Usage (after protocol detection has read ``initial`` bytes, possibly the whole preface)::

    proto = H2ServerProtocol(service, conn, config)
    proto.start(transport, initial)       # set_protocol + connection_made + data_received(initial)
    ...
    await proto.drain(grace)              # on SIGTERM: GOAWAY, finish in-flight streams, close
    await proto.wait_closed()             # e.g. to untrack the connection

Or as a plain protocol factory: ``loop.create_server(lambda: H2ServerProtocol(...), ...)``.

Bounds: SETTINGS_MAX_CONCURRENT_STREAMS from the config (streams beyond it, counting handlers still
unwinding after a reset, get REFUSED_STREAM; so do streams beyond twice the bound that are still
open in the protocol state);
rapid reset (CVE-2023-44487): resets are judged by the work they cut short
(:mod:`tether.core.http.reset_budget`): past ``h2_max_resets_per_window`` rapid resets (unanswered
streams younger than ``h2_rapid_reset_age``) within ``h2_reset_window`` seconds, a peer that does
little else gets GOAWAY(ENHANCE_YOUR_CALM); a peer that also does real work (a proxy multiplexing
many clients) has its new streams refused one by one until it is back under the budget.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, cast

from tether.core.http import h2proto
from tether.core.http.h2headers import H2HeaderError, parse_request, response_fields
from tether.core.http.reset_budget import ResetBudget, Verdict
from tether.proxy.config import H2Settings
from tether.proxy.errors import rescue
from tether.proxy.http.body import EmptyBody
from tether.proxy.http.h2codec import CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM
from tether.proxy.http.h2conn import (
    H2ConnectionClosed,
    H2Error,
    H2Protocol,
    StreamState,
    add_content_length,
    body_is_empty,
    error_code_for,
)
from tether.proxy.http.message import Connection, Request, Response, Service, ServiceFn

log = logging.getLogger(__name__)

__all__ = ["H2ServerProtocol"]

# Stream handlers a connection keeps waiting between streams. A stream is served by an idle worker
# (a long-lived Task woken with the stream) rather than a Task of its own: creating, registering
# and freeing a Task per stream cost ~10% of a proxied gRPC call. A connection that had more
# streams at once than this creates workers for the extra ones and lets them end afterwards.
IDLE_WORKERS: Final = 4


class _Job:
    """A stream handed to a worker."""

    __slots__ = ("req", "st", "stream_id")

    def __init__(self, stream_id: int, st: StreamState, req: Request) -> None:
        self.stream_id = stream_id
        self.st = st
        self.req = req


class _Worker:
    """A Task that serves one connection's streams, one at a time (see IDLE_WORKERS)."""

    __slots__ = ("cancels", "started", "task", "wake")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[_Job | None] | None = None  # set while idle
        self.started = False  # it has begun its current stream (a cancel then lands in it)
        self.cancels = 0  # cancels issued for its current stream (spent when the stream ends)


class H2ServerProtocol(H2Protocol):
    """Serves HTTP/2 on one connection: each stream becomes ``await service(Request)``."""

    def __init__(self, service: Service | ServiceFn, conn: Connection, config: H2Settings) -> None:
        # A client may open streams before it has read our SETTINGS (RFC 9113 section 6.5.2 gives
        # it no limit until then): streams over the advertised bound get REFUSED_STREAM from
        # _on_request (counting handlers still unwinding); the protocol state refuses streams
        # beyond twice the bound on its own.
        super().__init__(config, client_side=False, stream_limit=2 * config.h2_max_concurrent_streams + 16)
        self._service = service
        self._conn = conn
        # Per-stream settings read once (the settings are frozen; reading a field of the
        # interpreted dataclass is a generic attribute lookup when compiled).
        self._max_streams = config.h2_max_concurrent_streams
        self._idle_timeout = config.idle_timeout
        self._busy: set[_Worker] = set()  # workers serving a stream (or unwinding one that was reset)
        self._idle: list[_Worker] = []
        self._quiet: list[asyncio.Future[None]] = []  # drain: woken when no stream is served
        self._resets = ResetBudget(config.h2_max_resets_per_window, config.h2_reset_window,
                                   config.h2_rapid_reset_age)
        self._shedding = False
        self._draining = False
        self._goaway_last: int | None = None
        self._peer_goaway_last: int | None = None  # the client sent GOAWAY: no stream above this
        self._done: asyncio.Future[None] | None = None
        self._lost = False  # connection_lost has run
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the connection last had no stream
        self.streams_served = 0

    # -- public ------------------------------------------------------------------------------
    def start(self, transport: asyncio.Transport, initial: bytes = b"") -> None:
        """Take over ``transport`` after detection; ``initial`` is what detection already read."""
        transport.set_protocol(self)
        self.connection_made(transport)
        if initial:
            self.data_received(initial)
        if not transport.is_reading() and not transport.is_closing() and not self.parsing_backlog \
                and not self._write_paused:
            # The detector may have paused it; a large first read parsed in slices keeps it paused.
            transport.resume_reading()

    @property
    def active_streams(self) -> int:
        return len(self._busy)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown: GOAWAY(last stream id), let in-flight streams finish, then close.

        Streams still running after ``grace`` seconds (default: the config's grace period)
        are cancelled and the connection closed.
        """
        if grace is None:
            grace = self.config.shutdown_grace_period
        if not self._draining:
            self._draining = True
            self._goaway_last = self._h2.highest_inbound_stream_id
            self._write_goaway(NO_ERROR, self._goaway_last)
        try:
            async with asyncio.timeout(grace):
                await self._wait_closed_or_idle()
        except TimeoutError:
            for w in list(self._busy):
                self._cancel(w)
        self._close()

    async def wait_closed(self) -> None:
        """Return when the connection has closed and every stream handler has finished."""
        if self._done is None:
            self._done = self._loop.create_future()
            self._maybe_done()
        await asyncio.shield(self._done)

    def _maybe_done(self) -> None:
        if self._lost and not self._busy and self._done is not None and not self._done.done():
            self._done.set_result(None)

    # -- internals -------------------------------------------------------------------------------
    async def _wait_closed_or_idle(self) -> None:
        while self._busy and not self._closed:
            w = self._loop.create_future()
            self._quiet.append(w)
            await w

    def _close(self) -> None:
        if self._transport is not None and not self._closed:
            self._flush()
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # advertises h2_max_concurrent_streams
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._lost = True
        for w in list(self._busy):
            self._cancel(w)
        idle, self._idle = self._idle, []
        for w in idle:
            if w.wake is not None and not w.wake.done():
                w.wake.set_result(None)  # no more streams: the worker ends
        self._wake_quiet()
        self._maybe_done()

    def _on_other(self, event: h2proto.Event) -> None:
        if isinstance(event, h2proto.RequestReceived):
            self._on_request(event.stream_id, event.headers, event.end_stream)

    def _on_request(self, stream_id: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        st = StreamState()
        now = st.opened_at = self._now()
        self._streams[stream_id] = st
        if ended:
            st.remote_closed = True
        if self._draining and self._goaway_last is not None and stream_id > self._goaway_last:
            self._reset_stream(stream_id, st, REFUSED_STREAM)
            return
        if self._peer_goaway_last is not None and stream_id > self._peer_goaway_last:
            # A new stream after the client's own GOAWAY: a protocol violation, refused.
            self._reset_stream(stream_id, st, REFUSED_STREAM)
            return
        if len(self._busy) >= self._max_streams:
            # Handlers of reset streams may still be unwinding; they count against the bound.
            self._reset_stream(stream_id, st, REFUSED_STREAM)
            if len(self._busy) > self._h2.open_inbound_streams:
                # The peer holds fewer streams open than we run handlers for: the slots are taken
                # by streams it reset, and it opens more at once. That is a rapid reset too, even
                # when its HEADERS and RST_STREAM come in such large reads that every stream after
                # the first hundred of a read is refused (and its reset never reaches a handler).
                self._judge(self._resets.reset(now, 0.0, False))
            return
        if self._shedding and self._resets.verdict(now) is not Verdict.OK:
            # Too many rapid resets from a peer that also does real work: refuse this stream
            # (clients retry REFUSED_STREAM) rather than end the connection its other calls share.
            self._reset_stream(stream_id, st, REFUSED_STREAM)
            return
        self._shedding = False
        try:
            head = parse_request(fields)
        except H2HeaderError as e:
            log.debug("stream %d: bad request head: %s", stream_id, e)
            self._reset_stream(stream_id, st, PROTOCOL_ERROR)
            return
        if ended:
            body: EmptyBody | object = EmptyBody()
        else:
            cl = _content_length(head.headers)
            st.body = self._new_body(stream_id, cl)
            body = st.body
        req = Request(
            method=head.method,
            path=head.path,
            authority=head.authority,
            scheme=head.scheme,
            headers=head.headers,
            body=body,  # type: ignore[arg-type]
            version="2",
            conn=self._conn,
        )
        self._resets.opened(now)  # work starts for this stream (refused ones cost nothing)
        job = _Job(stream_id, st, req)
        if self._idle:
            w = self._idle.pop()
            wake = w.wake
            w.wake = None
            w.started = False
            st.task = w
            self._busy.add(w)
            if wake is not None:
                wake.set_result(job)
        else:
            w = _Worker()
            st.task = w
            self._busy.add(w)
            w.task = self._loop.create_task(self._work(w, job))
        # A pending idle timer stays: when it fires it finds the connection busy, or idle for less
        # than the timeout (and waits for the rest). Cancelling and re-arming a timer per stream
        # costs more than the stream's own bookkeeping.
        self.streams_served += 1

    def _stream_reset(self, stream_id: int, st: StreamState, err: H2Error) -> None:
        if st.task is not None:
            self._cancel(cast(_Worker, st.task))
        if getattr(err, "remote", False):
            self._count_reset(st)

    def _count_reset(self, st: StreamState) -> None:
        now = self._loop.time()
        self._judge(self._resets.reset(now, now - st.opened_at, st.headers_sent))

    def _judge(self, verdict: Verdict) -> None:
        if verdict is Verdict.OK or self._closed:
            return
        window = self.config.h2_reset_window
        if verdict is Verdict.SHED:
            if not self._shedding:
                log.warning("HTTP/2 connection from %s: %d rapid stream resets in %.0fs; refusing new streams"
                            " until it is back under %d", self._conn.peer, self._resets.rapid_resets, window,
                            self.config.h2_max_resets_per_window)
            self._shedding = True
            return
        log.warning(
            "closing HTTP/2 connection from %s: %d rapid stream resets in %.0fs (rapid reset)",
            self._conn.peer,
            self._resets.rapid_resets,
            window,
        )
        self._write_goaway(ENHANCE_YOUR_CALM, self._h2.highest_inbound_stream_id)
        self._abort(H2ConnectionClosed("rapid reset: too many stream resets"), linger=1.0)

    def _on_goaway(self, error_code: int, last_stream_id: int) -> None:
        # The client opens no more streams and will close the connection itself. Until it does,
        # its in-flight requests finish and its other frames (PING, WINDOW_UPDATE) are answered:
        # RFC 9113 section 7 forbids special behaviour for an unknown error code, and closing at
        # once would drop answers already owed. The idle timeout bounds a client that never closes.
        if error_code != NO_ERROR:
            log.debug("client sent GOAWAY with error code %d", error_code)
        self._peer_goaway_last = self._h2.highest_inbound_stream_id
        if not self._busy:
            self._arm_idle_timer()

    def _cancel(self, w: _Worker) -> None:
        """Cancel the stream ``w`` serves. A worker that has not begun it yet finds it reset and
        skips it (a cancel then would land between streams)."""
        if w.started and w.task is not None and not w.task.done():
            w.cancels += 1
            w.task.cancel()

    def _stream_done(self, w: _Worker) -> None:
        self._busy.discard(w)
        if not self._busy:
            self._arm_idle_timer()
            self._maybe_done()
            self._wake_quiet()

    def _wake_quiet(self) -> None:
        quiet, self._quiet = self._quiet, []
        for q in quiet:
            if not q.done():
                q.set_result(None)

    async def _work(self, w: _Worker, job: _Job) -> None:
        """Serve streams handed to ``w`` until the connection ends or enough workers are idle."""
        task = w.task
        assert task is not None
        while True:
            st = job.st
            w.started = True
            if st.reset is None:  # else: reset before it began (the old handler never ran either)
                w.cancels = 0
                try:
                    await self._serve(job.stream_id, st, job.req)
                except asyncio.CancelledError:
                    pass  # _serve takes a stream's cancel itself; any other is counted below
                except Exception:
                    log.exception("HTTP/2 stream %d: handler failed", job.stream_id)
            st.task = None
            self._stream_done(w)
            # The cancels issued for that stream are spent; any other one is for the worker itself
            # (the loop shutting down): it ends.
            for _ in range(w.cancels):
                task.uncancel()
            w.cancels = 0
            if task.cancelling() or self._lost or len(self._idle) >= IDLE_WORKERS:
                return
            wake: asyncio.Future[_Job | None] = self._new_future()
            w.wake = wake
            self._idle.append(w)
            try:
                got = await wake
            except asyncio.CancelledError:
                if w in self._idle:
                    self._idle.remove(w)
                if wake.done() and not wake.cancelled() and wake.result() is not None:
                    # A stream was handed over just before: it is abandoned as a cancelled stream.
                    handed = wake.result()
                    assert handed is not None
                    handed.st.task = None
                    self._reset_stream(handed.stream_id, handed.st, CANCEL)
                    self._stream_done(w)
                raise
            if got is None:
                return
            job = got

    def _arm_idle_timer(self) -> None:
        # A connection with no stream for idle_timeout is closed (GOAWAY first), so clients that
        # connect and go quiet hold no resources for ever. The idle time counts from now.
        if not self._closed and self._idle_timeout > 0:
            self._idle_since = self._now()
            if self._idle_timer is None:
                self._idle_timer = self._loop.call_later(self.config.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._busy or self._closed:
            return  # busy: the end of its last stream arms the timer again
        left = self._idle_since + self.config.idle_timeout - self._loop.time()
        if left > 0:  # streams came and went since the timer was set: idle for less than the timeout
            self._idle_timer = self._loop.call_later(left, self._on_idle)
            return
        self._draining = True
        self._write_goaway(NO_ERROR, self._h2.highest_inbound_stream_id)
        self._close()

    def _stream_forgotten(self, stream_id: int) -> None:
        if self._draining and not self._streams and not self._busy:
            self._loop.call_soon(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self._draining and not self._streams and not self._busy:
            self._close()

    async def _serve(self, stream_id: int, st: StreamState, req: Request) -> None:
        resp: Response | None = None
        try:
            try:
                resp = await self._service(req)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the service failed before a response: the rescue answers
                if st.reset is not None or self._closed:
                    return
                log.debug("stream %d: service failed: %r", stream_id, e)
                resp = rescue(e, req)
            if st.reset is not None or self._closed:
                resp.body.discard()
                return
            fields = response_fields(resp.status, resp.headers)
            empty = body_is_empty(resp.body)
            if not empty or req.method == b"HEAD":
                # An answer from an HTTP/1 upstream keeps its Content-Length (a HEAD's: the length
                # a GET would have).
                add_content_length(fields, resp.body)
            self._send_fields(stream_id, fields, empty)
            st.headers_sent = True
            if empty:
                st.local_closed = True
            else:
                # A body that is all here (a unary gRPC answer usually is) goes at once, no coroutine.
                rest = resp.body.take()
                if rest is None or not self._send_taken(stream_id, st, rest, resp.body.trailers):
                    await self._send_body(stream_id, st, resp.body, rest)
            if not st.remote_closed and st.reset is None:
                # Complete response while the client still sends: tell it to stop (RFC 9113 8.1).
                if st.body is not None:
                    st.body.discard()
                self._reset_stream(stream_id, st, NO_ERROR)
        except asyncio.CancelledError:
            # Client reset or connection gone: release the upstream (its stream gets reset).
            if resp is not None:
                resp.body.discard()
            if st.body is not None:
                st.body.fail(H2ConnectionClosed("stream cancelled"))
            self._reset_stream(stream_id, st, CANCEL)
        except Exception as e:
            # Headers are out (or the body failed): the only signal left is RST_STREAM.
            log.debug("stream %d: failed after response headers: %r", stream_id, e)
            if resp is not None:
                resp.body.discard()
            self._reset_stream(stream_id, st, error_code_for(e))
        finally:
            if st.body is not None and not st.body.discarded:
                # Return any unread request bytes to the connection window (a handler that
                # answered without reading must not shrink it for the streams that follow).
                st.body.discard()
            self._maybe_forget(stream_id, st)
            if self._draining and not self._streams:
                self._loop.call_soon(self._close_if_idle)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"content-length" and v.isdigit():
            return int(v)
    return None
