"""A sans-I/O HTTP/2 connection (RFC 9113): bytes in, events out; calls in, bytes out.

:meth:`H2Connection.receive_data` parses what the peer sent and returns events (a request or a
response head, body data, trailers, the end of a stream, resets, window updates, settings, GOAWAY,
PING acks). It answers what the protocol answers on its own (SETTINGS and PING acks, RST_STREAM for
stream errors); a connection error queues GOAWAY with the RFC's error code and raises
:class:`ProtocolError`. The methods ``send_headers``, ``send_data``, ``reset_stream``,
``acknowledge_received_data`` and friends queue frames; :meth:`H2Connection.data_to_send` takes them.

Flow control: the receive windows are given back only as the application acknowledges consumed bytes
(``acknowledge_received_data``), a WINDOW_UPDATE once half a window is consumed. Closed streams are
remembered (a bounded number) so late frames after a reset are told from protocol errors.
"""

from __future__ import annotations

from typing import Final

from tether.core.http import h2frames as f
from tether.core.http.h2headers import FIELDS_REQUEST, FIELDS_RESPONSE, FIELDS_TRAILERS, FieldCheck, check_fields
from tether.core.http.hpack import Decoder, Encoder, HeaderListTooLarge, HPACKError

Headers = list[tuple[bytes, bytes]]

# How a remembered stream was closed.
CLOSED_RESET_LOCAL: Final = 1  # we reset it: frames still in flight are ignored
CLOSED_RESET_REMOTE: Final = 2  # the peer reset it: more frames are a stream error
CLOSED_ENDED: Final = 3  # both sides ended it
_IDLE: Final = 0
_FORGOTTEN: Final = 4

MAX_STREAM_ID: Final = (1 << 31) - 1
# Field blocks whose decoding a connection remembers (see _Decoded); cleared when full.
DECODED_REMEMBERED: Final = 16
REMOTE_MAX_CONCURRENT_DEFAULT: Final = 2**32 + 1  # no limit until the peer's SETTINGS say otherwise


