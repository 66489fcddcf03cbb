"""Opaque byte forwarding between two transports, both directions, with half-close.

Used for opaque TCP connections and for upgraded HTTP connections (WebSocket). Each side's
protocol writes what it reads into the other transport, pauses reading when the other side's
write buffer is full (backpressure), forwards EOF as a half-close, and counts bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
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
        self.splice: Splice | None = splice  # None once the splice is done (Splice.close)
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
        if splice is None:
            return
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
            if self.splice is not None:
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
        if self.splice is not None:
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
            # Both halves are done and get no more callbacks: untie them from each other and from
            # the splice, so the connection is freed at once instead of by a full cyclic collection.
            for half in (self.client, self.server):
                half.peer = None
                half.splice = None
            if self._on_close is not None:
                self._on_close(self, self.error)

    def abort(self) -> None:
        for half in (self.client, self.server):
            if half.transport is not None:
                half.transport.abort()


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SPLICE_CHUNK = 1 << 20  # per splice(2) call; the pipe's size bounds what moves at once
_PIPE_SIZE = 256 * 1024  # the kernel's default is 64 KiB


def zero_copy_possible(*transports: asyncio.BaseTransport) -> bool:
    """True when every transport is a plain TCP socket (no TLS) with nothing left to write."""
    if not hasattr(os, "splice"):
        return False
    for t in transports:
        if t.is_closing() or t.get_extra_info("ssl_object") is not None or t.get_extra_info("socket") is None:
            return False
        # (uvloop's transports are not asyncio.WriteTransport subclasses: ask, don't check the type.)
        size = getattr(t, "get_write_buffer_size", None)
        if size is None or size():
            return False
    return True


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose socket now belongs to a ZeroCopySplice."""


class _Pump:
    """One direction of a zero-copy splice: socket -> pipe -> socket with os.splice.

    Only ever fills the pipe when it is empty, so a stalled destination stops reading from the
    source (backpressure: the kernel's socket buffers and one pipe hold the bytes in flight)."""

    def __init__(self, owner: ZeroCopySplice, src: socket.socket, dst: socket.socket, pending: bytes,
                 count: Callable[[int], None]) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self.pending = pending  # bytes read before the splice took over, sent first
        self.count = count
        self.rpipe, self.wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            # Fewer splice calls per MiB; the kernel allocates the pages only while bytes are in flight.
            fcntl.fcntl(self.wpipe, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        self.in_pipe = 0
        self.src_eof = False
        self.eof = False  # the source ended and everything read has been written
        self.reading = False
        self.writing = False

    def start(self, src_eof: bool) -> None:
        self.src_eof = src_eof  # the source ended before the splice took over
        if self.pending and not self._flush_pending():
            self._wait_writable()
        elif src_eof:
            self._src_ended()
        else:
            self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.src.fileno(), self._on_readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src.fileno())

    def _wait_writable(self) -> None:
        self._read_off()
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dst.fileno(), self._on_writable)

    def _flush_pending(self) -> bool:
        try:
            n = self.dst.send(self.pending)
        except BlockingIOError:
            return False
        self.count(n)
        self.pending = self.pending[n:]
        return not self.pending

    def _drain_pipe(self) -> bool:
        """Move what the pipe holds to the destination; False when the destination is full."""
        while self.in_pipe:
            try:
                n = os.splice(self.rpipe, self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return False
            self.in_pipe -= n
            self.count(n)
        return True

    def _on_readable(self) -> None:
        try:
            while True:
                try:
                    n = os.splice(self.src.fileno(), self.wpipe, _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return  # nothing more to read now
                if n == 0:
                    self._read_off()
                    self._src_ended()
                    return
                self.in_pipe += n
                if not self._drain_pipe():
                    self._wait_writable()
                    return
        except OSError as e:
            self.owner.fail(e)

    def _on_writable(self) -> None:
        try:
            if self.pending and not self._flush_pending():
                return
            if not self._drain_pipe():
                return
        except OSError as e:
            self.owner.fail(e)
            return
        self.writing = False
        self.loop.remove_writer(self.dst.fileno())
        if self.src_eof:
            self._src_ended()
        else:
            self._read_on()

    def _src_ended(self) -> None:
        # Everything read has been written (the pipe is only refilled when empty): half-close.
        self.eof = True
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; the other direction will notice
        self.owner.direction_done()

    def stop(self) -> None:
        self._read_off()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst.fileno())
        for fd in (self.rpipe, self.wpipe):
            os.close(fd)


class ZeroCopySplice:
    """Opaque TCP between two plain sockets with os.splice: the bytes move kernel to kernel.

    Same contract as :class:`Splice` (half-close, live byte counters, ``on_close`` once, ``abort``).
    The sockets are taken from their transports (duplicated, then the transports let go)."""

    def __init__(self, conn: Connection, on_close: Callable[[ZeroCopySplice, Exception | None], None] | None = None,
                 src: ByteCounters | None = None, dst: ByteCounters | None = None) -> None:
        self.conn = conn
        self.src: ByteCounters = src if src is not None else TcpStats()
        self.dst: ByteCounters = dst if dst is not None else TcpStats()
        self._on_close = on_close
        self._socks: list[socket.socket] = []
        self._pumps: list[_Pump] = []
        self._done = False
        self.error: Exception | None = None

    def attach(self, client: asyncio.Transport, server: asyncio.Transport, client_leftover: bytes = b"",
               server_leftover: bytes = b"", client_eof: bool = False, server_eof: bool = False) -> None:
        for t in (client, server):
            t.pause_reading()
            sock = t.get_extra_info("socket")
            self._socks.append(socket.socket(fileno=os.dup(sock.fileno())))
            t.set_protocol(_Detached())
            t.abort()  # closes the transport's descriptor; the connection lives on in the duplicate
        c, s = self._socks
        src, dst = self.src, self.dst

        def up(n: int) -> None:  # client -> server
            src.read_bytes += n
            dst.write_bytes += n

        def down(n: int) -> None:  # server -> client
            dst.read_bytes += n
            src.write_bytes += n

        self._pumps = [_Pump(self, c, s, client_leftover, up), _Pump(self, s, c, server_leftover, down)]
        self._pumps[0].start(client_eof)
        self._pumps[1].start(server_eof)

    def direction_done(self) -> None:
        if all(p.eof for p in self._pumps):
            self._finish()

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._finish()

    def abort(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.fail(ConnectionAbortedError("splice aborted"))

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        for p in self._pumps:
            p.stop()
        self._pumps = []  # each pump holds its owner: no cycle outlives the splice
        for sock in self._socks:
            sock.close()
        if self._on_close is not None:
            self._on_close(self, self.error)


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
