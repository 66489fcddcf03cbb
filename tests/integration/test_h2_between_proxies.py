"""HTTP/2 between two proxies under many clients: client -> outbound -> (h2) -> inbound -> server.

Real grpcio (asyncio API) clients and server, two real `tether proxy` processes, default settings.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import yaml

from tether.testing.procs import ProxyProc

pytestmark = pytest.mark.integration

AUTHORITY = "echo.default.svc.cluster.local:50051"
METHOD = "/test.Echo/Bidi"


def _ident(b: bytes) -> bytes:
    return b


async def _bidi(requests, context):  # type: ignore[no-untyped-def]
    async for r in requests:
        yield r[::-1]


async def _slow(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
    await asyncio.sleep(30)
    return request


async def _server() -> tuple[grpc.aio.Server, int]:
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi, _ident, _ident),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow, _ident, _ident),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _two_hops(tmp: Path, app_port: int) -> tuple[ProxyProc, ProxyProc]:
    inbound = ProxyProc(tmp, "in", inbound_app_addr=f"127.0.0.1:{app_port}").wait_ready()
    dst = tmp / "destinations.yaml"
    dst.write_text(yaml.safe_dump({"destinations": {
        AUTHORITY: [{"addr": f"127.0.0.1:{app_port}", "proxy_port": inbound.inbound_port}]}}))
    outbound = ProxyProc(tmp, "out", destinations_file=str(dst)).wait_ready()
    return inbound, outbound


def test_500_long_lived_grpc_streams_through_two_proxies_are_all_served(tmp_path: Path) -> None:
    # 10 channels (client connections) x 50 streaming calls, all open at once: five times the
    # peer's default limit of 100 concurrent streams per connection.
    channels_n, per_channel = 10, 50

    async def scenario() -> tuple[int, list[str], str]:
        server, port = await _server()
        inbound, outbound = await asyncio.to_thread(_two_hops, tmp_path, port)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{outbound.outbound_port}",
                                              options=[("grpc.default_authority", AUTHORITY),
                                                       # one connection per channel, not one shared
                                                       ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(channels_n)]
        errors: list[str] = []
        try:
            async def open_call(i: int) -> grpc.aio.StreamStreamCall:
                call = channels[i % channels_n].stream_stream(METHOD, _ident, _ident)()
                await call.write(b"hello-%d" % i)
                got = await call.read()
                assert got == (b"hello-%d" % i)[::-1], got
                return call

            async with asyncio.timeout(60):
                results = await asyncio.gather(*(open_call(i) for i in range(channels_n * per_channel)),
                                               return_exceptions=True)
                calls = [c for c in results if isinstance(c, grpc.aio.StreamStreamCall)]
                errors += [repr(e)[:200] for e in results if isinstance(e, BaseException)]
                # Every stream is open at this point; each now finishes its exchange.

                async def finish(call: grpc.aio.StreamStreamCall) -> None:
                    await call.write(b"bye")
                    assert await call.read() == b"eyb"
                    await call.done_writing()
                    assert await call.code() == grpc.StatusCode.OK

                done = await asyncio.gather(*(finish(c) for c in calls), return_exceptions=True)
                errors += [repr(e)[:200] for e in done if isinstance(e, BaseException)]
            return len(calls), errors, outbound.log()
        finally:
            for ch in channels:
                await ch.close()
            await asyncio.to_thread(outbound.stop)
            await asyncio.to_thread(inbound.stop)
            await server.stop(0)

    opened, errors, log = asyncio.run(scenario())
    assert errors == [], errors[:5]
    assert opened == channels_n * per_channel
    assert "ejected" not in log.lower(), log[-2000:]


def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.default_authority", AUTHORITY), ("grpc.use_local_subchannel_pool", 1)])


def test_clients_cancelling_across_one_mesh_connection_fail_no_other_call(tmp_path: Path) -> None:
    # 50 clients each cancel 6 calls in flight (300 cancellations in about 8 s, more than the
    # rapid-reset budget of 200 per 10 s) while 10 long-lived calls share the mesh connection.
    clients, rounds = 50, 6

    async def scenario() -> tuple[list[str], int, str]:
        server, port = await _server()
        inbound, outbound = await asyncio.to_thread(_two_hops, tmp_path, port)
        channels = [_channel(outbound.outbound_port) for _ in range(6)]
        errors: list[str] = []
        cancelled = 0
        try:
            async with asyncio.timeout(60):
                long_calls = []
                for i in range(10):
                    call = channels[0].stream_stream(METHOD, _ident, _ident)()
                    await call.write(b"keep-%d" % i)
                    assert await call.read() == (b"keep-%d" % i)[::-1]
                    long_calls.append(call)

                async def client(i: int) -> None:
                    nonlocal cancelled
                    slow = channels[1 + i % 5].unary_unary("/test.Echo/Slow", _ident, _ident)
                    for _ in range(rounds):
                        call = slow(b"x")
                        await asyncio.sleep(1.2)  # the call is in flight upstream; then the client gives up
                        call.cancel()
                        code = await call.code()
                        assert code == grpc.StatusCode.CANCELLED, (code, await call.details())
                        cancelled += 1

                done = await asyncio.gather(*(client(i) for i in range(clients)), return_exceptions=True)
                errors += [repr(e)[:400] for e in done if isinstance(e, BaseException)]
                for i, call in enumerate(long_calls):
                    try:
                        await call.write(b"again-%d" % i)
                        assert await call.read() == (b"again-%d" % i)[::-1]
                        await call.done_writing()
                        assert await call.code() == grpc.StatusCode.OK
                    except Exception as e:
                        errors.append(f"long call {i}: {e!r}"[:200])
            if errors:  # what the proxies said about it
                errors.append("outbound log: " + outbound.log()[-1500:])
                errors.append("inbound log: " + inbound.log()[-1500:])
            return errors, cancelled, inbound.log()
        finally:
            for ch in channels:
                await ch.close()
            await asyncio.to_thread(outbound.stop)
            await asyncio.to_thread(inbound.stop)
            await server.stop(0)

    errors, cancelled, log = asyncio.run(scenario())
    assert errors == [], errors[:3] + errors[-2:]
    assert cancelled == clients * rounds
    assert "rapid" not in log, log[-2000:]


def test_a_real_rapid_reset_flood_gets_goaway_and_other_connections_are_served(tmp_path: Path) -> None:
    import socket

    import h2.config
    import h2.connection
    import h2.events

    async def scenario() -> tuple[int | None, int, bytes]:
        server, port = await _server()
        inbound = await asyncio.to_thread(
            lambda: ProxyProc(tmp_path, "in", inbound_app_addr=f"127.0.0.1:{port}").wait_ready())
        try:
            def flood() -> tuple[int | None, int]:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                headers = [(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Slow"),
                           (":authority", AUTHORITY), ("content-type", "application/grpc"), ("te", "trailers")]
                sent = 0
                with socket.create_connection(("127.0.0.1", inbound.inbound_port)) as s:
                    s.settimeout(10)
                    s.sendall(conn.data_to_send())
                    code: int | None = None
                    try:
                        for _ in range(100):
                            for _pair in range(100):  # HEADERS then RST_STREAM(CANCEL) at once, as the CVE does
                                sid = conn.get_next_available_stream_id()
                                conn.send_headers(sid, headers)
                                conn.reset_stream(sid, 8)
                                sent += 1
                            s.sendall(conn.data_to_send())
                            s.setblocking(False)
                            try:
                                data = s.recv(65536)
                            except BlockingIOError:
                                data = None
                            finally:
                                s.setblocking(True)
                            if data == b"":
                                break
                            for ev in conn.receive_data(data or b""):
                                if isinstance(ev, h2.events.ConnectionTerminated):
                                    return ev.error_code, sent
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    while data := s.recv(65536):
                        for ev in conn.receive_data(data):
                            if isinstance(ev, h2.events.ConnectionTerminated):
                                return ev.error_code, sent
                    return code, sent

            code, sent = await asyncio.to_thread(flood)
            # Another client on another connection is served as usual.
            ch = _channel(inbound.inbound_port)
            try:
                call = ch.stream_stream(METHOD, _ident, _ident)()
                await call.write(b"after")
                got = await call.read()
                await call.done_writing()
            finally:
                await ch.close()
            return code, sent, got
        finally:
            await asyncio.to_thread(inbound.stop)
            await server.stop(0)

    code, sent, got = asyncio.run(scenario())
    assert code == 0xB, f"GOAWAY error code {code} after {sent} HEADERS+RST_STREAM pairs (want ENHANCE_YOUR_CALM)"
    assert sent <= 10_000
    assert got == b"retfa"
