"""CPU per unary gRPC-shaped call through the proxy's HTTP/2 codec (server and client), in memory.

One H2ClientConnection sends requests to one H2ServerProtocol over an in-memory link on a uvloop
loop; the service answers each with a head, one message and grpc-status trailers, the client reads
the body to its end. That is the codec work of one proxied call (the inbound server side plus the
outbound client side), without sockets, layers or the application. It reports process CPU per call.
Run it against the tree to measure: ``PYTHONPATH=<tree>/src python bench/h2_codec_proxy.py [N]``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from tether.proxy.config import ProxyConfig, h2_settings
from tether.proxy.http.body import BytesBody, read_all
from tether.proxy.http.h2client import H2ClientConnection
from tether.proxy.http.h2server import H2ServerProtocol
from tether.proxy.http.message import Connection, Request, Response

HEADERS = [
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    (b"user-agent", b"grpc-python/1.66.0 grpc-c/43.0.0 (linux; chttp2)"),
]
MSG = b"\x00\x00\x00\x00\x0c\n\nworld-0001"
REPLY = b"\x00\x00\x00\x00\x12\n\x10Hello world-0001"


class Link(asyncio.Transport):
    """One end of an in-memory connection: writes are delivered to the peer's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.peer: Link | None = None
        self.protocol: asyncio.Protocol | None = None
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.peer is not None:
            self.loop.call_soon(self.peer.deliver, bytes(data))

    def deliver(self, data: bytes) -> None:
        if not self.closing and self.protocol is not None:
            self.protocol.data_received(data)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)
            if self.peer is not None:
                self.peer.close()

    def is_closing(self) -> bool:
        return self.closing

    def is_reading(self) -> bool:
        return True

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol


async def service(req: Request) -> Response:
    await read_all(req.body, 1 << 20)
    return Response(
        200,
        [(b"content-type", b"application/grpc")],
        BytesBody(REPLY, trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"")]),
    )


async def run(n: int) -> float:
    loop = asyncio.get_running_loop()
    cfg = h2_settings(ProxyConfig())
    ts, tc = Link(loop), Link(loop)
    ts.peer, tc.peer = tc, ts
    server = H2ServerProtocol(service, Connection("inbound", ("10.0.0.1", 1), ("10.0.0.2", 2)), cfg)
    client = H2ClientConnection(cfg)
    server.start(ts)
    client.start(tc)

    async def call() -> None:
        req = Request(b"POST", b"/helloworld.Greeter/SayHello", b"greeter:50051", b"http", list(HEADERS),
                      BytesBody(MSG), version="2")
        resp = await client.send(req)
        body = await read_all(resp.body, 1 << 20)
        assert resp.status == 200 and body == REPLY, (resp.status, body)

    for _ in range(min(n, 500)):
        await call()
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            await call()
        best = min(best, (time.process_time() - t0) / n)
    client.close()
    return best


def main() -> None:
    import tether.native

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    per_call = uvloop.run(run(n))
    print(f"tether.native: {tether.native.state}")
    print(f"{per_call * 1e6:.1f} us CPU per unary call (codec server + client side)")


if __name__ == "__main__":
    main()