class ProtocolError(Exception):
    """A connection error (the peer broke the protocol); GOAWAY(``code``) has been queued."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2UsageError(Exception):
    """The application asked for something the connection cannot do (e.g. send on a closed stream)."""


class StreamIdsExhausted(H2UsageError):
    """No client stream ids are left on this connection."""


class _ConnError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- events ------------------------------------------------------------------------------------------


class Event:
    __slots__ = ()


class RequestReceived(Event):
    __slots__ = ("end_stream", "headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class ResponseReceived(Event):
    __slots__ = ("end_stream", "headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream


class TrailersReceived(Event):
    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived(Event):
    """``flow_controlled_length`` counts padding too: acknowledge all of it."""

    __slots__ = ("data", "flow_controlled_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length


class StreamEnded(Event):
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset(Event):
    """A stream was reset: by the peer (``remote``) or by us for a stream error the peer caused."""

    __slots__ = ("error_code", "remote", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated(Event):
    """The peer opened a send window (``stream_id`` 0: the connection's)."""

    __slots__ = ("delta", "stream_id")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class RemoteSettingsChanged(Event):
    __slots__ = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


class PingAckReceived(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class ConnectionTerminated(Event):
    """The peer sent GOAWAY."""

    __slots__ = ("additional_data", "error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


class _Decoded:
    """A received field block's decoded fields, valid while the decoder's table is at ``version``,
    and the check of those fields as ``kind`` (-1: not checked yet)."""

    __slots__ = ("check", "fields", "kind", "version")

    def __init__(self, fields: tuple[tuple[bytes, bytes], ...], version: int) -> None:
        self.fields = fields
        self.version = version
        self.kind = -1
        self.check: FieldCheck | None = None


# -- streams ---------------------------------------------------------------------------------------


class H2Stream:
    __slots__ = (
        "expected_length",
        "head_request",
        "headers_received",
        "id",
        "inbound",
        "local_closed",
        "received_length",
        "recv_unacked",
        "recv_window",
        "remote_closed",
        "removed",
        "send_window",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int, inbound: bool) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.inbound = inbound  # opened by the peer
        self.local_closed = False
        self.remote_closed = False
        self.headers_received = False  # the (final) head has arrived: more HEADERS are trailers
        self.expected_length = -1  # content-length, -1 when absent
        self.received_length = 0
        self.head_request = False  # client: a response to HEAD has no body whatever it says
        self.removed = False  # closed and out of the connection's table


class H2Connection:
    """One HTTP/2 connection's protocol state, client or server side.

    ``max_concurrent_streams`` is advertised; ``stream_limit`` (default: the same) is the number of
    concurrent peer-opened streams above which new ones get REFUSED_STREAM.
    """

    def __init__(
        self,
        client_side: bool,
        max_concurrent_streams: int = 100,
        initial_window_size: int = f.DEFAULT_WINDOW,
        max_header_list_size: int = 65536,
        stream_limit: int | None = None,
        max_closed_streams: int = 1024,
        max_continuations: int = 16,
    ) -> None:
        self.client_side = client_side
        self.local_max_concurrent_streams = max_concurrent_streams
        self.local_initial_window = initial_window_size
        self.local_max_frame_size = f.DEFAULT_MAX_FRAME_SIZE
        self.local_max_header_list_size = max_header_list_size
        self.stream_limit = max_concurrent_streams if stream_limit is None else stream_limit
        self.max_closed_streams = max_closed_streams
        # CONTINUATION frames allowed after one HEADERS: a flood of small or empty ones costs a
        # frame's work each and never reaches the size bound (CVE-2024-27316, CVE-2023-45288).
        self.max_continuations = max_continuations
        self.remote_max_concurrent_streams = REMOTE_MAX_CONCURRENT_DEFAULT
        self.remote_initial_window = f.DEFAULT_WINDOW
        self.remote_max_frame_size = f.DEFAULT_MAX_FRAME_SIZE
        self.remote_max_header_list_size = -1
        self.highest_inbound_stream_id = 0
        self._next_stream_id = 1 if client_side else 2
        self._streams: dict[int, H2Stream] = {}
        # The stream last looked up: consecutive frames and calls are mostly for one stream, and a
        # dict lookup by id boxes the id (an allocation) first. Cleared when that stream closes.
        self._last: H2Stream | None = None
        self._closed: dict[int, int] = {}
        self._inbound_open = 0
        self._send_window = f.DEFAULT_WINDOW  # the connection's, toward the peer
        self._recv_window = f.DEFAULT_WINDOW
        self._recv_target = f.DEFAULT_WINDOW
        self._recv_unacked = 0
        self._encoder = Encoder()
        self._decoder = Decoder(max_header_list_size)
        # Blocks that decoded without changing the table: a peer's recurring heads (every gRPC
        # call's) arrive as the same bytes, decoded and checked once per table state.
        self._decoded: dict[bytes, _Decoded] = {}
        self._block: _Decoded | None = None  # the entry of the block being handled
        self._out: list[bytes] = []
        self._buf = b""
        self._need_preface = not client_side
        self._settings_seen = False
        self._terminated = False
        self.goaway_received = False
        # Header block in progress (HEADERS without END_HEADERS): its stream, flags, fragments.
        self._cont_sid = 0
        self._cont_flags = 0
        self._cont_bad_priority = False
        self._cont_parts: list[bytes] = []
        self._cont_size = 0
        self._cont_frames = 0
        self._events: list[Event] = []

    # -- public: state --------------------------------------------------------------------------
    @property
    def remote_settings_received(self) -> bool:
        """True once the peer's first SETTINGS frame has arrived (its limits are known)."""
        return self._settings_seen

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_max_frame_size

    @property
    def output_pending(self) -> bool:
        """True when frames are queued for :meth:`data_to_send`."""
        return len(self._out) > 0

    @property
    def open_inbound_streams(self) -> int:
        return self._inbound_open

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many bytes of DATA may be sent on ``stream_id`` now."""
        st = self._stream(stream_id)
        if st is None or st.local_closed:
            raise H2UsageError(f"stream {stream_id} is closed")
        window = self._send_window
        return window if window < st.send_window else st.send_window

    def _stream(self, stream_id: int) -> H2Stream | None:
        st = self._last
        if st is not None and st.id == stream_id:
            return st
        st = self._streams.get(stream_id)
        if st is not None:
            self._last = st
        return st

    def get_next_available_stream_id(self) -> int:
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise StreamIdsExhausted("no stream ids left on this connection")
        return sid

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- public: sending --------------------------------------------------------------------------
    def initiate_connection(self) -> None:
        """Queue the client preface (client side) and our SETTINGS."""
        settings = [
            (f.SETTINGS_MAX_CONCURRENT_STREAMS, self.local_max_concurrent_streams),
            (f.SETTINGS_INITIAL_WINDOW_SIZE, self.local_initial_window),
            (f.SETTINGS_MAX_HEADER_LIST_SIZE, self.local_max_header_list_size),
            (f.SETTINGS_ENABLE_PUSH, 0),
        ]
        if self.client_side:
            self._out.append(f.PREFACE)
        self._out.append(f.settings_frame(settings))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        """Send a request head (opening the stream, client side), a response head, or trailers."""
        if self._terminated:
            raise H2UsageError("connection terminated")
        st = self._stream(stream_id)
        if st is None:
            if not self.client_side or stream_id != self._next_stream_id or stream_id > MAX_STREAM_ID:
                raise H2UsageError(f"cannot send headers on stream {stream_id}: not open")
            if self.goaway_received:
                raise H2UsageError("the peer sent GOAWAY: no new streams")
            if len(self._streams) >= self.remote_max_concurrent_streams:
                raise H2UsageError("the peer's concurrent stream limit is reached")
            st = H2Stream(stream_id, self.remote_initial_window, self.local_initial_window, False)
            for k, v in headers:
                if k == b":method":
                    st.head_request = v == b"HEAD"
                    break
            self._streams[stream_id] = st
            self._next_stream_id = stream_id + 2
        elif st.local_closed:
            raise H2UsageError(f"stream {stream_id} is closed for sending")
        block = self._encoder.encode(headers)
        n = len(block)
        if n <= self.remote_max_frame_size:
            # Header and block as two pieces of the next write (no copy of the block into a frame).
            out = self._out
            out.append(f.frame_header(n, f.HEADERS, (f.FLAG_END_STREAM | f.FLAG_END_HEADERS) if end_stream
                                      else f.FLAG_END_HEADERS, stream_id))
            out.append(block)
        else:
            self._out.append(f.headers_frames(stream_id, block, end_stream, self.remote_max_frame_size))
        if end_stream:
            self._local_end(st)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Send DATA within the peer's windows (see :meth:`local_flow_control_window`)."""
        st = self._stream(stream_id)
        if st is None or st.local_closed or self._terminated:
            raise H2UsageError(f"stream {stream_id} is closed for sending")
        n = len(data)
        if n > self._send_window or n > st.send_window:
            raise H2UsageError(f"{n} bytes exceed the flow-control window of stream {stream_id}")
        self._send_window -= n
        st.send_window -= n
        size = self.remote_max_frame_size
        if n <= size:
            out = self._out
            out.append(f.frame_header(n, f.DATA, f.FLAG_END_STREAM if end_stream else 0, stream_id))
            if n:
                out.append(data)
        else:
            for off in range(0, n, size):
                self._out.append(f.data_frame(stream_id, data[off : off + size], end_stream and off + size >= n))
        if end_stream:
            self._local_end(st)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", True)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM a stream (a no-op for a stream already closed)."""
        st = self._stream(stream_id)
        if st is None:
            return
        self._out.append(f.rst_stream_frame(stream_id, error_code))
        self._close_stream(st, CLOSED_RESET_LOCAL)

    def acknowledge_received_data(self, n: int, stream_id: int) -> None:
        """The application consumed ``n`` flow-controlled bytes of ``stream_id``: reopen windows."""
        if n <= 0 or self._terminated:
            return
        self._conn_ack(n)
        st = self._stream(stream_id)
        if st is None or st.remote_closed:
            return
        st.recv_unacked += n
        if st.recv_unacked * 2 >= self.local_initial_window:
            inc = st.recv_unacked
            st.recv_unacked = 0
            st.recv_window += inc
            self._out.append(f.window_update_frame(stream_id, inc))

    def increment_flow_control_window(self, increment: int, stream_id: int = 0) -> None:
        """Open a receive window beyond its initial size (the connection's, by default)."""
        if stream_id:
            st = self._stream(stream_id)
            if st is None:
                return
            st.recv_window += increment
        else:
            self._recv_window += increment
            self._recv_target += increment
        self._out.append(f.window_update_frame(stream_id, increment))

    def ping(self, data: bytes) -> None:
        self._out.append(f.ping_frame(data))

    def goaway(self, error_code: int, last_stream_id: int | None = None) -> None:
        """Queue GOAWAY; streams at or below the last stream id may still finish (RFC 9113 6.8)."""
        last = self.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        self._out.append(f.goaway_frame(last, error_code))

    # -- public: receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        """Parse bytes from the peer; returns the events, raises :class:`ProtocolError`."""
        if self._terminated:
            return []
        events: list[Event] = []
        self._events = events
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos = 0
        n = len(data)
        try:
            if self._need_preface:
                plen = len(f.PREFACE)
                if n < plen:
                    if not f.PREFACE.startswith(data):
                        raise _ConnError(f.PROTOCOL_ERROR, "invalid connection preface")
                    self._buf = data
                    return events
                if data[:plen] != f.PREFACE:
                    raise _ConnError(f.PROTOCOL_ERROR, "invalid connection preface")
                self._need_preface = False
                pos = plen
            max_size = self.local_max_frame_size
            while n - pos >= 9:
                # The 9-byte frame header, read inline (this loop is the hottest in the codec).
                length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
                ftype = data[pos + 3]
                flags = data[pos + 4]
                sid = (
                    ((data[pos + 5] & 0x7F) << 24) | (data[pos + 6] << 16) | (data[pos + 7] << 8) | data[pos + 8]
                )
                if length > max_size:
                    raise _ConnError(f.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_size}")
                end = pos + 9 + length
                if end > n:
                    break
                if ftype == f.WINDOW_UPDATE and length == 4 and self._settings_seen and not self._cont_sid:
                    # The commonest small frame (a few per gRPC call), read in place: no payload
                    # slice. Anything unusual about it takes the general path below.
                    inc = (
                        ((data[pos + 9] & 0x7F) << 24) | (data[pos + 10] << 16) | (data[pos + 11] << 8) | data[pos + 12]
                    )
                    pos = end
                    self._window_update(sid, inc)
                    continue
                payload = data[pos + 9 : end]
                pos = end
                self._frame(ftype, flags, sid, payload)
            if pos < n:
                self._buf = data[pos:]
        # (Distinct names: mypyc types an except variable by its first clause.)
        except _ConnError as conn_err:
            self._fail(conn_err.code, str(conn_err))
        except f.FrameError as frame_err:
            self._fail(frame_err.code, str(frame_err))
        return events

    # -- internals: receiving ---------------------------------------------------------------------
    def _fail(self, code: int, message: str) -> None:
        self._out.append(f.goaway_frame(self.highest_inbound_stream_id, code, message.encode("utf-8", "replace")[:256]))
        self._terminated = True
        self._buf = b""
        raise ProtocolError(code, message)

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont_sid and ftype != f.CONTINUATION:
            raise _ConnError(f.PROTOCOL_ERROR, "expected CONTINUATION")
        if not self._settings_seen:
            if ftype != f.SETTINGS or flags & f.FLAG_ACK:
                raise _ConnError(f.PROTOCOL_ERROR, "the first frame is not SETTINGS")
            self._settings_seen = True
        if ftype == f.DATA:
            self._on_data(flags, sid, payload)
        elif ftype == f.HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == f.WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == f.RST_STREAM:
            self._on_rst_stream(sid, payload)
        elif ftype == f.SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == f.PING:
            self._on_ping(flags, sid, payload)
        elif ftype == f.PRIORITY:
            self._on_priority(sid, payload)
        elif ftype == f.GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == f.CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == f.PUSH_PROMISE:
            raise _ConnError(f.PROTOCOL_ERROR, "PUSH_PROMISE received (push is disabled)")
        # Unknown frame types are ignored (RFC 9113 section 4.1).

    def _closed_kind(self, sid: int) -> int:
        kind = self._closed.get(sid, 0)
        if kind:
            return kind
        ours = (sid & 1) == (1 if self.client_side else 0)
        if ours:
            return _IDLE if sid >= self._next_stream_id else _FORGOTTEN
        return _IDLE if sid > self.highest_inbound_stream_id else _FORGOTTEN

    def _stream_error(self, sid: int, code: int) -> None:
        """RST_STREAM for a stream error the peer caused; an open stream closes with an event."""
        self._out.append(f.rst_stream_frame(sid, code))
        st = self._stream(sid)
        if st is not None:
            self._close_stream(st, CLOSED_RESET_LOCAL)
            self._events.append(StreamReset(sid, code, False))

    def _conn_ack(self, n: int) -> None:
        self._recv_unacked += n
        if self._recv_unacked * 2 >= self._recv_target:
            inc = self._recv_unacked
            self._recv_unacked = 0
            self._recv_window += inc
            self._out.append(f.window_update_frame(0, inc))

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(f.PROTOCOL_ERROR, "DATA on stream 0")
        flow_len = len(payload)
        data, _ = f.strip_padding(payload, flags, sid)
        if flow_len > self._recv_window:
            raise _ConnError(f.FLOW_CONTROL_ERROR, "DATA exceeds the connection window")
        self._recv_window -= flow_len
        st = self._stream(sid)
        if st is None:
            self._conn_ack(flow_len)  # nobody will read it
            kind = self._closed_kind(sid)
            if kind == _IDLE:
                raise _ConnError(f.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if kind == CLOSED_ENDED:
                raise _ConnError(f.STREAM_CLOSED, f"DATA on closed stream {sid}")
            if kind == CLOSED_RESET_REMOTE:
                self._stream_error(sid, f.STREAM_CLOSED)
            return
        if st.remote_closed:
            self._conn_ack(flow_len)
            self._stream_error(sid, f.STREAM_CLOSED)
            return
        if not st.headers_received:
            self._conn_ack(flow_len)
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        if flow_len > st.recv_window:
            self._conn_ack(flow_len)
            self._stream_error(sid, f.FLOW_CONTROL_ERROR)
            return
        st.recv_window -= flow_len
        st.received_length += len(data)
        end = bool(flags & f.FLAG_END_STREAM)
        if st.expected_length >= 0 and (
            st.received_length > st.expected_length or (end and st.received_length != st.expected_length)
        ):
            self._conn_ack(flow_len)
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        if flow_len:
            self._events.append(DataReceived(sid, data, flow_len))
        if end:
            self._remote_end(st)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        block, dep = f.parse_headers_payload(payload, flags, sid)
        if flags & f.FLAG_END_HEADERS:
            self._header_block(sid, flags, block, dep == sid)
            return
        self._cont_sid = sid
        self._cont_flags = flags
        self._cont_bad_priority = dep == sid
        self._cont_parts = [block]
        self._cont_size = len(block)
        self._cont_frames = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if not self._cont_sid or sid != self._cont_sid:
            raise _ConnError(f.PROTOCOL_ERROR, "CONTINUATION without a header block in progress")
        self._cont_parts.append(payload)
        self._cont_size += len(payload)
        self._cont_frames += 1
        if self._cont_size > self.local_max_header_list_size + 65536:
            raise _ConnError(f.ENHANCE_YOUR_CALM, "header block too large")
        if self._cont_frames > self.max_continuations and not flags & f.FLAG_END_HEADERS:
            raise _ConnError(f.ENHANCE_YOUR_CALM, f"more than {self.max_continuations} CONTINUATION frames")
        if flags & f.FLAG_END_HEADERS:
            block = b"".join(self._cont_parts)
            self._cont_sid = 0
            self._cont_parts = []
            self._header_block(sid, self._cont_flags, block, self._cont_bad_priority)

    def _header_block(self, sid: int, flags: int, block: bytes, bad_priority: bool) -> None:
        end_stream = bool(flags & f.FLAG_END_STREAM)
        too_large = False
        decoder = self._decoder
        version = decoder.version
        seen = self._decoded.get(block)
        if seen is not None and seen.version == version:
            fields = list(seen.fields)  # the events' owner may change its list
        else:
            seen = None
            try:
                fields = decoder.decode(block)
            except HeaderListTooLarge:
                fields = []
                too_large = True
            except HPACKError as e:
                raise _ConnError(f.COMPRESSION_ERROR, f"header block: {e}")
            if decoder.version == version and not too_large:
                if len(self._decoded) >= DECODED_REMEMBERED:
                    self._decoded.clear()
                seen = self._decoded[block] = _Decoded(tuple(fields), version)
        self._block = seen
        st = self._stream(sid)
        if st is None:
            self._new_remote_stream(sid, fields, end_stream, bad_priority, too_large)
            return
        if st.remote_closed:
            self._stream_error(sid, f.STREAM_CLOSED)
            return
        if bad_priority or too_large:
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        if st.headers_received:
            # Trailers: they end the stream and carry no pseudo-headers.
            check = self._check(fields, FIELDS_TRAILERS)
            if not end_stream or check.error is not None:
                self._stream_error(sid, f.PROTOCOL_ERROR)
                return
            if st.expected_length >= 0 and st.received_length != st.expected_length:
                self._stream_error(sid, f.PROTOCOL_ERROR)
                return
            self._events.append(TrailersReceived(sid, fields))
            self._remote_end(st)
            return
        if not self.client_side:
            # A server's stream that has its request head already (cannot happen: handled above).
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        check = self._check(fields, FIELDS_RESPONSE)
        if check.error is not None:
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        if check.status < 200:
            if end_stream or check.status == 101:
                self._stream_error(sid, f.PROTOCOL_ERROR)
            return  # informational: the final response follows
        st.headers_received = True
        if not st.head_request and check.status != 304 and check.status != 204:
            st.expected_length = check.content_length
        if end_stream and st.expected_length > 0:
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        self._events.append(ResponseReceived(sid, fields, end_stream))
        if end_stream:
            self._remote_end(st)

    def _check(self, fields: Headers, kind: int) -> FieldCheck:
        """check_fields, or its result for the same block already checked as ``kind``."""
        seen = self._block
        if seen is None:
            return check_fields(fields, kind)
        check = seen.check
        if check is None or seen.kind != kind:
            check = seen.check = check_fields(fields, kind)
            seen.kind = kind
        return check

    def _new_remote_stream(
        self, sid: int, fields: Headers, end_stream: bool, bad_priority: bool, too_large: bool
    ) -> None:
        if self.client_side:
            kind = self._closed_kind(sid)
            if kind == _IDLE or (sid & 1) == 0:
                raise _ConnError(f.PROTOCOL_ERROR, f"HEADERS on stream {sid} the client did not open")
            if kind == CLOSED_ENDED:
                raise _ConnError(f.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            if kind == CLOSED_RESET_REMOTE:
                self._stream_error(sid, f.STREAM_CLOSED)
            return
        if sid & 1 == 0:
            raise _ConnError(f.PROTOCOL_ERROR, f"client opened even stream {sid}")
        if sid <= self.highest_inbound_stream_id:
            kind = self._closed.get(sid, 0)
            if kind == 0:
                raise _ConnError(f.PROTOCOL_ERROR, f"stream {sid} is below the highest stream opened")
            if kind == CLOSED_ENDED:
                raise _ConnError(f.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
            if kind == CLOSED_RESET_REMOTE:
                self._stream_error(sid, f.STREAM_CLOSED)
            return
        self.highest_inbound_stream_id = sid
        if bad_priority or too_large:
            self._refuse(sid, f.PROTOCOL_ERROR)
            return
        if self._inbound_open >= self.stream_limit:
            self._refuse(sid, f.REFUSED_STREAM)
            return
        check = self._check(fields, FIELDS_REQUEST)
        if check.error is not None or (end_stream and check.content_length > 0):
            self._refuse(sid, f.PROTOCOL_ERROR)
            return
        st = H2Stream(sid, self.remote_initial_window, self.local_initial_window, True)
        st.headers_received = True
        st.expected_length = check.content_length
        self._streams[sid] = st
        self._inbound_open += 1
        self._events.append(RequestReceived(sid, fields, end_stream))
        if end_stream:
            self._remote_end(st)

    def _refuse(self, sid: int, code: int) -> None:
        self._out.append(f.rst_stream_frame(sid, code))
        self._remember(sid, CLOSED_RESET_LOCAL)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        self._window_update(sid, f.parse_window_update(payload))

    def _window_update(self, sid: int, inc: int) -> None:
        if sid == 0:
            if inc == 0:
                raise _ConnError(f.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += inc
            if self._send_window > f.MAX_WINDOW:
                raise _ConnError(f.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._events.append(WindowUpdated(0, inc))
            return
        st = self._stream(sid)
        if st is None:
            if self._closed_kind(sid) == _IDLE:
                raise _ConnError(f.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            self._stream_error(sid, f.PROTOCOL_ERROR)
            return
        st.send_window += inc
        if st.send_window > f.MAX_WINDOW:
            self._stream_error(sid, f.FLOW_CONTROL_ERROR)
            return
        self._events.append(WindowUpdated(sid, inc))

    def _on_rst_stream(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(f.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        code = f.parse_rst_stream(payload)
        st = self._stream(sid)
        if st is None:
            if self._closed_kind(sid) == _IDLE:
                raise _ConnError(f.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        self._close_stream(st, CLOSED_RESET_REMOTE)
        self._events.append(StreamReset(sid, code, True))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnError(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.FLAG_ACK:
            if payload:
                raise _ConnError(f.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        changed: dict[int, int] = {}
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.table_size = min(value, 4096)
            elif key == f.SETTINGS_ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client_side):
                    raise _ConnError(f.PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_PUSH {value}")
            elif key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnError(f.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} above 2^31-1")
                delta = value - self.remote_initial_window
                self.remote_initial_window = value
                if delta:
                    for st in self._streams.values():
                        st.send_window += delta
                        if st.send_window > f.MAX_WINDOW:
                            raise _ConnError(f.FLOW_CONTROL_ERROR, "a stream window went above 2^31-1")
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if value < f.DEFAULT_MAX_FRAME_SIZE or value > f.MAX_MAX_FRAME_SIZE:
                    raise _ConnError(f.PROTOCOL_ERROR, f"invalid SETTINGS_MAX_FRAME_SIZE {value}")
                self.remote_max_frame_size = value
            elif key == f.SETTINGS_MAX_HEADER_LIST_SIZE:
                self.remote_max_header_list_size = value
            elif key == f.SETTINGS_ENABLE_CONNECT_PROTOCOL and value > 1:
                raise _ConnError(f.PROTOCOL_ERROR, f"invalid SETTINGS_ENABLE_CONNECT_PROTOCOL {value}")
            changed[key] = value
        self._out.append(f.SETTINGS_ACK)
        self._events.append(RemoteSettingsChanged(changed))

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnError(f.PROTOCOL_ERROR, "PING on a stream")
        data = f.parse_ping(payload)
        if flags & f.FLAG_ACK:
            self._events.append(PingAckReceived(data))
        else:
            self._out.append(f.ping_frame(data, ack=True))

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnError(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        try:
            dep, _, _ = f.parse_priority(payload, sid)
        except f.FrameError as e:
            self._stream_error(sid, e.code)
            return
        if dep == sid:
            self._stream_error(sid, f.PROTOCOL_ERROR)

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnError(f.PROTOCOL_ERROR, "GOAWAY on a stream")
        last, code, debug = f.parse_goaway(payload)
        self.goaway_received = True
        self._events.append(ConnectionTerminated(code, last, debug))

    # -- internals: stream lifecycle --------------------------------------------------------------
    def _local_end(self, st: H2Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self._close_stream(st, CLOSED_ENDED)

    def _remote_end(self, st: H2Stream) -> None:
        st.remote_closed = True
        self._events.append(StreamEnded(st.id))
        if st.local_closed:
            self._close_stream(st, CLOSED_ENDED)

    def _close_stream(self, st: H2Stream, kind: int) -> None:
        if st.removed:
            return
        del self._streams[st.id]  # (not dict.pop: a generic method call when compiled)
        st.removed = True
        if self._last is st:
            self._last = None
        st.local_closed = st.remote_closed = True
        if st.inbound:
            self._inbound_open -= 1
        self._remember(st.id, kind)

    def _remember(self, sid: int, kind: int) -> None:
        closed = self._closed
        closed[sid] = kind
        if len(closed) > self.max_closed_streams:
            # The oldest entry (dicts keep insertion order); a compiled loop, not next(iter()).
            for oldest in closed:
                del closed[oldest]
                break
