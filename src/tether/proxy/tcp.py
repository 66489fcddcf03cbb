"""Opaque byte forwarding between two transports, both directions, with half-close.

Used for opaque TCP connections and for upgraded HTTP connections (WebSocket). Each side's
protocol writes what it reads into the other transport, pauses reading when the other side's
write buffer is full (backpressure), forwards EOF as a half-close, and counts bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from tether.proxy.http.message import Connection


class ByteCounters(Protocol):
    read_bytes: int
    write_bytes: int


class TcpStats:
    """Byte counters of one side of a forwarded connection (a stand-in when no metrics series is given)."""

    __slots__ = ("read_bytes", "write_bytes")

    def __init__(self) -> None:
        self.read_bytes = 0  # bytes read from the accepted (client) side
        self.write_bytes = 0  # bytes written to the accepted (client) side


class _Half(asyncio.Protocol):
    """One side of a splice: reads from its own transport, writes to ``peer``'s."""

    def __init__(self, splice: Splice, is_client: bool) -> None:
        self.splice = splice
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None or peer.closed:
            return
        # Counted as the bytes move, so long-lived streams show up in the metrics at once.
        n = len(data)
        splice = self.splice
        if self.is_client:
            splice.src.read_bytes += n
            splice.dst.write_bytes += n
        else:
            splice.dst.read_bytes += n
            splice.src.write_bytes += n
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        if peer is None or peer.eof:
            self.splice.close()
            return False
        return True  # keep our write side open for the other direction

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.eof:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.splice.half_closed(self, exc)


class Pending(asyncio.Protocol):
    """Holds what a freshly connected upstream sends until a Splice takes the transport over."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class Splice:
    """Two transports forwarding to each other until both sides are done."""

    def __init__(self, conn: Connection, on_close: Callable[[Splice, Exception | None], None] | None = None,
                 src: ByteCounters | None = None, dst: ByteCounters | None = None) -> None:
        self.conn = conn
        self.src: ByteCounters = src if src is not None else TcpStats()  # the accepted (client) side
        self.dst: ByteCounters = dst if dst is not None else TcpStats()  # the connected (server) side
        self.client = _Half(self, True)
        self.server = _Half(self, False)
        self.client.peer = self.server
        self.server.peer = self.client
        self._on_close = on_close
        self._done = False
        self.error: Exception | None = None

    def attach(
        self,
        client: asyncio.Transport,
        server: asyncio.Transport,
        client_leftover: bytes = b"",
        server_leftover: bytes = b"",
    ) -> None:
        """Take over two connected transports; leftovers are bytes already read from each side."""
        client.set_protocol(self.client)
        server.set_protocol(self.server)
        self.client.connection_made(client)
        self.server.connection_made(server)
        if client_leftover:
            self.client.data_received(client_leftover)
        if server_leftover:
            self.server.data_received(server_leftover)
        if client.is_closing():
            self.client.connection_lost(None)
        if server.is_closing():
            self.server.connection_lost(None)
        client.resume_reading()
        server.resume_reading()

    def half_closed(self, side: _Half, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        other = side.peer
        if other is not None and other.transport is not None and not other.closed:
            # Let buffered bytes flush, then close.
            other.transport.close()
        self.close()

    def close(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()
        if not self._done and self.client.closed and self.server.closed:
            self._done = True
            if self._on_close is not None:
                self._on_close(self, self.error)

    def abort(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None:
                half.transport.abort()


class _Linger(asyncio.Protocol):
    """After an error response: discard what the client still sends, close on its EOF or a timeout."""

    def __init__(self, transport: asyncio.Transport, timeout: float) -> None:
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.timer.cancel()
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


def linger_close(transport: asyncio.Transport, timeout: float = 2.0) -> None:
    """Close after a final response without a TCP reset (RFC 9112 section 9.6).

    Closing a socket with unread client bytes sends RST, and the client's kernel may then drop
    the response it had not read yet: half-close instead, read and drop until the client closes
    (or ``timeout``), then close.
    """
    transport.set_protocol(_Linger(transport, timeout))
    if transport.can_write_eof():
        transport.write_eof()
    transport.resume_reading()
