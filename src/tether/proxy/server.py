"""What both directions do with a detected connection: serve HTTP/1 or HTTP/2 with a stack, or
forward opaque TCP; and the live connections each direction drains on shutdown.

Each direction's ``stack.py`` decides *what* a connection gets (its HTTP service, its TCP target);
:class:`Connections` does the hand-off to the codecs and keeps the connections for draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from tether.proxy.config import H1ServerSettings, H2Settings
from tether.proxy.connect import connect_tcp
from tether.proxy.http.h1server import ConnectionRegistry, H1ServerProtocol
from tether.proxy.http.message import Connection, Service
from tether.proxy.metrics import MetricsRegistry, TcpMetrics
from tether.proxy.targets import EndpointTarget
from tether.proxy.tcp import Pending, Splice, ZeroCopySplice, zero_copy_possible

if TYPE_CHECKING:
    from tether.proxy.http.h2server import H2ServerProtocol
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)


class Connections:
    """One direction's live connections: HTTP/1, HTTP/2 and opaque TCP."""

    def __init__(self, direction: str, h1: H1ServerSettings, h2: H2Settings, zero_copy: bool) -> None:
        self.direction = direction
        self.h1_settings = h1
        self.h2_settings = h2
        self.zero_copy = zero_copy
        self.h1 = ConnectionRegistry()
        self.h2: set[H2ServerProtocol] = set()
        self.tcp: set[Splice | ZeroCopySplice] = set()
        self._tcp_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def serve_h1(self, service: Service, transport: asyncio.Transport, conn: Connection, buf: bytes,
                 tcp: TcpMetrics) -> None:
        h1 = H1ServerProtocol(service, conn, self.h1_settings, self.h1, tcp)
        transport.set_protocol(h1)
        h1.connection_made(transport)
        if buf:
            h1.data_received(buf)

    def serve_h2(self, service: Service, transport: asyncio.Transport, conn: Connection, buf: bytes,
                 tcp: TcpMetrics) -> None:
        # Imported on first use: a proxy that never sees HTTP/2 does not carry its codec in memory.
        from tether.proxy.http.h2server import H2ServerProtocol

        h2 = H2ServerProtocol(service, conn, self.h2_settings)
        h2.tcp = tcp  # counts bytes both ways, the detected preface included (start() feeds it)
        self.h2.add(h2)
        transport.set_protocol(h2)
        h2.start(transport, buf)
        self.spawn(self._forget_h2(h2, tcp))

    async def _forget_h2(self, h2: H2ServerProtocol, tcp: TcpMetrics) -> None:
        try:
            await h2.wait_closed()
        finally:
            self.h2.discard(h2)
            tcp.closed()

    def forward_tcp(self, conn: Connection, client: asyncio.Transport, client_pending: Pending,
                    upstream: asyncio.Transport, pending: Pending, src: TcpMetrics, dst: TcpMetrics) -> None:
        """Splice an accepted connection and its upstream until both sides are done."""

        def on_close(splice: Splice | ZeroCopySplice, exc: Exception | None) -> None:
            self.tcp.discard(splice)
            self._tcp_closed.set()
            err = None if exc is None else "i/o"
            src.closed(err)
            dst.closed(err)

        if self.zero_copy and zero_copy_possible(client, upstream):
            log.debug("%s opaque connection from %s:%d: zero-copy splice", self.direction, *conn.peer)
            zc = ZeroCopySplice(conn, on_close, src=src, dst=dst)
            self.tcp.add(zc)
            zc.attach(client, upstream, bytes(client_pending.buffer), bytes(pending.buffer),
                      client_pending.eof, pending.eof)
            return
        splice = Splice(conn, on_close, src=src, dst=dst)
        self.tcp.add(splice)
        splice.attach(client, upstream, bytes(client_pending.buffer), bytes(pending.buffer))
        if client_pending.eof:
            splice.client.eof_received()
        if pending.eof:
            splice.server.eof_received()

    async def connect_and_forward(self, metrics: MetricsRegistry, identity: IdentityClient | None,
                                  conn: Connection, transport: asyncio.Transport, client_pending: Pending,
                                  target: EndpointTarget, timeout: float, handshake_timeout: float,
                                  fallbacks: Sequence[EndpointTarget] = ()) -> None:
        """Connect to ``target`` (a refused connection tries each of ``fallbacks`` in turn: other
        endpoints of the same Service) and splice the accepted connection to it, counting both sides."""
        direction = self.direction
        src = metrics.tcp(direction, "src", target.addr, tls=conn.tls, client_id=conn.client_id)
        src.opened()
        tries = [target, *fallbacks]
        for i, t in enumerate(tries):
            try:
                upstream, pending = await connect_tcp(t, identity, timeout, handshake_timeout)
            except (OSError, TimeoutError) as e:
                err = "connect_timeout" if isinstance(e, TimeoutError) else "unexpected"
                metrics.tcp_error(direction, err, t.addr)
                log.info("%s TCP connect to %s:%d failed: %s", direction, t.dial[0], t.dial[1], e)
                if i + 1 < len(tries) and not isinstance(e, TimeoutError):
                    continue  # refused: nothing was sent, another endpoint may take it
                src.closed(err)
                transport.abort()
                return
            dst = metrics.tcp(direction, "dst", t.addr, tls=conn.tls or t.server_id is not None,
                              server_id=t.server_id)
            dst.opened()
            self.forward_tcp(conn, transport, client_pending, upstream, pending, src, dst)
            return

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drains(self, grace: float) -> list[Coroutine[Any, Any, object]]:
        """The HTTP drains (finish in-flight requests, close idle connections, GOAWAY)."""
        return [self.h1.drain(grace), *(h2.drain(grace) for h2 in list(self.h2))]

    async def drain_tcp(self, deadline: float) -> None:
        """Opaque streams have no request boundary: wait for them until ``deadline``, then abort."""
        while self.tcp and time.monotonic() < deadline:
            self._tcp_closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._tcp_closed.wait()
        for splice in list(self.tcp):
            splice.abort()

    def cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def hold_opaque(transport: asyncio.Transport, buf: bytes, eof: bool) -> Pending:
    """Until the upstream is connected, whatever the client sends is held (a pause in
    connection_made is not always honoured, and nothing may be dropped)."""
    pending = Pending()
    pending.buffer += buf
    pending.eof = eof
    transport.set_protocol(pending)
    transport.pause_reading()
    return pending
