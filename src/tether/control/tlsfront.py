"""TLS in front of a control-plane gRPC server, for every client a proxy can be.

grpcio's TLS server refuses a connection whose client offered no ALPN (it closes it right after the
handshake), and Linkerd's proxy offers none on its control-plane connections: in Linkerd, the
controller's own proxy terminates that TLS. tether does the same in process: the gRPC server listens
in plaintext on a loopback port only this front knows, and the front takes the TLS connections on
the service's address (ALPN h2 when the client offers it, none otherwise), checks the client's
certificate when it must, and relays the bytes both ways.

The context is asked for at every handshake (``context()``, from OpenSSL's SNI callback), so a
renewed certificate or new trust anchors reach the next connection without a restart.

With ``accept_plaintext`` the front also relays clients that speak plaintext gRPC on the same
address: the proxies of a release before control-plane TLS, during an upgrade (in Linkerd the
controller's own proxy accepts plaintext the same way). The first byte tells them apart: every TLS
connection opens with a handshake record (0x16), an HTTP/2 client with its preface ("PRI ...").
A client that sends no byte within HANDSHAKE_TIMEOUT is closed. ``connections`` counts what was
served and refused, so an operator sees when no plaintext client is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

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


# The content type of a TLS record carrying a handshake message: the first byte of any TLS client.
TLS_HANDSHAKE_RECORD = 0x16


class TlsFront:
    """Accept TLS (and, if allowed, plaintext) on ``addr`` and relay each connection to ``backend``."""

    def __init__(self, context: Callable[[], ssl.SSLContext], backend: tuple[str, int], what: str, *,
                 accept_plaintext: bool = False) -> None:
        self.context = context
        self.backend = backend
        self.what = what
        self.accept_plaintext = accept_plaintext
        # served: by protocol; refused: plaintext when not accepted, a failed or timed-out handshake.
        self.connections = {"tls": 0, "plaintext": 0, "refused_plaintext": 0, "refused_handshake": 0}
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def _listener_context(self) -> ssl.SSLContext:
        # One context per listener; this one swaps in the current one at each ClientHello.
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
        tls = self._listener_context()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=1024)
        self._listener.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_loop(self._listener, tls))
        return int(self._listener.getsockname()[1])

    def metrics_lines(self, prefix: str) -> list[str]:
        """Prometheus lines: connections served by protocol, and refused by reason."""
        c = self.connections
        return [
            f"# HELP {prefix}_connections_total Client connections served on the service address, by protocol.",
            f"# TYPE {prefix}_connections_total counter",
            f'{prefix}_connections_total{{tls="true"}} {c["tls"]}',
            f'{prefix}_connections_total{{tls="false"}} {c["plaintext"]}',
            f"# HELP {prefix}_connections_refused_total Client connections closed unserved, by reason.",
            f"# TYPE {prefix}_connections_refused_total counter",
            f'{prefix}_connections_refused_total{{reason="plaintext"}} {c["refused_plaintext"]}',
            f'{prefix}_connections_refused_total{{reason="handshake"}} {c["refused_handshake"]}',
        ]

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _accept_loop(self, listener: socket.socket, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _peer = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and the like: the listener stays, the next accept may work
                log.warning("%s: accept failed: %s", self.what, e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._serve(conn, tls))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, conn: socket.socket, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await _peek(loop, conn, HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError):
            first = b""
        if not first:  # closed, or silent for HANDSHAKE_TIMEOUT
            conn.close()
            return
        is_tls = first[0] == TLS_HANDSHAKE_RECORD
        if not is_tls and not self.accept_plaintext:
            self.connections["refused_plaintext"] += 1
            log.debug("%s: plaintext client refused (TLS only)", self.what)
            conn.close()
            return
        try:
            reader, writer = await _streams(loop, conn, tls if is_tls else None)
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as e:
            self.connections["refused_handshake"] += 1
            log.debug("%s: TLS handshake failed: %s", self.what, e)
            conn.close()
            return
        self.connections["tls" if is_tls else "plaintext"] += 1
        await self._relay(reader, writer)

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


async def start_serving(server: Any, front: TlsFront | None, host: str, port: int,
                        on_failure: Callable[[], None]) -> int | None:
    """Start a gRPC server and, if it has one, its TLS front on ``host:port`` (its port, else None).

    If either fails (its address taken, say), ``on_failure`` runs and the gRPC server is stopped here,
    in the loop, before the error goes on: left to the collector, it would complain once the loop has
    closed."""
    try:
        await server.start()
        return await front.start(host, port) if front is not None else None
    except BaseException:
        on_failure()
        await server.stop(None)
        raise


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket, timeout: float) -> bytes:
    """The connection's first byte, left in the socket for whoever reads it next (b"": closed)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return conn.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                pass
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())


def _set_once(future: asyncio.Future[None]) -> None:
    # A reader callback may run again before the awaiting task removes it.
    if not future.done():
        future.set_result(None)


async def _streams(loop: asyncio.AbstractEventLoop, conn: socket.socket,
                   tls: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket; with ``tls``, once the server-side handshake is done."""
    reader = asyncio.StreamReader(limit=_CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, conn, ssl=tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if tls is not None else None)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()

