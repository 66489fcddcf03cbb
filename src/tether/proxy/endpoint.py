"""The client side of one endpoint: pooled HTTP/1 connections and pooled HTTP/2 ones.

``HttpEndpoint`` is the Service at the bottom of every HTTP stack. A request that arrived as
HTTP/2 (gRPC needs trailers) goes upstream as HTTP/2; an HTTP/1 request goes over the HTTP/1
keep-alive pool. How the transport is made (plain TCP, mTLS to a peer proxy) is the
``Connector``'s business.

HTTP/2 requests share one connection until the peer's stream limit (its
SETTINGS_MAX_CONCURRENT_STREAMS) is reached on it; then another connection is opened, up to
``h2_max_connections_per_endpoint``, as an HTTP/2 client pool does. Only when all of those are
full does a request wait for a stream, and running out of streams is a 503 that failure
accrual does not count: the endpoint is busy, not failing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final

from tether.proxy.config import ClientSettings
from tether.proxy.http.h1client import Connector, H1Pool
from tether.proxy.http.message import Request, Response

if TYPE_CHECKING:
    from tether.proxy.http.h2client import H2Pool

log = logging.getLogger(__name__)

# Linkerd's proxies carry HTTP/1 requests between them over HTTP/2, the request's original protocol
# in this header ("HTTP/1.1", "HTTP/1.0", either with "; absolute-form" when the request target
# was absolute); the receiving proxy sends it on to the application as it was, and names the
# response's protocol in the same header.
ORIG_PROTO: Final = b"l5d-orig-proto"


class HttpEndpoint:
    """A Service sending requests to one address."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None,
                 orig_proto: bool = False, upgrade: bool = False) -> None:
        self.address = address
        # Inbound: an HTTP/2 request with l5d-orig-proto goes to the application as HTTP/1 again.
        self.orig_proto = orig_proto
        # Outbound to a peer proxy: HTTP/1 requests go as HTTP/2 with l5d-orig-proto.
        self.upgrade = upgrade
        self.cfg = cfg
        self.connect_timeout = cfg.connect_timeout
        self._connector = connector
        self.h1 = H1Pool(address, cfg, connector)
        self._h2: H2Pool | None = None  # HTTP/2 connections, made on first use

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the codec's awaitable: one coroutine frame fewer per request.
        if req.version == "2":
            if self.orig_proto:
                for k, v in req.headers:
                    if k == ORIG_PROTO:
                        if v.startswith((b"HTTP/1.1", b"HTTP/1.0")):
                            return self._downgraded(req, v)
                        log.warning("%s: %r is not a protocol it knows; the request stays HTTP/2",
                                    ORIG_PROTO.decode(), v)
                        break
            pool = self._h2
            if pool is None:
                pool = self._h2 = self._h2_pool()
            return pool.send(req)
        if self.upgrade and not req.upgrade and req.method != b"CONNECT":
            return self._upgraded(req)  # (WebSocket and friends keep their HTTP/1 connection)
        return self.h1(req)

    async def _upgraded(self, req: Request) -> Response:
        pool = self._h2
        if pool is None:
            pool = self._h2 = self._h2_pool()
        version, headers = req.version, req.headers
        req.headers = [*headers, (ORIG_PROTO, b"HTTP/1.0" if version == "1.0" else b"HTTP/1.1")]
        req.version = "2"
        try:
            resp = await pool.send(req)
        finally:
            # The request as it came (a retry may send it to an endpoint that is not a proxy).
            req.version, req.headers = version, headers
        for i, (k, _) in enumerate(resp.headers):
            if k == ORIG_PROTO:
                del resp.headers[i]
                break
        return resp

    async def _downgraded(self, req: Request, orig_proto: bytes) -> Response:
        req.headers = [(k, v) for k, v in req.headers if k != ORIG_PROTO]
        req.version = "1.0" if orig_proto.startswith(b"HTTP/1.0") else "1.1"
        if b"absolute-form" in orig_proto and req.path.startswith(b"/"):
            req.path = req.scheme + b"://" + req.authority + req.path
        resp = await self.h1(req)
        resp.headers.append((ORIG_PROTO, b"HTTP/1.1"))
        return resp

    def _h2_pool(self) -> H2Pool:
        # Imported on first use: a proxy that never sends HTTP/2 does not carry its codec in memory
        # (and importing per request, as the pool's send once did, cost ~2k instructions a call).
        from tether.proxy.http.h2client import H2Pool

        return H2Pool(self.address, self.cfg, self._connector)

    async def aclose(self) -> None:
        await self.h1.aclose()
        pool, self._h2 = self._h2, None
        if pool is not None:
            pool.close()
