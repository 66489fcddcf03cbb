"""The HTTP/2 server and client codecs talking to each other over an in-memory link.

The link delivers writes with ``loop.call_soon`` in order, so "let the loop run until nothing is
left to do" (:func:`settle`) is deterministic: no timers, no sockets.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import pytest
from h2.errors import ErrorCodes

from tether.proxy.config import ProxyConfig, h2_settings
from tether.proxy.http.body import Body, BodyError, BytesBody, PipeBody, read_all
from tether.proxy.http.h2client import H2ClientConnection
from tether.proxy.http.h2codec import H2ClientCodec, H2ConnectionClosed, H2ServerCodec, H2StreamReset
from tether.proxy.http.h2conn import goaway_frame
from tether.proxy.http.h2server import IDLE_WORKERS, H2ServerProtocol
from tether.proxy.http.message import Connection, Request, Response
from tether.testing.fakes import until


def async_test(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test on a fresh loop, bounded in time (no pytest-asyncio here)."""

    def run() -> None:
        errors: list[dict[str, object]] = []

        async def bounded() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
            async with asyncio.timeout(20):
                await fn()

        asyncio.run(bounded())
        assert not errors, f"errors in loop callbacks: {errors}"

    run.__name__ = fn.__name__
    return run


class FakeTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: FakeTransport | None = None
        self.protocol: asyncio.Protocol | None = None
        self.closing = False
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing
        self.written += data
        peer = self.peer
        if peer is not None:
            self.loop.call_soon(peer.deliver, bytes(data))

    def deliver(self, data: bytes) -> None:
        if not self.closing and self.protocol is not None:
            self.protocol.data_received(data)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.protocol is not None:
            self.loop.call_soon(self.protocol.connection_lost, None)
        if self.peer is not None:
            # As TCP does, what was written before the close reaches the peer first.
            self.loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass  # deliveries go on; the protocol keeps what arrives while paused in its backlog

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        peer = self.peer
        if peer is not None:
            self.loop.call_soon(peer.deliver_eof)

    def deliver_eof(self) -> None:
        if not self.closing and self.protocol is not None and not self.protocol.eof_received():
            self.close()

    def is_closing(self) -> bool:
        return self.closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol


Handler = Callable[[Request], Awaitable[Response]]


def pair(
    handler: Handler, config: ProxyConfig | None = None, max_pending: int | None = None
) -> tuple[H2ServerProtocol, H2ClientConnection, FakeTransport]:
    loop = asyncio.get_running_loop()
    cfg = h2_settings(config or ProxyConfig())
    ts, tc = FakeTransport(loop), FakeTransport(loop)
    ts.peer, tc.peer = tc, ts
    server = H2ServerProtocol(handler, Connection("inbound", ("10.0.0.1", 1), ("10.0.0.2", 2)), cfg)
    client = H2ClientConnection(cfg, max_pending)
    server.start(ts)
    client.start(tc)
    return server, client, ts


async def settle(rounds: int = 200) -> None:
    """Run the loop until the in-memory link has nothing left to deliver."""
    for _ in range(rounds):
        await asyncio.sleep(0)




