"""The proxy process: listeners, per-connection protocol hand-off, graceful shutdown.

Each accepted connection starts in a :class:`DetectProtocol`; once its protocol is known it is
handed to the HTTP/1 server, the HTTP/2 server (both serving the direction's HTTP stack) or an
opaque TCP splice to its target. SIGTERM stops the listeners, lets in-flight requests finish
within the grace period, closes idle keep-alive connections, sends GOAWAY on HTTP/2, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether import native
from tether.core import transport_header
from tether.core.discovery.endpoints import Endpoint
from tether.core.http.detect import Detected
from tether.proxy import inbound, outbound
from tether.proxy.admin import AdminServer
from tether.proxy.config import ConfigError, ProxyConfig
from tether.proxy.detect import DetectProtocol
from tether.proxy.discovery import StaticDiscovery
from tether.proxy.http.h1server import ConnectionRegistry, H1ServerProtocol
from tether.proxy.http.message import Connection, Service
from tether.proxy.logging import LogControl
from tether.proxy.meshtls import MeshTlsListener
from tether.proxy.metrics import MetricsRegistry, TcpMetrics
from tether.proxy.tcp import Pending, Splice, ZeroCopySplice, zero_copy_possible

if TYPE_CHECKING:
    from tether.proxy.http.h2server import H2ServerProtocol
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)


@dataclass
class _Side:
    """One direction's listener, stack and live connections."""

    direction: str
    http: Service
    h1: ConnectionRegistry = field(default_factory=ConnectionRegistry)
    h2: set[H2ServerProtocol] = field(default_factory=set)
    tcp: set[Splice | ZeroCopySplice] = field(default_factory=set)
    server: asyncio.AbstractServer | None = None


