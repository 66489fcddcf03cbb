"""An idle HTTP/1 keep-alive connection holds no serving task, and loses nothing by it.

The server's task per connection ends once the connection has been idle for a tick of its timer
(a quarter of the header read timeout); the next request on it starts another. Real loopback
sockets, the protocol on a real event loop, a service that answers at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tether.proxy.config import H1ServerSettings
from tether.proxy.http.body import BytesBody
from tether.proxy.http.h1server import ConnectionRegistry, H1ServerProtocol
from tether.proxy.http.message import Connection, Request, Response

# header_read_timeout 0.2 s: the timer ticks every 50 ms.
_SETTINGS = H1ServerSettings(max_header_bytes=65536, header_read_timeout=0.2, idle_timeout=30.0,
                             body_buffer_high=65536, linger_timeout=1.0, write_stall_timeout=10.0)


async def _service(req: Request) -> Response:
    body = b"served " + req.path
    return Response(200, [(b"content-length", str(len(body)).encode())], BytesBody(body))


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head.split(b"\r\n", 1)[0] + b" " + await asyncio.wait_for(reader.readexactly(length), 5)


def _run(scenario: Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[H1ServerProtocol]],
                            Awaitable[None]], settings: H1ServerSettings = _SETTINGS) -> None:
    async def main() -> None:
        protos: list[H1ServerProtocol] = []

        def factory() -> H1ServerProtocol:
            p = H1ServerProtocol(_service, Connection("inbound", ("127.0.0.1", 0), ("127.0.0.1", 0)), settings,
                                 ConnectionRegistry())
            protos.append(p)
            return p

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await scenario(reader, writer, protos)
        finally:
            writer.close()
            server.close()

    asyncio.run(main())


def _other_tasks() -> set[asyncio.Task[object]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


def test_an_idle_keep_alive_connection_parks_its_task_and_serves_the_next_requests() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       protos: list[H1ServerProtocol]) -> None:
        writer.write(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await _response(reader) == b"HTTP/1.1 200 OK served /one"
        await _until(lambda: not _other_tasks(), 5, "the idle connection's serving task to end")
        # The same connection, after its task ended: one request, then two pipelined in one write.
        writer.write(b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await _response(reader) == b"HTTP/1.1 200 OK served /two"
        writer.write(b"GET /three HTTP/1.1\r\nHost: a\r\n\r\nGET /four HTTP/1.1\r\nHost: a\r\n\r\n")
        assert [await _response(reader), await _response(reader)] == [
            b"HTTP/1.1 200 OK served /three", b"HTTP/1.1 200 OK served /four"]
        assert len(protos) == 1 and protos[0].requests_served == 4

    _run(scenario)


def test_a_parked_connection_still_closes_at_its_idle_timeout() -> None:
    settings = H1ServerSettings(max_header_bytes=65536, header_read_timeout=0.2, idle_timeout=0.6,
                                body_buffer_high=65536, linger_timeout=1.0, write_stall_timeout=10.0)

    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       protos: list[H1ServerProtocol]) -> None:
        writer.write(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await _response(reader) == b"HTTP/1.1 200 OK served /one"
        await _until(lambda: not _other_tasks(), 5, "the idle connection's serving task to end")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        assert time.monotonic() - started < 2

    _run(scenario, settings)
