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

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from tether.proxy.config import ClientSettings
from tether.proxy.http.h1client import Connector, H1Pool
from tether.proxy.http.message import Request, Response

if TYPE_CHECKING:
    from tether.proxy.http.h2client import H2Pool


class HttpEndpoint:
    """A Service sending requests to one address."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self.connect_timeout = cfg.connect_timeout
        self._connector = connector
        self.h1 = H1Pool(address, cfg, connector)
        self._h2: H2Pool | None = None  # HTTP/2 connections, made on first use

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the codec's awaitable: one coroutine frame fewer per request.
        if req.version == "2":
            pool = self._h2
            if pool is None:
                pool = self._h2 = self._h2_pool()
            return pool.send(req)
        return self.h1(req)

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
