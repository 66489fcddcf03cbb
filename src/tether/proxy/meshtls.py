"""mTLS between proxies: the inbound listener that terminates it and the outbound connector.

Inbound: each accepted connection's first bytes are *peeked* (not read). A TLS ClientHello whose
SNI is this proxy's identity is the mesh talking: the TLS session is terminated with the
identity's server context (client certificate required) and the decrypted stream goes on to
protocol detection with the client's identity attached. Anything else (plaintext from unmeshed
clients, the application's own TLS) goes on untouched.

Session resumption (TLS 1.3, see :mod:`tether.proxy.tlssessions`): the server context accepts
tickets it issued itself, and this listener has it issue one ticket on a connection whose
ClientHello asks for tickets (the session_ticket extension, which a tether client with resumption
off leaves out) and offers no session of its own; a resumed client holds its ticket already.

The outbound side (TLS 1.3 to a meshed endpoint's proxy, the expected identity as SNI, verified)
is in :mod:`tether.proxy.connect`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tether.core.http.detect import Detected, client_hello_extensions, client_hello_sni, detect
from tether.proxy.config import DetectSettings
from tether.proxy.detect import socket_original_dst
from tether.proxy.tlspeer import IdentityNotReady
from tether.proxy.tlstransport import tls_accept

if TYPE_CHECKING:
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)

_PEEK = 16 * 1024
_RETRY_PEEK = 0.005
_SWEEP_SLACK = 0.001  # the loop's clock counts milliseconds: a timer may run up to this early
_EXT_SESSION_TICKET = 35
_EXT_PRE_SHARED_KEY = 41


# An accepted socket's (local address, original destination before a redirect, or None).
_Addresses = tuple[Any, tuple[str, int] | None]


def _nothing() -> None:
    """The reader callback of a socket handed to its handshake (see ``_dispatch``)."""


class MeshTlsListener:
    """An inbound listener that terminates mesh mTLS and passes everything else through."""

    def __init__(self, cfg: DetectSettings, handshake_timeout: float, identity: IdentityClient,
                 addr: tuple[str, int], protocol_factory: Callable[[], asyncio.Protocol],
                 on_handshake_error: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.handshake_timeout = handshake_timeout
        self.identity = identity
        self.addr = addr
        self.protocol_factory = protocol_factory
        self.on_handshake_error = on_handshake_error
        self._sock: socket.socket | None = None
        # fd -> (socket, detection deadline, (local address, original destination)): accepted sockets
        # whose first bytes are awaited.
        self._pending: dict[int, tuple[socket.socket, float, _Addresses]] = {}
        # One timer for all of them, due at the earliest deadline (see _on_sweep).
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> tuple[str, int]:
        self._loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET
        sock = socket.create_server(self.addr, family=family, backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_accept)
        name = sock.getsockname()
        return name[0], name[1]

    def close(self) -> None:
        if self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for fd, (conn, _, _) in list(self._pending.items()):
            if self._loop is not None:
                self._loop.remove_reader(fd)
            conn.close()
        self._pending.clear()

    def _on_accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(128):
            try:
                conn, _peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("inbound accept failed: %s", e)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Asked once here, and told to the TLS transport (detection asks for both).
            try:
                local = conn.getsockname()
            except OSError:
                local = None
            dst = socket_original_dst(conn, local)
            port = dst[1] if dst is not None else self.cfg.inbound_app_port
            if port in self.cfg.opaque_ports:
                # A server-speaks-first port: the client may say nothing, so there is no
                # ClientHello to wait for (meshed opaque traffic arrives on the proxy's own port).
                self._dispatch(conn, tls=False)
                continue
            # A client that never speaks is handed on as plaintext at the detection timeout, by the
            # listener's one sweep timer (a timer per socket, made and cancelled: ~13k instructions).
            self._pending[conn.fileno()] = (conn, time.monotonic() + self.cfg.detect_timeout, (local, dst))
            if self._sweep is None:
                self._sweep = self._loop.call_at(self._loop.time() + self.cfg.detect_timeout, self._on_sweep)
            self._loop.add_reader(conn.fileno(), self._on_readable, conn)

    def _on_sweep(self) -> None:
        """Dispatch the sockets past their detection deadline as plaintext, then wait for the next
        deadline, if any. Due at the earliest deadline (or a little before: the loop's clock is
        coarser), so each socket goes at its own deadline; with the usual traffic, where a socket
        waits milliseconds, it runs about once per detection timeout."""
        assert self._loop is not None
        self._sweep = None
        now = time.monotonic()
        due = now + _SWEEP_SLACK
        for conn, deadline, _ in list(self._pending.values()):
            if deadline <= due:
                self._silent(conn)
        if self._pending:
            first = min(deadline for _, deadline, _ in self._pending.values())
            self._sweep = self._loop.call_at(self._loop.time() + max(first - now, _SWEEP_SLACK), self._on_sweep)

    def _silent(self, conn: socket.socket) -> None:
        if conn.fileno() in self._pending and self._pending[conn.fileno()][0] is conn:
            self._dispatch(conn, tls=False)

    def _on_readable(self, conn: socket.socket) -> None:
        assert self._loop is not None
        fd = conn.fileno()
        try:
            data = conn.recv(_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        entry = self._pending.get(fd)
        deadline = entry[1] if entry else 0.0
        if data and detect(data) is Detected.TLS:
            sni = client_hello_sni(data)
            if sni is Detected.NEED_MORE and len(data) < _PEEK and time.monotonic() < deadline:
                # Only part of the ClientHello is here: look again shortly (the socket stays
                # readable until we read, so waiting on readability would spin).
                self._loop.remove_reader(fd)
                self._loop.call_later(_RETRY_PEEK, self._rearm, conn)
                return
            if isinstance(sni, str) and sni == self.identity.identity.dns_name:
                tickets = 0
                if self.identity.resumption:
                    exts = client_hello_extensions(data) or frozenset()
                    if _EXT_SESSION_TICKET in exts and _EXT_PRE_SHARED_KEY not in exts:
                        tickets = 1
                self._dispatch(conn, tls=True, tickets=tickets, addresses=entry[2] if entry else None)
                return
        self._dispatch(conn, tls=False)

    def _rearm(self, conn: socket.socket) -> None:
        if self._loop is not None and conn.fileno() in self._pending:
            self._loop.add_reader(conn.fileno(), self._on_readable, conn)

    def _drop(self, conn: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(conn.fileno())
        self._pending.pop(conn.fileno(), None)
        conn.close()

    def _dispatch(self, conn: socket.socket, tls: bool, tickets: int = 0, addresses: _Addresses | None = None) -> None:
        assert self._loop is not None
        if tls:
            # The handshake takes the registration over (tls_accept(registered=True)): with uvloop a
            # removal and a new registration cost ~5 system calls. Until then nothing reads: the task
            # runs before the loop polls again, and its first step reads the ClientHello.
            self._loop.add_reader(conn.fileno(), _nothing)
        else:
            self._loop.remove_reader(conn.fileno())
        self._pending.pop(conn.fileno(), None)
        task = self._loop.create_task(self._connect(conn, tls, tickets, addresses))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, tls: bool, tickets: int = 0,
                       addresses: _Addresses | None = None) -> None:
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        if tls:
            try:
                ctx = self.identity.server_ssl_context()
            except IdentityNotReady:
                log.info("mesh TLS from %s before this proxy has a certificate; closing", conn.getpeername())
                loop.remove_reader(conn.fileno())
                conn.close()
                return
        try:
            if ctx is not None:
                # tether's own TLS transport: ~10-60 KiB less per idle connection than the loop's (tlstransport).
                transport, _ = await tls_accept(self.protocol_factory, conn, ctx, self.handshake_timeout,
                                                tickets=tickets, registered=True, prepared=True, addresses=addresses)
                self.identity.count_handshake("inbound", transport.get_extra_info("ssl_object").session_reused)
            else:
                await loop.connect_accepted_socket(self.protocol_factory, conn)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            log.info("inbound mesh TLS handshake failed: %s", e)
            if self.on_handshake_error is not None:
                self.on_handshake_error("tls_handshake")
            conn.close()