class CountingBody(Body):
    """Produces ``total`` bytes in 16 KiB chunks, counting what the sender pulled."""

    def __init__(self, total: int, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.length = None
        self.total = total
        self.produced = 0
        self.trailers_at_end = trailers
        self._trailers = None
        self.discarded = False

    async def read(self) -> bytes:
        n = min(16384, self.total - self.produced)
        if n == 0:
            self._trailers = self.trailers_at_end
            return b""
        self.produced += n
        return b"x" * n

    def is_end_known(self) -> bool:
        return False

    def discard(self) -> None:
        self.discarded = True


def req(body: Body | None = None, path: bytes = b"/") -> Request:
    r = Request(method=b"POST", path=path, authority=b"svc", headers=[(b"te", b"trailers")])
    if body is not None:
        r.body = body
    return r


@async_test
async def test_trailers_flow_both_ways() -> None:
    seen: dict[str, object] = {}

    async def handler(r: Request) -> Response:
        seen["body"] = await read_all(r.body, 1 << 20)
        seen["trailers"] = r.body.trailers
        seen["authority"] = r.authority
        return Response(200, [(b"content-type", b"application/grpc")], BytesBody(b"ok", [(b"grpc-status", b"0")]))

    _, client, _ = pair(handler)
    resp = await client.send(req(CountingBody(40000, [(b"x-req-trailer", b"1")])))
    assert resp.status == 200
    assert await read_all(resp.body, 100) == b"ok"
    assert resp.body.trailers == [(b"grpc-status", b"0")]
    assert seen == {"body": b"x" * 40000, "trailers": [(b"x-req-trailer", b"1")], "authority": b"svc"}


@async_test
async def test_whole_bodies_in_memory_arrive_whole_with_their_trailers_beyond_a_window() -> None:
    # Bodies already in memory go with their head when the peer's windows take them; a larger
    # one (here twice the 64 KiB window) waits for WINDOW_UPDATEs, its trailers after it.
    seen: list[tuple[bytes, object]] = []

    async def handler(r: Request) -> Response:
        data = await read_all(r.body, 1 << 20)
        seen.append((data, r.body.trailers))
        return Response(200, [(b"content-type", b"application/grpc")], BytesBody(data[::-1], [(b"grpc-status", b"0")]))

    _, client, _ = pair(handler)
    for size in (5, 70000, 131072):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        resp = await client.send(req(BytesBody(data, [(b"x-req-trailer", str(size).encode())])))
        assert await read_all(resp.body, 1 << 20) == data[::-1]
        assert resp.body.trailers == [(b"grpc-status", b"0")]
    assert [(len(d), t) for d, t in seen] == [(5, [(b"x-req-trailer", b"5")]), (70000, [(b"x-req-trailer", b"70000")]),
                                             (131072, [(b"x-req-trailer", b"131072")])]


@async_test
async def test_finished_calls_leave_no_reference_cycles() -> None:
    """A finished call's objects are freed by reference counting: none waits for the garbage
    collector (whose passes grow with the calls per second and show in the tail latency)."""

    async def handler(r: Request) -> Response:
        await read_all(r.body, 1 << 20)
        return Response(200, [(b"content-type", b"application/grpc")], BytesBody(b"ok", [(b"grpc-status", b"0")]))

    _, client, _ = pair(handler)

    async def call() -> None:
        resp = await client.send(req(BytesBody(b"hello")))
        assert await read_all(resp.body, 100) == b"ok"

    await call()  # the connection's own objects exist from here on
    await settle()
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            await call()
        await settle()
        assert gc.collect() == 0
    finally:
        gc.enable()


@async_test
async def test_slow_reader_stops_the_window_and_other_streams_still_flow() -> None:
    gate = asyncio.Event()
    bodies: list[Body] = []

    async def handler(r: Request) -> Response:
        if r.path == b"/slow":
            bodies.append(r.body)
            await gate.wait()
            return Response(200, [], BytesBody(await read_all(r.body, 1 << 30)))
        return Response(200, [], BytesBody(b"fast"))

    _, client, _ = pair(handler)
    upload = CountingBody(1 << 20)
    slow = asyncio.ensure_future(client.send(req(upload, b"/slow")))
    await until(lambda: bool(bodies), "slow handler started")
    await settle()
    # Nothing was read, so nothing was acknowledged: the sender is held at the stream window
    # (65535) plus the chunk it had pulled when the window closed.
    assert upload.produced <= 65535 + 16384
    pipe = bodies[0]
    assert isinstance(pipe, PipeBody)
    assert pipe._buffered <= 65535
    # Another stream on the same connection is not blocked by the stalled one.
    fast = await client.send(req(path=b"/fast"))
    assert await read_all(fast.body, 100) == b"fast"
    gate.set()
    resp = await slow
    assert len(await read_all(resp.body, 1 << 30)) == 1 << 20


@async_test
async def test_service_error_is_502_with_reason() -> None:
    async def handler(r: Request) -> Response:
        raise ConnectionRefusedError("upstream refused")

    _, client, _ = pair(handler)
    resp = await client.send(req())
    assert resp.status == 502
    assert resp.header(b"l5d-proxy-error") == b"upstream refused"


class FailingBody(Body):
    def __init__(self, exc: BaseException) -> None:
        self.length = None
        self.exc = exc
        self.sent = False

    async def read(self) -> bytes:
        if not self.sent:
            self.sent = True
            return b"partial"
        raise self.exc

    def is_end_known(self) -> bool:
        return False


@async_test
async def test_failure_after_headers_resets_with_the_upstream_code() -> None:
    upstream_reset = H2StreamReset(7, ErrorCodes.CANCEL, remote=True)
    wrapped = BodyError("upstream reset")
    wrapped.__cause__ = upstream_reset

    async def handler(r: Request) -> Response:
        return Response(200, [], FailingBody(wrapped) if r.path == b"/reset" else FailingBody(ValueError()))

    _, client, _ = pair(handler)
    for path, code in ((b"/reset", ErrorCodes.CANCEL), (b"/other", ErrorCodes.INTERNAL_ERROR)):
        resp = await client.send(req(path=path))
        assert resp.status == 200
        assert await resp.body.read() == b"partial"
        with pytest.raises(BodyError) as ei:
            await resp.body.read()
        cause = ei.value.__cause__
        assert isinstance(cause, H2StreamReset) and cause.remote and cause.error_code == code


@async_test
async def test_client_discard_resets_stream_and_releases_server_producer() -> None:
    produced = CountingBody(10 << 20)

    async def handler(r: Request) -> Response:
        return Response(200, [], produced)

    server, client, _ = pair(handler)
    resp = await client.send(req())
    assert await resp.body.read()
    resp.body.discard()  # the caller gave up: RST_STREAM(CANCEL) upstream
    await until(lambda: server.active_streams == 0, "server handler finished")
    # The server stopped pulling from (and released) the body it was forwarding.
    assert produced.discarded
    assert produced.produced < 1 << 20


@async_test
async def test_cancelled_send_resets_upstream_stream() -> None:
    started = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def handler(r: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        raise AssertionError

    _, client, _ = pair(handler)
    t = asyncio.ensure_future(client.send(req()))
    await started.wait()
    t.cancel()
    await until(handler_cancelled.is_set, "server handler cancelled by RST_STREAM")


@async_test
async def test_drain_finishes_in_flight_and_refuses_new_requests() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def handler(r: Request) -> Response:
        started.set()
        await gate.wait()
        return Response(200, [], BytesBody(b"done"))

    server, client, ts = pair(handler)
    inflight = asyncio.ensure_future(client.send(req()))
    await started.wait()
    drain = asyncio.ensure_future(server.drain(10.0))
    await until(lambda: not client.usable, "client saw GOAWAY")
    with pytest.raises(H2ConnectionClosed) as ei:
        await client.send(req())
    assert ei.value.retryable
    gate.set()
    resp = await inflight
    assert await read_all(resp.body, 100) == b"done"
    await drain
    assert ts.closing


@async_test
async def test_goaway_fails_streams_above_last_id_as_retryable() -> None:
    gate = asyncio.Event()
    seen: list[int] = []

    async def handler(r: Request) -> Response:
        seen.append(1)
        await gate.wait()
        return Response(200, [], BytesBody(b"a"))

    server, client, _ = pair(handler)
    first = asyncio.ensure_future(client.send(req()))
    second = asyncio.ensure_future(client.send(req()))
    await until(lambda: len(seen) == 2, "both streams reached the server")
    server._write_goaway(ErrorCodes.NO_ERROR, 1)  # as if the server never saw stream 3
    with pytest.raises(H2ConnectionClosed) as ei:
        await second
    assert ei.value.retryable
    gate.set()
    assert (await first).status == 200


@async_test
async def test_client_waits_for_peer_stream_limit() -> None:
    gate = asyncio.Event()
    running: list[int] = []

    async def handler(r: Request) -> Response:
        running.append(1)
        await gate.wait()
        return Response(200, [], BytesBody(b"x"))

    cfg = ProxyConfig(h2_max_concurrent_streams=2)
    server, client, _ = pair(handler, cfg, max_pending=3)
    await settle()  # exchange SETTINGS
    assert client.max_concurrent_streams == 2
    sends = [asyncio.ensure_future(client.send(req())) for _ in range(5)]
    await settle()
    assert len(running) == 2 and server.active_streams == 2
    # The wait queue is bounded too: a sixth request fails fast, retryable elsewhere.
    with pytest.raises(H2ConnectionClosed) as ei:
        await client.send(req())
    assert ei.value.retryable
    gate.set()
    for s in sends:
        assert (await s).status == 200
    assert len(running) == 5


@async_test
async def test_rapid_reset_closes_connection() -> None:
    async def handler(r: Request) -> Response:
        await asyncio.Event().wait()
        raise AssertionError

    cfg = ProxyConfig(h2_max_resets_per_window=20)
    _, client, ts = pair(handler, cfg)
    await settle()
    for _ in range(40):
        t = asyncio.ensure_future(client.send(req()))
        await settle(5)
        t.cancel()
        await settle(5)
        if ts.closing:
            break
    assert ts.closing
    assert bytes(ts.written[-4:]) == b"\x00\x00\x00\x0b"  # GOAWAY's error code: ENHANCE_YOUR_CALM


@async_test
async def test_initial_bytes_handover_after_detection() -> None:
    """The preface already read by detection is handed to the protocol with the transport."""
    loop = asyncio.get_running_loop()

    async def handler(r: Request) -> Response:
        return Response(204)

    cfg = h2_settings(ProxyConfig())
    ts, tc = FakeTransport(loop), FakeTransport(loop)
    ts.peer, tc.peer = tc, ts
    client = H2ClientConnection(cfg)
    tc.set_protocol(client)
    # Capture the client's preface instead of delivering it, as a detector would.
    tc.peer = None
    client.connection_made(tc)
    initial = bytes(tc.written)
    assert initial.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    tc.peer = ts
    server = H2ServerProtocol(handler, Connection("inbound", ("a", 1), ("b", 2)), cfg)
    server.start(ts, initial)
    resp = await client.send(req())
    assert resp.status == 204


@async_test
async def test_unread_request_bodies_do_not_leak_the_connection_window() -> None:
    async def handler(r: Request) -> Response:
        await until(r.body.is_end_known, "request body fully received (and left unread)")
        return Response(200, [], BytesBody(b"ignored your body"))

    # Connection window = 2 streams x 65535: ten unread 60 KB bodies would exhaust it.
    _, client, _ = pair(handler, ProxyConfig(h2_max_concurrent_streams=2))
    for _ in range(10):
        resp = await client.send(req(BytesBody(b"y" * 60000)))
        assert await read_all(resp.body, 100) == b"ignored your body"


@async_test
async def test_idle_connection_is_closed_with_goaway() -> None:
    async def handler(r: Request) -> Response:
        return Response(204)

    server, client, ts = pair(handler, ProxyConfig(idle_timeout=0.05))
    assert (await client.send(req())).status == 204
    async with asyncio.timeout(5):
        await server.wait_closed()
    assert ts.closing
    assert not client.usable
    assert bytes(ts.written[-4:]) == b"\x00\x00\x00\x00"  # GOAWAY(NO_ERROR)


@async_test
async def test_upstream_reset_code_propagates_through_a_proxy_hop() -> None:
    upstream_cause = BodyError("app stream broke")
    upstream_cause.__cause__ = H2StreamReset(1, ErrorCodes.FLOW_CONTROL_ERROR, remote=True)

    async def app(r: Request) -> Response:
        return Response(200, [], FailingBody(upstream_cause))

    _, upstream, _ = pair(app)

    async def proxy(r: Request) -> Response:
        return await upstream.send(r)

    _, client, _ = pair(proxy)
    resp = await client.send(req())
    assert await resp.body.read() == b"partial"
    with pytest.raises(BodyError) as ei:
        await resp.body.read()
    cause = ei.value.__cause__
    assert isinstance(cause, H2StreamReset) and cause.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_h2_implementation_satisfies_the_codec_interface() -> None:
    # Checked by mypy: the layers depend on these Protocols, not on h2.
    server: type[H2ServerCodec] = H2ServerProtocol
    client: type[H2ClientCodec] = H2ClientConnection
    assert server and client


def test_goaway_frame_bytes() -> None:
    from hyperframe.frame import GoAwayFrame

    f = GoAwayFrame(0)
    f.last_stream_id, f.error_code = 2**31 - 1, ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_frame(ErrorCodes.ENHANCE_YOUR_CALM, 2**31 - 1) == f.serialize()


@async_test
async def test_client_close_fails_in_flight_and_closes_the_connection() -> None:
    started = asyncio.Event()

    async def handler(r: Request) -> Response:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError

    server, client, _ = pair(handler)
    inflight = asyncio.ensure_future(client.send(req()))
    await started.wait()
    client.close()
    with pytest.raises(H2ConnectionClosed):
        await inflight
    assert not client.usable
    async with asyncio.timeout(5):
        await server.wait_closed()
    assert server.active_streams == 0


@async_test
async def test_protocol_error_from_peer_is_a_goaway_not_an_exception() -> None:
    """Bad frames from the peer end the connection with GOAWAY naming the error (the loop sees no
    exception: async_test fails on any)."""

    async def handler(r: Request) -> Response:
        return Response(204)

    loop = asyncio.get_running_loop()
    ts = FakeTransport(loop)
    server = H2ServerProtocol(handler, Connection("inbound", ("a", 1), ("b", 2)), h2_settings(ProxyConfig()))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    # DATA with a pad length longer than the frame: PROTOCOL_ERROR (a FrameError inside the parser).
    server.start(ts, preface + b"\x00\x00\x02\x00\x08\x00\x00\x00\x01\x05x")
    await settle(5)
    from hyperframe.frame import Frame, GoAwayFrame

    data = bytes(ts.written)
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    assert isinstance(frames[-1], GoAwayFrame) and frames[-1].error_code == ErrorCodes.PROTOCOL_ERROR
    assert b"padding" in frames[-1].additional_data


# -- streams served by long-lived workers (no Task per stream) -----------------------------------------


@async_test
async def test_a_stream_after_a_cancelled_one_runs_with_working_timeouts() -> None:
    # Streams share the connection's handler tasks: a client reset cancels only its own stream,
    # and the next stream's own timeout still raises TimeoutError (not a leftover cancellation).
    started = asyncio.Event()
    seen: list[str] = []

    async def handler(r: Request) -> Response:
        if r.path == b"/hang":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        try:
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()
        except TimeoutError:
            seen.append("timeout")
        return Response(200, [], BytesBody(r.path))

    server, client, _ = pair(handler)
    hang = asyncio.ensure_future(client.send(req(path=b"/hang")))
    await started.wait()
    hang.cancel()
    await until(lambda: seen == ["cancelled"], "the reset stream's handler cancelled")
    for i in range(3):
        resp = await client.send(req(path=b"/next%d" % i))
        assert await read_all(resp.body, 100) == b"/next%d" % i
    assert seen == ["cancelled", "timeout", "timeout", "timeout"]
    assert server.active_streams == 0


@async_test
async def test_handler_tasks_are_bounded_and_end_with_the_connection() -> None:
    n = IDLE_WORKERS + 6
    gate = asyncio.Event()
    running: list[int] = []

    async def handler(r: Request) -> Response:
        running.append(1)
        await gate.wait()
        return Response(200, [], BytesBody(b"ok"))

    before = len(asyncio.all_tasks())
    server, client, _ = pair(handler)
    calls = [asyncio.ensure_future(client.send(req())) for _ in range(n)]
    await until(lambda: len(running) == n, "every stream has its handler running at once")
    assert server.active_streams == n
    gate.set()
    for c in calls:
        assert await read_all((await c).body, 100) == b"ok"
    await until(lambda: server.active_streams == 0, "handlers done")
    await settle()
    # The extra handlers ended; a few stay for the connection's next streams.
    assert len(asyncio.all_tasks()) - before <= IDLE_WORKERS
    client.close()
    await server.wait_closed()
    await settle()
    assert len(asyncio.all_tasks()) == before