class Proxy:
    def __init__(self, cfg: ProxyConfig, log_control: LogControl | None = None) -> None:
        self.cfg = cfg
        self.log_control = log_control or LogControl(cfg.log_level)
        self.metrics = MetricsRegistry()
        self.discovery = StaticDiscovery(cfg.destinations_file) if cfg.destinations_file else None
        self.identity = identity_client(cfg)
        if self.identity is not None:
            self.metrics.add_source(self.identity.metrics_lines)
        own = {cfg.outbound_addr, cfg.inbound_addr}
        out_http, self._router = outbound.build_http_stack(cfg, self.metrics, self.discovery, own, self.identity)
        in_http, self._local = inbound.build_http_stack(cfg, self.metrics)
        self.outbound = _Side("outbound", out_http)
        self.inbound = _Side("inbound", in_http)
        self.admin: AdminServer | None = None
        self._mesh_listener: MeshTlsListener | None = None
        self._stopping = asyncio.Event()
        self._tcp_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.discovery is not None:
            self._spawn(self.discovery.run())
        if self.identity is not None:
            self._spawn(self.identity.run())
        for side, addr in ((self.outbound, self.cfg.outbound_addr), (self.inbound, self.cfg.inbound_addr)):
            if side is self.inbound and self.identity is not None:
                self._mesh_listener = MeshTlsListener(
                    self.cfg, self.identity, addr, self._detector(side),
                    on_handshake_error=lambda err: self.metrics.tcp_error("inbound", err))
                host, port = self._mesh_listener.start()
                log.info("inbound listener on %s:%d (mesh mTLS as %s)", host, port, self.identity.identity.dns_name)
                continue
            side.server = await loop.create_server(
                self._detector(side), addr[0], addr[1], reuse_address=True, backlog=1024,
            )
            sock = side.server.sockets[0].getsockname()
            log.info("%s listener on %s:%d", side.direction, sock[0], sock[1])
        if native.state == "compiled":
            log.info("hot path compiled (mypyc): %d modules", len(native.NATIVE_MODULES))
        else:
            log.warning("hot path interpreted (%s): about half the throughput", native.state[len("pure: "):])
        self.admin = AdminServer(
            self.cfg, self.metrics, self.log_control, ready=self._is_ready, shutdown=self.request_stop,
            identity=self.identity.identity_json if self.identity is not None else None,
        )
        admin_host, admin_port = await self.admin.start()
        log.info("admin listener on %s:%d", admin_host, admin_port)
        self.ready = True

    def _is_ready(self) -> bool:
        # Not ready until the first certificate: meshed peers could not talk to us yet.
        return self.ready and (self.identity is None or self.identity.ready)

    def _detector(self, side: _Side) -> Callable[[], DetectProtocol]:
        def on_detected(what: Detected, transport: asyncio.Transport, conn: Connection, buf: bytes,
                        eof: bool) -> None:
            self._on_detected(side, what, transport, conn, buf, eof)

        return lambda: DetectProtocol(side.direction, self.cfg, on_detected)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or an admin /shutdown), then drain and return."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        grace = self.cfg.shutdown_grace_period
        log.info("shutting down: draining connections for up to %gs", grace)
        self.ready = False
        deadline = time.monotonic() + grace
        for side in (self.outbound, self.inbound):
            if side.server is not None:
                side.server.close()
        if self._mesh_listener is not None:
            self._mesh_listener.close()
        drains: list[Coroutine[Any, Any, object]] = []
        for side in (self.outbound, self.inbound):
            drains.append(side.h1.drain(grace))
            drains.extend(h2.drain(grace) for h2 in list(side.h2))
        results = await asyncio.gather(*drains, return_exceptions=True)
        # Opaque streams have no request boundary: give them the rest of the grace period.
        while any(side.tcp for side in (self.outbound, self.inbound)) and time.monotonic() < deadline:
            self._tcp_closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._tcp_closed.wait()
        for side in (self.outbound, self.inbound):
            for splice in list(side.tcp):
                splice.abort()
        unclean = [r for r in results if r is False or isinstance(r, BaseException)]
        if unclean:
            log.warning("%d connection groups did not drain within %gs", len(unclean), grace)
        await self._router.aclose()
        await self._local.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self.admin is not None:
            await self.admin.close()
        log.info("shutdown complete")

    def _meshed_endpoint(self, target: tuple[str, int]) -> Endpoint | None:
        """The discovery entry of a destination address, when it is a meshed workload."""
        if self.discovery is None:
            return None
        eps = self.discovery.resolve(f"{target[0]}:{target[1]}")
        ep = eps.get(target) if eps is not None else None
        if ep is None or not ep.identity or not ep.proxy_port:
            return None
        return ep

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- per connection -----------------------------------------------------------------------
    def _on_detected(self, side: _Side, what: Detected, transport: asyncio.Transport,
                     conn: Connection, buf: bytes, eof: bool) -> None:
        if what is Detected.HTTP1:
            # Every accepted connection counts in tcp_open_total/tcp_open_connections, HTTP too.
            tcp = self.metrics.tcp(side.direction, "src", conn.orig_dst, tls=conn.tls, client_id=conn.client_id)
            tcp.opened()
            h1 = H1ServerProtocol(side.http, conn, self.cfg, side.h1, tcp)
            transport.set_protocol(h1)
            h1.connection_made(transport)
            if buf:
                h1.data_received(buf)
        elif what is Detected.H2:
            # Imported on first use: a proxy that never sees HTTP/2 does not carry h2 in memory.
            from tether.proxy.http.h2server import H2ServerProtocol

            tcp = self.metrics.tcp(side.direction, "src", conn.orig_dst, tls=conn.tls, client_id=conn.client_id)
            tcp.opened()
            h2 = H2ServerProtocol(side.http, conn, self.cfg)
            h2.tcp = tcp  # counts bytes both ways, the detected preface included (start() feeds it)
            side.h2.add(h2)
            transport.set_protocol(h2)
            h2.start(transport, buf)
            self._spawn(self._forget_h2(side, h2, tcp))
        else:
            # Until the upstream is connected, whatever the client sends is held (a pause in
            # connection_made is not always honoured, and nothing may be dropped).
            pending = Pending()
            pending.buffer += buf
            pending.eof = eof
            transport.set_protocol(pending)
            transport.pause_reading()
            self._spawn(self._opaque(side, transport, conn, pending))

    async def _forget_h2(self, side: _Side, h2: H2ServerProtocol, tcp: TcpMetrics) -> None:
        try:
            await h2.wait_closed()
        finally:
            side.h2.discard(h2)
            tcp.closed()

    async def _opaque(self, side: _Side, transport: asyncio.Transport, conn: Connection,
                      client_pending: Pending) -> None:
        dial: tuple[str, int] | None = None
        ssl_ctx = None
        server_id: str | None = None
        preamble = b""
        if side.direction == "outbound":
            target = conn.orig_dst
            timeout = self.cfg.outbound_connect_timeout
            meshed = self._meshed_endpoint(target) if target is not None else None
            if meshed is not None and target is not None and self.identity is not None and self.identity.ready:
                # Opaque TCP crosses the mesh as mTLS to the peer proxy's inbound port, the
                # original port carried in the transport header.
                assert meshed.proxy_port is not None and meshed.identity is not None
                dial, server_id = (target[0], meshed.proxy_port), meshed.identity
                ssl_ctx = self.identity.client_ssl_context()
                preamble = transport_header.encode(transport_header.TransportHeader(target[1]))
        else:
            target = inbound.local_target(self.cfg, conn.orig_dst, conn.target_port) if (
                conn.orig_dst or conn.target_port or self.cfg.inbound_app_addr) else None
            timeout = self.cfg.inbound_connect_timeout
        tls = conn.tls
        if target is None:
            self.metrics.tcp_error(side.direction, "unexpected")
            log.info("%s opaque connection from %s:%d has no target; closing", side.direction, *conn.peer)
            transport.close()
            return
        m_src = self.metrics.tcp(side.direction, "src", target, tls=tls, client_id=conn.client_id)
        m_src.opened()
        try:
            upstream, pending = await outbound.connect_tcp(dial or target, timeout, ssl_ctx, server_id, preamble)
        except (OSError, TimeoutError) as e:
            err = "connect_timeout" if isinstance(e, TimeoutError) else "unexpected"
            self.metrics.tcp_error(side.direction, err, target)
            m_src.closed(err)
            log.info("%s TCP connect to %s:%d failed: %s", side.direction, target[0], target[1], e)
            transport.abort()
            return
        m_dst = self.metrics.tcp(side.direction, "dst", target, tls=tls or server_id is not None,
                                 server_id=server_id)
        m_dst.opened()

        def on_close(splice: Splice | ZeroCopySplice, exc: Exception | None) -> None:
            side.tcp.discard(splice)
            self._tcp_closed.set()
            err = None if exc is None else "i/o"
            m_src.closed(err)
            m_dst.closed(err)

        if self.cfg.tcp_zero_copy and zero_copy_possible(transport, upstream):
            log.debug("%s opaque connection from %s:%d to %s:%d: zero-copy splice", side.direction,
                      conn.peer[0], conn.peer[1], target[0], target[1])
            zc = ZeroCopySplice(conn, on_close, src=m_src, dst=m_dst)
            side.tcp.add(zc)
            zc.attach(transport, upstream, bytes(client_pending.buffer), bytes(pending.buffer),
                      client_pending.eof, pending.eof)
            return
        splice = Splice(conn, on_close, src=m_src, dst=m_dst)
        side.tcp.add(splice)
        splice.attach(transport, upstream, bytes(client_pending.buffer), bytes(pending.buffer))
        if client_pending.eof:
            splice.client.eof_received()
        if pending.eof:
            splice.server.eof_received()


