"""The control-plane services' admin port, over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from tether.control import admin


async def ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def serving(ready: bool) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await admin.serve_admin(r, w, metrics=lambda: "up 1\n", ready=lambda: ready,
                                views={"/store-errors.json": lambda: ("[]", "application/json")})

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_metrics_ready_live_views_and_refusals() -> None:
    async def main() -> None:
        for ready in (True, False):
            server = await serving(ready)
            port = server.sockets[0].getsockname()[1]
            metrics = await ask(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            assert metrics.startswith(b"HTTP/1.1 200 OK\r\n") and metrics.endswith(b"\r\n\r\nup 1\n")
            assert b"content-type: text/plain; version=0.0.4\r\n" in metrics
            r = await ask(port, b"GET /ready HTTP/1.1\r\n\r\n")
            assert r.startswith(b"HTTP/1.1 200 OK" if ready else b"HTTP/1.1 503 Service Unavailable")
            assert (await ask(port, b"GET /live?x=1 HTTP/1.1\r\n\r\n")).endswith(b"live\n")
            # The charts' liveness probe: a 404 here would have the kubelet restart the controller.
            ping = await ask(port, b"GET /ping HTTP/1.1\r\n\r\n")
            assert ping.startswith(b"HTTP/1.1 200 OK") and ping.endswith(b"pong\n")
            view = await ask(port, b"GET /store-errors.json HTTP/1.1\r\n\r\n")
            assert b"content-type: application/json\r\n" in view and view.endswith(b"[]")
            assert (await ask(port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
            assert (await ask(port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
            # A request line without a path is closed unanswered.
            assert await ask(port, b"GARBAGE\r\n\r\n") == b""
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_client_that_never_finishes_its_head_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "ADMIN_READ_TIMEOUT", 0.2)

    async def main() -> None:
        server = await serving(True)
        port = server.sockets[0].getsockname()[1]
        assert await ask(port, b"GET /metrics HTTP/1.1\r\n") == b""
        server.close()
        await server.wait_closed()

    asyncio.run(main())
