"""The inbound path, read top to bottom: what happens to a connection from another workload.

accept -> mesh TLS? (peeked ClientHello with our identity as SNI: terminated, client identity kept)
       -> detect protocol (or a transport header naming the port of an opaque stream)
       -> HTTP: the stack of the connection's target (application port, TLS, client identity),
                every request authorized on its route by the port's current policy
       -> opaque TCP: the port's policy authorizes the connection (client network and identity)
                before any byte reaches the application port on loopback (and closes it when a
                new policy no longer does); on a port whose policy needs HTTP, HTTP-looking bytes
                that did not parse get 400

The target port is the original destination's (transparent mode, after iptables REDIRECT), the
one a peer proxy named in the transport header, or the configured application address.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from tether.core.discovery.endpoints import Addr
from tether.core.http.detect import Detected
from tether.proxy.cache import CacheEntry, IdleCache, Stack
from tether.proxy.config import ProxyConfig, client_settings, detect_settings, h1_server_settings, h2_settings
from tether.proxy.detect import DetectProtocol
from tether.proxy.endpoint import HttpEndpoint
from tether.proxy.errors import UnavailableError
from tether.proxy.http.message import Connection, Request, Response, Service
from tether.proxy.inbound.authorize import Authorizer, HttpAuthorize, refuse_unparsed_http
from tether.proxy.inbound.policy import HTTP_PROTOCOLS, PortPolicy
from tether.proxy.layers.access_log import AccessLog, AccessLogWriter
from tether.proxy.layers.metrics import InboundHttpMetrics
from tether.proxy.layers.rescue import Rescue
from tether.proxy.layers.tap import TapLayer
from tether.proxy.layers.timeout import ResponseTimeout
from tether.proxy.layers.trace import TraceLayer
from tether.proxy.meshtls import MeshTlsListener
from tether.proxy.metrics import MetricsRegistry
from tether.proxy.server import Connections, hold_opaque
from tether.proxy.tap import INBOUND, TapHub
from tether.proxy.targets import EndpointTarget, InboundTarget
from tether.proxy.tcp import Pending
from tether.proxy.tracing import KIND_SERVER, Tracer

if TYPE_CHECKING:
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def local_target(app_addr: Addr | None, orig_dst: Addr | None, port_hint: int | None) -> Addr:
    """Where on this host an inbound connection is delivered."""
    if port_hint is not None:
        return LOOPBACK, port_hint
    if orig_dst is not None:
        return LOOPBACK, orig_dst[1]
    if app_addr is not None:
        return app_addr
    raise UnavailableError("no application address: not redirected and --inbound-app-addr unset")


class Inbound:
    """The inbound listener's stacks and live connections."""

    def __init__(self, cfg: ProxyConfig, metrics: MetricsRegistry, identity: IdentityClient | None,
                 authorizer: Authorizer, tap: TapHub | None = None, access_log: AccessLogWriter | None = None,
                 tracer: Tracer | None = None) -> None:
        self.metrics = metrics
        self.tap = tap if tap is not None else TapHub()
        self.access_log = access_log
        self.tracer = tracer
        self.authorizer = authorizer
        self.identity = identity
        self.app_addr = cfg.inbound_app_addr
        self.detect = detect_settings(cfg)
        self.client = client_settings(cfg, cfg.inbound_connect_timeout)
        self.connect_timeout = cfg.inbound_connect_timeout
        self.handshake_timeout = cfg.identity_handshake_timeout
        self.response_timeout = cfg.response_timeout
        self.connections = Connections("inbound", h1_server_settings(cfg), h2_settings(cfg), cfg.tcp_zero_copy)
        self.targets: IdleCache[InboundTarget, Stack] = IdleCache(
            self.http_stack, cfg.cache_max_idle_age, close=Stack.aclose, name="inbound")
        self.mesh_listener: MeshTlsListener | None = None
        authorizer.source.on_change(self.policy_changed)

    # -- accept: mesh TLS terminated first when this proxy has an identity ---------------------------
    def listen_mesh(self, addr: Addr) -> tuple[str, int]:
        assert self.identity is not None
        self.mesh_listener = MeshTlsListener(
            self.detect, self.handshake_timeout, self.identity, addr, self.accept,
            on_handshake_error=lambda err: self.metrics.tcp_error("inbound", err))
        return self.mesh_listener.start()

    def accept(self) -> DetectProtocol:
        """The protocol of a newly accepted (or TLS-terminated) connection."""
        return DetectProtocol("inbound", self.detect, self.on_detected, opaque=self._policy_opaque)

    def _policy_opaque(self, port: int) -> bool | Awaitable[bool]:
        # A port's first connection waits for its policy (the authorization would wait for it anyway).
        policy = self.authorizer.source.current(port)
        if policy is not None:
            return policy.is_opaque
        return self._policy_opaque_later(port)

    async def _policy_opaque_later(self, port: int) -> bool:
        policy = await self.authorizer.source.get(port)  # bounded wait for the port's first policy
        return policy is not None and policy.is_opaque

    def on_detected(self, what: Detected, transport: asyncio.Transport, conn: Connection, buf: bytes,
                    eof: bool) -> None:
        if what is Detected.HTTP1 or what is Detected.H2:
            tcp = self.metrics.tcp("inbound", "src", conn.orig_dst, tls=conn.tls, client_id=conn.client_id)
            tcp.opened()
            service = _Pinned(self, conn)  # this connection's target stack, per request
            serve = self.connections.serve_h1 if what is Detected.HTTP1 else self.connections.serve_h2
            serve(service, transport, conn, buf, tcp)
        else:
            self.connections.spawn(self.tcp(transport, conn, hold_opaque(transport, buf, eof), buf))

    # -- HTTP: one stack per target -------------------------------------------------------------------
    def http_stack(self, target: InboundTarget) -> Stack:
        # To the application on loopback, pooled; requests Linkerd's proxies upgraded go as HTTP/1 again.
        forward = HttpEndpoint(target.app, self.client, orig_proto=True)
        svc: Service = forward
        if self.response_timeout is not None:
            svc = ResponseTimeout(svc, self.response_timeout)  # 504 when the head is late
        svc = HttpAuthorize(svc, self.authorizer, target.app, target.tls, target.client_id)  # route authz, rate limit
        svc = Rescue(svc)  # errors -> 502/503/504 with l5d-proxy-error (gRPC: grpc-status)
        svc = InboundHttpMetrics(svc, self.metrics, target)  # request_total, response_total, latency
        if self.tracer is not None:
            svc = TraceLayer(svc, self.tracer, KIND_SERVER, "inbound")  # a span per sampled request
        svc = TapLayer(svc, self.tap, INBOUND, target.app)  # live events for running taps (else: nothing)
        if self.access_log is not None:
            svc = AccessLog(svc, self.access_log, target.client_id)  # one line per request, written off the loop
        return Stack(svc, [forward.aclose])

    def target_of(self, conn: Connection) -> InboundTarget:
        app = local_target(self.app_addr, conn.orig_dst, conn.target_port)
        return InboundTarget(app, conn.tls, conn.client_id)

    # -- opaque TCP ------------------------------------------------------------------------------------
    async def tcp(self, transport: asyncio.Transport, conn: Connection, client_pending: Pending,
                  head: bytes = b"") -> None:
        try:
            app = local_target(self.app_addr, conn.orig_dst, conn.target_port)
        except UnavailableError:
            self.metrics.tcp_error("inbound", "unexpected")
            log.info("inbound opaque connection from %s:%d has no target; closing", *conn.peer)
            transport.close()
            return
        policy = await self.authorizer.source.get(app[1])  # bounded wait for the port's first policy
        if policy is not None and (policy.protocol in HTTP_PROTOCOLS or policy.needs_http) and \
                refuse_unparsed_http(transport, head, policy.protocol in HTTP_PROTOCOLS):
            return  # 400: route-level rules cannot be bypassed by bytes that only look like HTTP
        if self.authorizer.check_tcp(policy, app, conn.peer[0], conn.tls, conn.client_id) is None:
            transport.close()  # refused: nothing the client sent reached the application
            return
        await self.connections.connect_and_forward(self.metrics, None, conn, transport, client_pending,
                                                   EndpointTarget(app, app), self.connect_timeout,
                                                   self.handshake_timeout)

    def policy_changed(self, port: int, policy: PortPolicy) -> None:
        """A port's new policy: its open opaque connections it no longer authorizes are closed (HTTP
        connections need nothing: every request reads the policy in force)."""
        for splice in list(self.connections.tcp):
            conn = splice.conn
            try:
                app = local_target(self.app_addr, conn.orig_dst, conn.target_port)
            except UnavailableError:
                continue
            if app[1] == port and not self.authorizer.still_authorized(policy, app, conn.peer[0], conn.tls,
                                                                       conn.client_id):
                splice.abort()

    def close_listener(self) -> None:
        if self.mesh_listener is not None:
            self.mesh_listener.close()

    async def aclose(self) -> None:
        await self.targets.aclose()


class _Pinned:
    """The HTTP service of one inbound connection: its target's cached stack."""

    __slots__ = ("entry", "target", "targets")

    def __init__(self, inbound: Inbound, conn: Connection) -> None:
        self.targets = inbound.targets
        self.target: InboundTarget | None = None
        # The target's cache entry, kept while live: looking the target up per request hashes and
        # compares the dataclass in Python (about 3,000 instructions).
        self.entry: CacheEntry[Stack] | None = None
        try:
            self.target = inbound.target_of(conn)
        except UnavailableError:
            pass

    def __call__(self, req: Request) -> Awaitable[Response]:
        e = self.entry
        if e is None or not e.live:  # the first request, or the cache dropped the stack while idle
            target = self.target
            if target is None:
                return _no_target(req)
            e = self.entry = self.targets.entry(target)  # marked used now
            stack = e.value
            assert stack is not None, "an entry just taken from the cache is live"
            return stack.service(req)
        return self.targets.use(e).service(req)


async def _no_target(req: Request) -> Response:
    from tether.proxy.errors import rescue

    return rescue(UnavailableError("no application address: not redirected and --inbound-app-addr unset"), req)
