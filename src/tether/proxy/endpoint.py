"""The client side of one endpoint: pooled HTTP/1 connections and one multiplexed HTTP/2 one.

``HttpEndpoint`` is the Service at the bottom of every HTTP stack. A request that arrived as
HTTP/2 (gRPC needs trailers) goes upstream as HTTP/2; an HTTP/1 request goes over the HTTP/1
keep-alive pool. How the transport is made (plain TCP, mTLS to a peer proxy) is the
``Connector``'s business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from tether.proxy.config import ClientSettings
from tether.proxy.errors import ConnectError, ConnectTimeoutError, UpstreamError
from tether.proxy.http.h1client import Connector, H1Pool
from tether.proxy.http.message import Request, Response

log = logging.getLogger(__name__)


class HttpEndpoint:
    """A Service sending requests to one address."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self.connect_timeout = cfg.connect_timeout
        self._connector = connector
        self.h1 = H1Pool(address, cfg, connector)
        self._h2: object | None = None
        self._h2_connecting: asyncio.Future[object] | None = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the codec's awaitable: one coroutine frame fewer per request.
        if req.version == "2":
            return self._send_h2(req)
        return self.h1(req)

    async def _send_h2(self, req: Request) -> Response:
        from tether.proxy.http.h2client import H2ClientConnection
        from tether.proxy.http.h2conn import H2Error

        for attempt in range(2):
            conn = await self._h2_connection()
            assert isinstance(conn, H2ClientConnection)
            try:
                return await conn.send(req)
            except H2Error as e:
                if self._h2 is conn and not conn.usable:
                    self._h2 = None
                if e.retryable and attempt == 0 and req.body.is_end_known():
                    continue
                raise UpstreamError(f"HTTP/2 upstream error: {e}") from None
        raise UpstreamError("HTTP/2 upstream refused the request twice")

    async def _h2_connection(self) -> object:
        from tether.proxy.http.h2client import H2ClientConnection

        conn = self._h2
        if conn is not None and isinstance(conn, H2ClientConnection) and conn.usable:
            return conn
        if self._h2_connecting is not None:
            return await asyncio.shield(self._h2_connecting)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()
        self._h2_connecting = fut
        try:
            host, port = self.address
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self._connector is not None:
                        _, proto = await self._connector(lambda: H2ClientConnection(self.cfg.h2))
                    else:
                        _, proto = await loop.create_connection(lambda: H2ClientConnection(self.cfg.h2), host, port)
            except TimeoutError:
                raise ConnectTimeoutError(
                    f"connect to {host}:{port} timed out after {self.connect_timeout:g}s") from None
            except OSError as e:
                raise ConnectError(f"connect to {host}:{port} failed: {e.strerror or e}") from None
            self._h2 = proto
            fut.set_result(proto)
            return proto
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._h2_connecting = None

    async def aclose(self) -> None:
        await self.h1.aclose()
        conn = self._h2
        self._h2 = None
        close = getattr(conn, "close", None)
        if close is not None:
            close()
