"""The sans-I/O HTTP/2 stack: frames (hyperframe as oracle), the connection state machine, and
interoperation with the ``h2`` library as the peer."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe import frame as hf
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http import h2frames as f
from tether.core.http.h2proto import (
    ConnectionTerminated,
    DataReceived,
    Event,
    H2Connection,
    H2UsageError,
    PingAckReceived,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from tether.core.http.hpack import Encoder

REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"a"), (b"te", b"trailers")]
RESP = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def frames(data: bytes) -> list[hf.Frame]:
    out = []
    if data.startswith(f.PREFACE):
        data = data[len(f.PREFACE) :]
    while data:
        fr, length = hf.Frame.parse_frame_header(memoryview(data[:9]))
        fr.parse_body(memoryview(data[9 : 9 + length]))
        out.append(fr)
        data = data[9 + length :]
    return out


def pair(**kw: int) -> tuple[H2Connection, H2Connection]:
    c, s = H2Connection(True, **kw), H2Connection(False, **kw)
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    return c, s


def server(**kw: int) -> H2Connection:
    """A server that has read a client preface and an empty SETTINGS."""
    s = H2Connection(False, **kw)
    s.initiate_connection()
    s.receive_data(f.PREFACE + f.settings_frame([]))
    s.data_to_send()
    return s


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# -- frames ------------------------------------------------------------------------------------------


def test_serialized_frames_parse_with_hyperframe() -> None:
    got = frames(
        f.data_frame(1, b"abc", True)
        + f.headers_frames(3, b"x" * 5, False, 16384)
        + f.priority_frame(5, 3, 16, exclusive=True)
        + f.rst_stream_frame(7, f.CANCEL)
        + f.settings_frame([(f.SETTINGS_INITIAL_WINDOW_SIZE, 1000)])
        + f.SETTINGS_ACK
        + f.push_promise_frame(1, 2, b"blk")
        + f.ping_frame(b"12345678", ack=True)
        + f.goaway_frame(9, f.ENHANCE_YOUR_CALM, b"dbg")
        + f.window_update_frame(0, 12345)
        + f.continuation_frame(3, b"yy", True)
    )
    d, h, p, r, s, sa, pp, pg, g, w, c = got
    assert isinstance(d, hf.DataFrame) and d.data == b"abc" and d.flags == {"END_STREAM"} and d.stream_id == 1
    assert isinstance(h, hf.HeadersFrame) and h.data == b"xxxxx" and h.flags == {"END_HEADERS"}
    assert isinstance(p, hf.PriorityFrame) and (p.depends_on, p.stream_weight, p.exclusive) == (3, 15, True)
    assert isinstance(r, hf.RstStreamFrame) and r.error_code == f.CANCEL
    assert isinstance(s, hf.SettingsFrame) and s.settings == {f.SETTINGS_INITIAL_WINDOW_SIZE: 1000}
    assert isinstance(sa, hf.SettingsFrame) and sa.flags == {"ACK"}
    assert isinstance(pp, hf.PushPromiseFrame) and pp.promised_stream_id == 2 and pp.data == b"blk"
    assert isinstance(pg, hf.PingFrame) and pg.opaque_data == b"12345678" and pg.flags == {"ACK"}
    assert isinstance(g, hf.GoAwayFrame) and (g.last_stream_id, g.error_code, g.additional_data) == (9, 11, b"dbg")
    assert isinstance(w, hf.WindowUpdateFrame) and w.window_increment == 12345 and w.stream_id == 0
    assert isinstance(c, hf.ContinuationFrame) and c.data == b"yy" and c.flags == {"END_HEADERS"}


def test_large_header_block_is_split_into_continuations() -> None:
    got = frames(f.headers_frames(1, b"z" * 40000, True, 16384))
    assert [type(x).__name__ for x in got] == ["HeadersFrame", "ContinuationFrame", "ContinuationFrame"]
    assert got[0].flags == {"END_STREAM"} and got[2].flags == {"END_HEADERS"} and not got[1].flags
    assert b"".join(x.data for x in got) == b"z" * 40000


def test_payload_parsers_read_hyperframe_frames() -> None:
    hdr = hf.HeadersFrame(1, data=b"blk", flags=["PADDED", "PRIORITY"], pad_length=3, depends_on=7, stream_weight=9)
    raw = hdr.serialize()
    length, ftype, flags, sid = f.parse_header(raw, 0)
    assert (length, ftype, sid) == (len(raw) - 9, f.HEADERS, 1)
    assert f.parse_headers_payload(raw[9:], flags, sid) == (b"blk", 7)
    g = hf.GoAwayFrame(0, last_stream_id=5, error_code=2, additional_data=b"x").serialize()
    assert f.parse_goaway(g[9:]) == (5, 2, b"x")
    assert f.parse_settings(hf.SettingsFrame(0, settings={4: 10, 5: 20000}).serialize()[9:]) == [(4, 10), (5, 20000)]
    assert f.parse_window_update(hf.WindowUpdateFrame(3, window_increment=77).serialize()[9:]) == 77


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda: f.parse_rst_stream(b"\x00" * 3), f.FRAME_SIZE_ERROR),
        (lambda: f.parse_settings(b"\x00" * 5), f.FRAME_SIZE_ERROR),
        (lambda: f.parse_ping(b"\x00" * 7), f.FRAME_SIZE_ERROR),
        (lambda: f.parse_window_update(b"\x00" * 5), f.FRAME_SIZE_ERROR),
        (lambda: f.parse_goaway(b"\x00" * 7), f.FRAME_SIZE_ERROR),
        (lambda: f.strip_padding(b"\x05abc", f.FLAG_PADDED, 1), f.PROTOCOL_ERROR),
    ],
)
def test_malformed_payloads(call: object, code: int) -> None:
    with pytest.raises(f.FrameError) as e:
        call()  # type: ignore[operator]
    assert e.value.code == code


# -- the connection ------------------------------------------------------------------------------------


def test_request_response_trailers_round_trip() -> None:
    c, s = pair()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, REQ)
    c.send_data(sid, b"hello")
    c.send_headers(sid, [(b"x-t", b"1")], end_stream=True)
    evs = s.receive_data(c.data_to_send())
    assert kinds(evs) == ["RequestReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    assert isinstance(evs[0], RequestReceived) and evs[0].headers == REQ and not evs[0].end_stream
    assert isinstance(evs[2], TrailersReceived) and evs[2].headers == [(b"x-t", b"1")]
    s.send_headers(sid, RESP)
    s.send_data(sid, b"world", end_stream=True)
    evs = c.receive_data(s.data_to_send())
    assert kinds(evs) == ["ResponseReceived", "DataReceived", "StreamEnded"]
    assert isinstance(evs[1], DataReceived) and evs[1].data == b"world"
    assert not c.stream_is_open(sid) and not s.stream_is_open(sid)
    assert c.get_next_available_stream_id() == sid + 2


def test_windows_reopen_as_data_is_acknowledged() -> None:
    c, s = pair(initial_window_size=1000)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, REQ)
    assert c.local_flow_control_window(sid) == 1000
    with pytest.raises(H2UsageError):
        c.send_data(sid, b"x" * 1001)
    c.send_data(sid, b"x" * 1000)
    assert c.local_flow_control_window(sid) == 0
    evs = s.receive_data(c.data_to_send())
    assert kinds(evs) == ["RequestReceived", "DataReceived"]
    s.acknowledge_received_data(400, sid)  # below half the window: nothing sent yet
    assert not [x for x in frames(s.data_to_send()) if isinstance(x, hf.WindowUpdateFrame) and x.stream_id]
    s.acknowledge_received_data(600, sid)
    evs = c.receive_data(s.data_to_send())
    assert any(isinstance(e, WindowUpdated) and e.stream_id == sid and e.delta == 1000 for e in evs)
    assert c.local_flow_control_window(sid) == 1000


def test_peer_exceeding_the_stream_window_gets_flow_control_error() -> None:
    s = server(initial_window_size=10)
    block = Encoder().encode(REQ)
    evs = s.receive_data(f.headers_frames(1, block, False, 16384) + f.data_frame(1, b"x" * 11, False))
    assert kinds(evs) == ["RequestReceived", "StreamReset"]
    (rst,) = frames(s.data_to_send())
    assert isinstance(rst, hf.RstStreamFrame) and rst.error_code == f.FLOW_CONTROL_ERROR


def test_settings_initial_window_change_adjusts_open_streams() -> None:
    c, s = pair()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, REQ)
    s.receive_data(c.data_to_send())
    evs = s.receive_data(f.settings_frame([(f.SETTINGS_INITIAL_WINDOW_SIZE, 10)]))
    assert isinstance(evs[0], RemoteSettingsChanged) and evs[0].changed == {f.SETTINGS_INITIAL_WINDOW_SIZE: 10}
    assert s.local_flow_control_window(sid) == 10
    assert frames(s.data_to_send())[-1].flags == {"ACK"}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (f.data_frame(1, b"x", False), f.PROTOCOL_ERROR),  # DATA on an idle stream
        (f.window_update_frame(0, 0), f.PROTOCOL_ERROR),
        (f.window_update_frame(0, 2**31 - 1), f.FLOW_CONTROL_ERROR),
        (f.settings_frame([(f.SETTINGS_MAX_FRAME_SIZE, 100)]), f.PROTOCOL_ERROR),
        (f.settings_frame([(f.SETTINGS_INITIAL_WINDOW_SIZE, 2**31)]), f.FLOW_CONTROL_ERROR),
        (f.frame_header(1, f.SETTINGS, f.FLAG_ACK, 0) + b"\x00", f.FRAME_SIZE_ERROR),
        (f.frame_header(16385, f.DATA, 0, 1) + b"\x00" * 16385, f.FRAME_SIZE_ERROR),
        (f.headers_frames(2, Encoder().encode(REQ), True, 16384), f.PROTOCOL_ERROR),  # even stream id
        (f.headers_frames(1, b"\xbe", True, 16384), f.COMPRESSION_ERROR),
        (f.push_promise_frame(1, 2, b""), f.PROTOCOL_ERROR),
        (f.continuation_frame(1, b"", True), f.PROTOCOL_ERROR),
        (f.rst_stream_frame(1, 0), f.PROTOCOL_ERROR),  # idle
        (f.frame_header(7, f.PING, 0, 0) + b"1234567", f.FRAME_SIZE_ERROR),
    ],
)
def test_connection_errors_send_goaway_with_the_code(data: bytes, code: int) -> None:
    s = server()
    with pytest.raises(ProtocolError) as e:
        s.receive_data(data)
    assert e.value.code == code
    (goaway,) = frames(s.data_to_send())
    assert isinstance(goaway, hf.GoAwayFrame) and goaway.error_code == code
    assert s.receive_data(f.ping_frame(b"12345678")) == []  # terminated: nothing more is read


def test_invalid_preface() -> None:
    s = H2Connection(False)
    s.initiate_connection()
    s.data_to_send()
    with pytest.raises(ProtocolError):
        s.receive_data(b"GET / HTTP/1.1\r\n\r\n")


def test_frames_interleaved_with_a_header_block_are_a_protocol_error() -> None:
    s = server()
    block = Encoder().encode(REQ)
    hdr = f.frame_header(len(block), f.HEADERS, 0, 1) + block
    with pytest.raises(ProtocolError) as e:
        s.receive_data(hdr + f.ping_frame(b"12345678"))
    assert e.value.code == f.PROTOCOL_ERROR
    s = server()
    evs = s.receive_data(
        f.frame_header(3, f.HEADERS, f.FLAG_END_STREAM, 1)
        + block[:3]
        + f.continuation_frame(1, block[3:], True)
    )
    assert kinds(evs) == ["RequestReceived", "StreamEnded"]


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"X-Upper", b"1")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")],
        [(b":method", b"GET"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"close")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"te", b"gzip")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":status", b"200")],
        [(b":method", b"GET"), (b"a", b"b"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
    ],
)
def test_malformed_requests_are_reset_and_the_connection_lives(fields: list[tuple[bytes, bytes]]) -> None:
    s = server()
    evs = s.receive_data(f.headers_frames(1, Encoder().encode(fields), True, 16384))
    assert evs == []
    (rst,) = frames(s.data_to_send())
    assert isinstance(rst, hf.RstStreamFrame) and rst.error_code == f.PROTOCOL_ERROR
    s.receive_data(f.ping_frame(b"12345678"))
    assert isinstance(frames(s.data_to_send())[0], hf.PingFrame)


def test_content_length_must_match_the_data() -> None:
    s = server()
    enc = Encoder()
    evs = s.receive_data(
        f.headers_frames(1, enc.encode([*REQ, (b"content-length", b"3")]), False, 16384)
        + f.data_frame(1, b"ab", True)
    )
    assert kinds(evs) == ["RequestReceived", "StreamReset"]
    assert isinstance(evs[1], StreamReset) and evs[1].error_code == f.PROTOCOL_ERROR and not evs[1].remote


def test_trailers_without_end_stream_reset_the_stream() -> None:
    s = server()
    enc = Encoder()
    evs = s.receive_data(
        f.headers_frames(1, enc.encode(REQ), False, 16384)
        + f.headers_frames(1, enc.encode([(b"a", b"b")]), False, 16384)
    )
    assert kinds(evs) == ["RequestReceived", "StreamReset"]


def test_streams_beyond_the_limit_are_refused() -> None:
    s = server(max_concurrent_streams=2)
    enc = Encoder()
    evs = s.receive_data(b"".join(f.headers_frames(i, enc.encode(REQ), False, 16384) for i in (1, 3, 5)))
    assert kinds(evs) == ["RequestReceived", "RequestReceived"]
    (rst,) = frames(s.data_to_send())
    assert isinstance(rst, hf.RstStreamFrame) and rst.stream_id == 5 and rst.error_code == f.REFUSED_STREAM
    assert s.open_inbound_streams == 2


def test_late_frames_after_our_reset_are_ignored_and_closed_streams_are_bounded() -> None:
    s = server(max_closed_streams=16, initial_window_size=100)
    enc = Encoder()
    for i in range(1, 200, 2):
        s.receive_data(f.headers_frames(i, enc.encode(REQ), False, 16384))
        s.reset_stream(i, f.CANCEL)
        # Late DATA on the stream we reset: ignored, but the connection window is kept right.
        assert s.receive_data(f.data_frame(i, b"x" * 400, False)) == []
    assert len(s._closed) == 16
    out = frames(s.data_to_send())
    assert any(isinstance(x, hf.WindowUpdateFrame) and x.stream_id == 0 for x in out)
    # The peer resetting then sending more is a stream error.
    s.receive_data(f.headers_frames(201, enc.encode(REQ), False, 16384))
    evs = s.receive_data(f.rst_stream_frame(201, f.CANCEL) + f.data_frame(201, b"x", False))
    assert isinstance(evs[0], StreamReset) and evs[0].remote
    assert isinstance(frames(s.data_to_send())[-1], hf.RstStreamFrame)


def test_ping_goaway_and_unknown_frames() -> None:
    c, s = pair()
    assert s.receive_data(f.frame_header(3, 0xFA, 0, 0) + b"abc") == []
    s.receive_data(f.ping_frame(b"abcdefgh"))
    c.ping(b"12345678")
    s.receive_data(c.data_to_send())
    evs = c.receive_data(s.data_to_send())
    assert [e.data for e in evs if isinstance(e, PingAckReceived)] == [b"abcdefgh", b"12345678"] or [
        e.data for e in evs if isinstance(e, PingAckReceived)
    ] == [b"12345678"]
    s.goaway(f.NO_ERROR, 0)
    evs = c.receive_data(s.data_to_send())
    assert isinstance(evs[-1], ConnectionTerminated) and evs[-1].last_stream_id == 0 and c.goaway_received
    with pytest.raises(H2UsageError, match="GOAWAY"):
        c.send_headers(c.get_next_available_stream_id(), REQ)


def test_usage_errors() -> None:
    c, s = pair()
    with pytest.raises(H2UsageError):
        c.send_data(1, b"x")
    with pytest.raises(H2UsageError):
        s.send_headers(2, RESP)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, REQ, end_stream=True)
    with pytest.raises(H2UsageError):
        c.send_data(sid, b"x")


frame_bytes = st.builds(
    lambda length, ftype, flags, sid, body: f.frame_header(length, ftype, flags, sid) + body,
    st.integers(0, 40),
    st.integers(0, 10),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frame_bytes, max_size=8), st.integers(1, 7))
def test_garbage_only_ever_raises_protocol_error(chunks: list[bytes], split: int) -> None:
    s = server()
    data = b"".join(chunks)
    try:
        for i in range(0, len(data), split):
            s.receive_data(data[i : i + split])
    except ProtocolError:
        assert isinstance(frames(s.data_to_send())[-1], hf.GoAwayFrame)


# -- interop with h2 ---------------------------------------------------------------------------------


def test_our_client_against_an_h2_server() -> None:
    c = H2Connection(True, initial_window_size=65535)
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    srv.initiate_connection()
    big = [(b"x-big-%d" % i, b"v" * 100) for i in range(300)]  # over one frame: CONTINUATION
    body = b"b" * 200_000
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [*REQ, *big])
    sent = 0
    got = b""
    got_headers: list[tuple[bytes, bytes]] = []
    ended = False
    for _ in range(200):
        # Send what the windows allow, then let each side read the other.
        if sent < len(body):
            n = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(body) - sent)
            if n > 0:
                c.send_data(sid, body[sent : sent + n], end_stream=sent + n == len(body))
                sent += n
        for ev in srv.receive_data(c.data_to_send()):
            if isinstance(ev, h2.events.RequestReceived):
                got_headers = [(bytes(k), bytes(v)) for k, v in ev.headers]
            elif isinstance(ev, h2.events.DataReceived):
                got += ev.data
                srv.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
                srv.send_headers(sid, RESP)
                srv.send_data(sid, b"done")
                srv.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        evs = c.receive_data(srv.data_to_send())
        if ended and evs and any(isinstance(e, StreamEnded) for e in evs):
            assert kinds(evs)[-4:] == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
            break
    else:
        raise AssertionError("exchange did not finish")
    assert got == body and got_headers == [*REQ, *big]


def test_h2_client_against_our_server() -> None:
    cl = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    s = H2Connection(False)
    cl.initiate_connection()
    s.initiate_connection()
    for i in range(20):
        sid = cl.get_next_available_stream_id()
        cl.send_headers(sid, [*REQ, (b"x-i", str(i).encode())])
        cl.send_data(sid, b"q" * 1000, end_stream=True)
        evs = s.receive_data(cl.data_to_send())
        req = [e for e in evs if isinstance(e, RequestReceived)]
        assert req and req[0].headers[-1] == (b"x-i", str(i).encode())
        for e in evs:
            if isinstance(e, DataReceived):
                s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        s.send_headers(sid, RESP)
        s.send_data(sid, b"r" * 60000 if i == 0 else b"r", end_stream=False)
        s.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        hevs = cl.receive_data(s.data_to_send())
        names = [type(e).__name__ for e in hevs]
        assert "ResponseReceived" in names and "TrailersReceived" in names and "StreamEnded" in names
        for e in hevs:
            if isinstance(e, h2.events.DataReceived):
                cl.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        s.receive_data(cl.data_to_send())


# -- CONTINUATION flood (CVE-2024-27316, CVE-2023-45288) ---------------------------------------------


def _continuations(n: int, payload: bytes, end: bool) -> bytes:
    out = hf.HeadersFrame(1, data=Encoder().encode(REQ), flags=["END_STREAM"]).serialize()
    for i in range(n):
        flags = ["END_HEADERS"] if end and i == n - 1 else []
        out += hf.ContinuationFrame(1, data=payload, flags=flags).serialize()
    return out


@pytest.mark.parametrize("payload", [b"", b"\x00"], ids=["empty", "1-byte"])
def test_a_flood_of_small_continuations_is_a_connection_error(payload: bytes) -> None:
    s = server(max_continuations=8)
    s.data_to_send()
    with pytest.raises(ProtocolError) as e:
        s.receive_data(_continuations(9, payload, end=False))
    assert e.value.code == f.ENHANCE_YOUR_CALM
    (g,) = frames(s.data_to_send())
    assert isinstance(g, hf.GoAwayFrame) and g.error_code == f.ENHANCE_YOUR_CALM


def test_a_header_block_within_the_continuation_bound_is_a_request() -> None:
    s = server(max_continuations=8)
    events = s.receive_data(_continuations(8, b"", end=True))
    assert any(isinstance(e, RequestReceived) and e.headers == REQ for e in events)
    # The count starts again with the next header block.
    more = hf.HeadersFrame(3, data=Encoder().encode(REQ), flags=["END_STREAM"]).serialize()
    more += b"".join(hf.ContinuationFrame(3, data=b"", flags=["END_HEADERS"] if i == 7 else []).serialize()
                     for i in range(8))
    assert any(isinstance(e, RequestReceived) and e.stream_id == 3 for e in s.receive_data(more))


# -- recurring field blocks (decoded once per table state) -------------------------------------------


def _headers_frame(sid: int, block: bytes, end: bool = True) -> bytes:
    return f.headers_frames(sid, block, end, 16384)


def test_the_same_block_means_what_the_table_says_when_it_arrives() -> None:
    # A peer's block that refers to its dynamic table (index 62, the newest entry) names a
    # different field once the peer has inserted another: the same bytes must decode anew.
    s = server()
    head = b"\x83\x86\x84\x01\x01a"  # POST, http, /, :authority "a" (literal, not indexed)
    first = b"\x40\x05x-one\x011"  # literal with indexing: x-one: 1 becomes index 62
    second = b"\x40\x05x-two\x012"  # x-two: 2 becomes index 62
    again = b"\xbe"  # indexed 62: the newest dynamic entry
    got = []
    for sid, block in ((1, head + first), (3, head + again), (5, head + second), (7, head + again),
                       (9, head + again)):
        events = s.receive_data(_headers_frame(sid, block))
        req = [e for e in events if isinstance(e, RequestReceived)]
        assert len(req) == 1, (sid, kinds(events))
        got.append([(k, v) for k, v in req[0].headers if not k.startswith(b":")])
    assert got == [[(b"x-one", b"1")], [(b"x-one", b"1")], [(b"x-two", b"2")], [(b"x-two", b"2")],
                   [(b"x-two", b"2")]]


def test_a_recurring_block_is_checked_again_for_what_it_now_carries() -> None:
    # The same bytes as a request head are fine; as trailers (pseudo-headers) they are not, and
    # a consumer that changed the first event's header list does not change the second's.
    c, s = pair()
    c.send_headers(1, REQ, end_stream=False)
    events = s.receive_data(c.data_to_send())
    (req,) = [e for e in events if isinstance(e, RequestReceived)]
    req.headers.append((b"x-added", b"by the consumer"))
    c.send_headers(3, REQ, end_stream=True)
    events = s.receive_data(c.data_to_send())
    (again,) = [e for e in events if isinstance(e, RequestReceived)]
    assert again.headers == REQ
    block = Encoder().encode(REQ)  # a fresh encoder: the block c's encoder sent first
    s2 = server()
    s2.receive_data(_headers_frame(1, block, end=False))
    bad = s2.receive_data(_headers_frame(1, block, end=True))  # the request head again, as trailers
    assert [(e.stream_id, e.remote) for e in bad if isinstance(e, StreamReset)] == [(1, False)]
    assert not [e for e in bad if isinstance(e, TrailersReceived)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["data", "end", "reset", "answer"])), max_size=40))
def test_interleaved_streams_keep_their_own_state(ops: list[tuple[int, str]]) -> None:
    # Frames and calls for four streams in any order: each stream's data, end and reset reach
    # that stream only, however the connections look streams up between frames.
    c, s = pair()
    sids = []
    for _ in range(4):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, REQ)
        sids.append(sid)
    s.receive_data(c.data_to_send())
    sent = dict.fromkeys(sids, b"")
    got = dict.fromkeys(sids, b"")
    client_done: set[int] = set()  # ended or reset by the client
    reset: set[int] = set()
    answered: set[int] = set()
    ended: set[int] = set()
    for i, op in ops:
        sid = sids[i]
        if op == "answer":
            if sid in reset or sid in answered:
                with pytest.raises(H2UsageError):
                    s.send_headers(sid, RESP, end_stream=True)
                continue
            s.send_headers(sid, RESP, end_stream=True)
            answered.add(sid)
            evs = c.receive_data(s.data_to_send())
            assert kinds(evs) == ["ResponseReceived", "StreamEnded"] and evs[0].stream_id == sid  # type: ignore[attr-defined]
            continue
        if sid in client_done:
            with pytest.raises(H2UsageError):
                c.send_data(sid, b"x")
            continue
        if op == "data":
            c.send_data(sid, bytes([48 + i]) * (i + 1))
            sent[sid] += bytes([48 + i]) * (i + 1)
        elif op == "end":
            c.send_data(sid, b"", end_stream=True)
            client_done.add(sid)
        else:
            c.reset_stream(sid, f.CANCEL)
            client_done.add(sid)
            reset.add(sid)
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, DataReceived):
                got[ev.stream_id] += ev.data
            elif isinstance(ev, StreamEnded):
                ended.add(ev.stream_id)
            else:
                assert isinstance(ev, StreamReset) and ev.remote and ev.stream_id == sid and sid in reset
    assert got == sent
    assert ended == client_done - reset
    for sid in sids:
        both_done = sid in reset or (sid in client_done and sid in answered)
        assert c.stream_is_open(sid) is not both_done
        assert s.stream_is_open(sid) is not both_done
