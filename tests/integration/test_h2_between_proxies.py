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


async def _server() -> tuple[grpc.aio.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Bidi": grpc.stream_stream_rpc_method_handler(_bidi, _ident, _ident)})
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
