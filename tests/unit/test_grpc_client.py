"""The proxy's gRPC client (tether's HTTP/2 client, no grpcio) against real gRPC servers on loopback.

grpcio's server is the peer here; tests/contract runs the same client against grpc-go.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from tether.proxy.grpc_client import GrpcChannel, GrpcError, Status, _Messages, _timeout_header, frame_message


def _ident(b: bytes) -> bytes:
    return b


class Handlers(grpc.GenericRpcHandler):
    """/t.T/Echo (unary), /t.T/Slow (never answers), /t.T/Fail (INVALID_ARGUMENT with a message),
    /t.T/Count (streams n one-byte messages, n = the request's length), /t.T/Big (1 MiB)."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method

        async def echo(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            return req

        async def slow(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            await asyncio.sleep(60)
            return b""

        async def fail(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad csr: 100% wrong")
            return b""

        async def count(req: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            for i in range(len(req)):
                yield bytes([i])

        async def big(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            return b"x" * (1 << 20)

        unary = {"/t.T/Echo": echo, "/t.T/Slow": slow, "/t.T/Fail": fail, "/t.T/Big": big}
        if method in unary:
            return grpc.unary_unary_rpc_method_handler(unary[method], _ident, _ident)
        if method == "/t.T/Count":
            return grpc.unary_stream_rpc_method_handler(count, _ident, _ident)
        return None


def with_server(fn: Callable[[str], Awaitable[None]]) -> Callable[[], None]:
    """Run ``fn(address of a grpcio server)`` on a fresh loop, bounded in time."""

    def run() -> None:
        async def bounded() -> None:
            srv = grpc.aio.server()
            srv.add_generic_rpc_handlers((Handlers(),))
            port = srv.add_insecure_port("127.0.0.1:0")
            await srv.start()
            try:
                async with asyncio.timeout(30):
                    await fn(f"127.0.0.1:{port}")
            finally:
                await srv.stop(0)

        asyncio.run(bounded())

    run.__name__ = fn.__name__
    return run


def bounded(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    def run() -> None:
        async def go() -> None:
            async with asyncio.timeout(30):
                await fn()

        asyncio.run(go())

    run.__name__ = fn.__name__
    return run


@with_server
async def test_unary_and_stream_share_one_connection(server: str) -> None:
    ch = GrpcChannel(server)
    try:
        assert await ch.unary("/t.T/Echo", b"hello", timeout=5) == b"hello"
        assert await ch.unary("/t.T/Echo", b"", timeout=5) == b""  # an empty message is still one message
        got = [m async for m in ch.server_stream("/t.T/Count", b"abcd")]
        assert got == [b"\x00", b"\x01", b"\x02", b"\x03"]
        first = ch._conn
        assert await ch.unary("/t.T/Echo", b"again", timeout=5) == b"again"
        assert ch._conn is first  # no redial while the connection is usable
    finally:
        ch.close()


@with_server
async def test_server_status_and_message_reach_the_caller(server: str) -> None:
    ch = GrpcChannel(server)
    try:
        with pytest.raises(GrpcError) as e:
            await ch.unary("/t.T/Fail", b"", timeout=5)
        assert e.value.code == Status.INVALID_ARGUMENT and e.value.details == "bad csr: 100% wrong"
        with pytest.raises(GrpcError) as e:
            await ch.unary("/t.T/Missing", b"", timeout=5)
        assert e.value.name == "UNIMPLEMENTED"
    finally:
        ch.close()


@with_server
async def test_deadline_is_sent_and_enforced(server: str) -> None:
    ch = GrpcChannel(server)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(GrpcError) as e:
            await ch.unary("/t.T/Slow", b"", timeout=0.3)
        assert e.value.code == Status.DEADLINE_EXCEEDED
        assert loop.time() - t0 < 5
        assert await ch.unary("/t.T/Echo", b"ok", timeout=5) == b"ok"  # the connection survived
    finally:
        ch.close()


@bounded
async def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        ch = GrpcChannel(f"127.0.0.1:{port}", connect_timeout=2)
        with pytest.raises(GrpcError) as e:
            await ch.unary("/t.T/Echo", b"", timeout=5)
    assert e.value.code == Status.UNAVAILABLE and f"127.0.0.1:{port}" in e.value.details


@with_server
async def test_message_above_the_limit_is_refused(server: str) -> None:
    ch = GrpcChannel(server, max_message_bytes=64 * 1024)
    try:
        with pytest.raises(GrpcError) as e:
            await ch.unary("/t.T/Big", b"", timeout=5)
        assert e.value.code == Status.RESOURCE_EXHAUSTED
    finally:
        ch.close()


@bounded
async def test_server_restart_is_survived_by_redialling() -> None:
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers((Handlers(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    ch = GrpcChannel(f"127.0.0.1:{port}")
    try:
        assert await ch.unary("/t.T/Echo", b"1", timeout=5) == b"1"
        await srv.stop(0)
        srv = grpc.aio.server()
        srv.add_generic_rpc_handlers((Handlers(),))
        srv.add_insecure_port(f"127.0.0.1:{port}")
        await srv.start()
        async with asyncio.timeout(10):
            while True:
                try:
                    assert await ch.unary("/t.T/Echo", b"2", timeout=5) == b"2"
                    break
                except GrpcError as e:
                    assert e.code == Status.UNAVAILABLE  # the old connection's end, then a redial
                    await asyncio.sleep(0.05)
    finally:
        ch.close()
        await srv.stop(0)


def test_framing_splits_messages_across_chunks() -> None:
    wire = frame_message(b"abc") + frame_message(b"") + frame_message(b"z" * 300)
    r = _Messages(1024)
    got: list[bytes] = []
    for i in range(0, len(wire), 7):
        got += r.feed(wire[i : i + 7])
    assert got == [b"abc", b"", b"z" * 300] and not r.buf
    with pytest.raises(GrpcError) as e:
        _Messages(1024).feed(b"\x01\x00\x00\x00\x01x")
    assert e.value.code == Status.INTERNAL


def test_timeout_header_fits_eight_digits() -> None:
    assert _timeout_header(10) == b"10000m"
    assert _timeout_header(0.0001) == b"1m"
    assert _timeout_header(10**6) == b"1000000S"


def test_a_name_that_does_not_resolve_is_unavailable_and_a_late_failure_is_not_left_unretrieved() -> None:
    async def main() -> tuple[list[str], list[dict[str, object]]]:
        loop = asyncio.get_running_loop()
        unhandled: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        lookups = 0

        async def getaddrinfo(host: str, port: int, **kw: object) -> list[object]:
            nonlocal lookups
            lookups += 1
            if lookups == 1:  # a resolver that answers after the caller gave up (no DNS server reachable)
                await asyncio.sleep(0.3)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

        loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
        errors = []
        for _ in range(2):
            try:
                await GrpcChannel("ctl.invalid:8086", connect_timeout=0.05).unary("/x/Y", b"", timeout=1)
            except GrpcError as e:
                errors.append(f"{e.code} {e}")
        await asyncio.sleep(0.4)  # the first lookup fails now, with no caller left
        import gc
        gc.collect()
        await asyncio.sleep(0)
        return errors, unhandled

    errors, unhandled = asyncio.run(main())
    assert errors[0].startswith(f"{Status.UNAVAILABLE} ") and "timed out" in errors[0]
    assert errors[1].startswith(f"{Status.UNAVAILABLE} ") and "cannot resolve ctl.invalid" in errors[1]
    assert unhandled == []