def identity_client(cfg: ProxyConfig) -> IdentityClient | None:
    """The identity client the config asks for, or None (plaintext only)."""
    if not cfg.identity_name:
        return None
    missing = [flag for flag, value in (
        ("--identity-token-path", cfg.identity_token_path),
        ("--identity-trust-anchors", cfg.identity_trust_anchors),
        ("--identity-addrs", cfg.identity_addrs),
    ) if not value]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"--identity-name is set but {', '.join(missing)} {verb} not")
    assert cfg.identity_token_path and cfg.identity_trust_anchors and cfg.identity_addrs
    # Imported here: grpc and cryptography cost ~25 MB of RSS a plaintext proxy does not need.
    from tether.core.identity.certs import CertificateError
    from tether.proxy.identity import IdentityClient, IdentityClientConfig

    try:
        return IdentityClient(IdentityClientConfig(
            identity=cfg.identity_name,
            token_path=cfg.identity_token_path,
            trust_anchors_path=cfg.identity_trust_anchors,
            identity_addrs=[a.strip() for a in cfg.identity_addrs.split(",") if a.strip()],
            key_path=cfg.identity_key_path,
            bundle_poll_interval=cfg.identity_bundle_poll_interval,
        ))
    except (ValueError, CertificateError) as e:
        raise ConfigError(f"identity: {e}") from None


async def serve(cfg: ProxyConfig, log_control: LogControl | None = None) -> int:
    proxy = Proxy(cfg, log_control)
    await proxy.run()
    return 0


# glibc's mallopt parameters (malloc.h) and the values the proxy sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 20
_TRIM_THRESHOLD = 2 << 20


def tune_malloc() -> bool:
    """Keep glibc from mapping and unmapping memory for every TLS record read.

    uvloop's TLS transport reads with a 256 KiB buffer that is shrunk right after: above glibc's
    mmap threshold (128 KiB until a large block is freed) that costs an mmap, an mremap and a
    munmap per read, and with a heap allocation the heap's top is trimmed (brk) instead. strace on
    an inbound mTLS proxy showed one of each per request; with a 1 MiB mmap threshold and a 2 MiB
    trim threshold there are none. True when set (glibc only; elsewhere nothing changes)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


def run(cfg: ProxyConfig, log_control: LogControl | None = None) -> int:
    """Run the proxy on uvloop until signalled; the process exit status."""
    import uvloop

    tune_malloc()
    return uvloop.run(serve(cfg, log_control))
