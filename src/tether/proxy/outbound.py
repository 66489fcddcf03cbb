"""The outbound side: traffic from the local application to its dependencies.

Connections arrive on the outbound listener (redirected by iptables, or addressed to it
explicitly), are detected, and then:

- HTTP: each request is routed by its authority (``l5d-dst-override`` first) to a destination:
  a balancer over the endpoints discovery knows, or, for an unknown authority, the original
  destination (transparent mode) or the authority itself (explicit mode);
- opaque TCP: forwarded to the original destination.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tether.core.discovery.endpoints import Endpoint
from tether.proxy.balancer import Balancer
from tether.proxy.config import ProxyConfig
from tether.proxy.discovery import StaticDiscovery, feed
from tether.proxy.endpoint import HttpEndpoint
from tether.proxy.errors import ProxyError, UnavailableError
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.layers.connect_retry import ConnectRetry
from tether.proxy.layers.errors import ErrorResponses
from tether.proxy.layers.metrics import HttpMetricsService
from tether.proxy.layers.timeout import ResponseTimeout
from tether.proxy.meshtls import tls_connector
from tether.proxy.metrics import MetricsRegistry
from tether.proxy.tcp import Pending

if TYPE_CHECKING:
    from tether.proxy.identity import IdentityClient

log = logging.getLogger(__name__)


def split_authority(authority: bytes, default_port: int = 80) -> tuple[str, int]:
    """``host[:port]`` to (host, port); raises UnavailableError when it can't be a target."""
    text = authority.decode("latin-1").strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not host:
        raise UnavailableError(f"no host in authority {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise UnavailableError(f"invalid port in authority {text!r}") from None
    return host, port


class Router:
    """Layer: pick the destination Service for a request by its authority."""

    def __init__(
        self,
        cfg: ProxyConfig,
        discovery: StaticDiscovery | None,
        make_endpoint: Callable[[Endpoint], Service],
        own_addrs: set[tuple[str, int]],
    ) -> None:
        self.cfg = cfg
        self.discovery = discovery
        self.make_endpoint = make_endpoint
        self.own_addrs = own_addrs
        self._balancers: dict[str, Balancer] = {}
        self._feeds: dict[str, asyncio.Task[None]] = {}
        self._direct: dict[tuple[str, int], Service] = {}

    def __call__(self, req: Request) -> Awaitable[Response]:
        # Synchronous routing, then the chosen service's awaitable: no coroutine frame of its own.
        override = req.header(b"l5d-dst-override")
        if override is not None:
            req.remove_header(b"l5d-dst-override")
        authority = (override or req.authority).decode("latin-1").lower()
        req.extensions["authority"] = authority
        if self.discovery is not None:
            bal = self._balancer(authority)
            if bal is not None:
                return bal(req)
        target = self._fallback_target(req, authority)
        req.extensions["target_addr"] = target
        svc = self._direct.get(target)
        if svc is None:
            svc = self._direct[target] = self.make_endpoint(Endpoint(target))
        return svc(req)

    def _balancer(self, authority: str) -> Balancer | None:
        bal = self._balancers.get(authority)
        if bal is not None:
            return bal
        assert self.discovery is not None
        watch = self.discovery.watch(authority)
        if watch is None:
            return None
        key = watch.authority  # normalized: "web" and "web:80" share one balancer
        bal = self._balancers.get(key)
        if bal is None:
            bal = Balancer(self.make_endpoint, self.cfg, name=key)
            bal.replace(watch.endpoints)  # the snapshot now, so the first request need not queue
            self._feeds[key] = asyncio.get_running_loop().create_task(feed(watch, bal))
            self._balancers[key] = bal
        self._balancers[authority] = bal
        return bal

    def _fallback_target(self, req: Request, authority: str) -> tuple[str, int]:
        conn = req.conn
        if conn is not None and conn.orig_dst is not None:
            return conn.orig_dst
        host, port = split_authority(authority.encode("latin-1"))
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM, 0,
                                       socket.AI_NUMERICHOST)
            target = (str(infos[0][4][0]), port)
        except socket.gaierror:
            target = (host, port)  # resolved at connect time
        if target in self.own_addrs or (target[1] in {a[1] for a in self.own_addrs}
                                        and target[0] in ("127.0.0.1", "localhost", "0.0.0.0")):
            raise ProxyError(f"request for {authority} would loop back into the proxy", 502)
        return target

    async def aclose(self) -> None:
        for task in self._feeds.values():
            task.cancel()
        for bal in set(self._balancers.values()):
            await bal.aclose()
        for svc in self._direct.values():
            close = getattr(svc, "aclose", None)
            if close is not None:
                await close()


class EndpointLabels:
    """Layer: label the request with its endpoint (``target_addr``) and, over mTLS, the identity
    the peer proved (``server_id``), for the metrics layer above."""

    def __init__(self, inner: Service, target: tuple[str, int], server_id: str | None) -> None:
        self.inner = inner
        self.target = target
        self.server_id = server_id

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the inner awaitable: one coroutine frame fewer per request.
        ext = req.extensions
        ext["target_addr"] = self.target
        if self.server_id is not None:
            ext["server_id"] = self.server_id
        return self.inner(req)

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()


def build_http_stack(
    cfg: ProxyConfig,
    metrics: MetricsRegistry,
    discovery: StaticDiscovery | None,
    own_addrs: set[tuple[str, int]],
    identity: IdentityClient | None = None,
) -> tuple[Service, Router]:
    """The outbound HTTP stack, outermost layer last."""

    def make_endpoint(ep: Endpoint) -> Service:
        # A meshed endpoint is reached through its proxy's inbound port, over mTLS when both
        # sides have identities.
        addr = (ep.addr[0], ep.proxy_port) if ep.proxy_port else ep.addr
        if ep.identity and identity is not None:
            conn = tls_connector(identity, cfg, addr, ep.identity)
            return EndpointLabels(HttpEndpoint(addr, cfg, connector=conn), ep.addr, ep.identity)
        return EndpointLabels(HttpEndpoint(addr, cfg), ep.addr, None)

    router = Router(cfg, discovery, make_endpoint, own_addrs)
    svc: Service = router  # authority -> balancer (P2C + peak-EWMA + failure accrual) -> endpoint
    svc = ConnectRetry(svc)  # a refused connection never sent the request: try another endpoint
    if cfg.response_timeout is not None:
        svc = ResponseTimeout(svc, cfg.response_timeout)  # 504 when the head is late
    svc = ErrorResponses(svc)  # typed errors -> 502/503/504 with l5d-proxy-error
    svc = HttpMetricsService(svc, metrics, direction="outbound")  # request_total, response_total, latency
    return svc, router


async def connect_tcp(target: tuple[str, int], timeout: float, ssl_ctx: ssl.SSLContext | None = None,
                      server_hostname: str | None = None, preamble: bytes = b"") -> tuple[asyncio.Transport, Pending]:
    """Open a TCP (or mesh mTLS) connection for an opaque stream; what arrives before the Splice
    takes over (a server that speaks first) is kept in the returned Pending protocol. ``preamble``
    (the mesh transport header) is written first."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, proto = await loop.create_connection(
            Pending, target[0], target[1], ssl=ssl_ctx, server_hostname=server_hostname if ssl_ctx else None)
    if preamble:
        transport.write(preamble)
    return transport, proto
