"""TLS in front of a control-plane gRPC server, for every client a proxy can be.

grpcio's TLS server refuses a connection whose client offered no ALPN (it closes it right after the
handshake), and Linkerd's proxy offers none on its control-plane connections: in Linkerd, the
controller's own proxy terminates that TLS. tether does the same in process: the gRPC server listens
in plaintext on a loopback port only this front knows, and the front takes the TLS connections on
the service's address (ALPN h2 when the client offers it, none otherwise), checks the client's
certificate when it must, and relays the bytes both ways.

The context is asked for at every handshake (``context()``, from OpenSSL's SNI callback), so a
renewed certificate or new trust anchors reach the next connection without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0


def load_cert_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a chain and key held in memory into ``ctx``: through a memfd, never a file on disk."""
    fd = os.memfd_create("tether-control-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(chain_pem + key_pem)
        while data:
            data = data[os.write(fd, data):]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def server_context(chain_pem: bytes, key_pem: bytes, client_anchors_pem: bytes | None) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting the chain; with anchors, a client certificate chained to
    them is required (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert_chain(ctx, chain_pem, key_pem)
    if client_anchors_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_anchors_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


class TlsFront:
    """Accept TLS on ``addr`` and relay each connection to the plaintext server on ``backend``."""

    def __init__(self, context: Callable[[], ssl.SSLContext], backend: tuple[str, int], what: str) -> None:
        self.context = context
        self.backend = backend
        self.what = what
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def _listener_context(self) -> ssl.SSLContext:
        # asyncio binds one context to a server; this one swaps in the current one at each ClientHello.
        first = self.context()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = first.minimum_version
        ctx.verify_mode = first.verify_mode
        ctx.set_alpn_protocols(["h2"])
        ctx.options |= ssl.OP_NO_TICKET

        def switch(sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> int | None:
            try:
                sslobj.context = self.context()
            except Exception:
                log.exception("%s: no TLS context for a new connection", self.what)
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            return None

        ctx.sni_callback = switch
        return ctx

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; returns the port."""
        self._server = await asyncio.start_server(self._accept, host, port, ssl=self._listener_context(),
                                                  ssl_handshake_timeout=HANDSHAKE_TIMEOUT, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._conns.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backend)
        except OSError as e:
            log.error("%s: the gRPC server behind the TLS front is unreachable: %s", self.what, e)
            writer.close()
            return
        sock = up_writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [asyncio.ensure_future(_pump(reader, up_writer)), asyncio.ensure_future(_pump(up_reader, writer))]
        try:
            # One side ending ends the connection: a TLS stream cannot be half-closed.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            for w in (writer, up_writer):
                w.close()
            for p in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await p


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()

