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

import asyncio
import logging
from collections.abc import Awaitable

from tether.proxy.config import ClientSettings
from tether.proxy.errors import ConnectError, ConnectTimeoutError, StreamCapacityError, UpstreamError
from tether.proxy.http.body import BytesBody, EmptyBody, PipeBody
from tether.proxy.http.h1client import Connector, H1Pool
from tether.proxy.http.message import Headers, Request, Response

log = logging.getLogger(__name__)

# The largest request body kept to send again when an HTTP/2 upstream refuses the stream.
MAX_REPLAY_BYTES = 64 * 1024


async def _replayable(req: Request) -> tuple[bytes, Headers | None] | tuple[()] | None:
    """What a second try of ``req`` needs: () for a body that is empty (it can be sent again as is);
    the bytes and trailers of a body wholly buffered and at most MAX_REPLAY_BYTES (``req.body`` is
    replaced by a copy it can send); None when the body cannot be sent twice."""
    body = req.body
    if isinstance(body, EmptyBody):
        return ()
    if isinstance(body, PipeBody):
        if not body.is_end_known() or body.buffered > MAX_REPLAY_BYTES:
            return None
    elif type(body) is BytesBody:
        if body.length is None or body.length > MAX_REPLAY_BYTES:
            return None
    else:
        return None
    trailers = body.trailers
    data = await body.read()  # all of it: it is buffered
    req.body = BytesBody(data, trailers)
    return data, trailers


class HttpEndpoint:
    """A Service sending requests to one address."""

    def __init__(self, address: tuple[str, int], cfg: ClientSettings, connector: Connector | None = None) -> None:
        self.address = address
        self.cfg = cfg
        self.connect_timeout = cfg.connect_timeout
        self._connector = connector
        self.h1 = H1Pool(address, cfg, connector)
        self._h2: list[object] = []  # H2ClientConnection, imported on first use
        self._h2_connecting: asyncio.Future[object] | None = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function returning the codec's awaitable: one coroutine frame fewer per request.
        if req.version == "2":
            return self._send_h2(req)
        return self.h1(req)

    async def _send_h2(self, req: Request) -> Response:
        from tether.proxy.http.h2client import H2ClientConnection, H2NoStreamSlot
        from tether.proxy.http.h2conn import H2Error

        # A request the upstream never processed (REFUSED_STREAM, a GOAWAY below its stream, a
        # connection lost before it was sent) is sent once more, but only whole: sending consumes
        # the body, so a small body that is already here is kept as bytes for the second try; one
        # still arriving goes once and is not retried.
        replay = await _replayable(req)
        for attempt in range(2):
            conn = await self._h2_connection()
            assert isinstance(conn, H2ClientConnection)
            try:
                return await conn.send(req)
            except H2NoStreamSlot as busy:  # (a name of its own: compiled, ``e`` below has another type)
                raise StreamCapacityError(
                    f"HTTP/2 upstream {self.address[0]}:{self.address[1]} busy: {busy}") from None
            except H2Error as e:
                if not conn.usable and conn in self._h2:
                    self._h2.remove(conn)
                if e.retryable and attempt == 0 and replay is not None:
                    if replay:
                        req.body = BytesBody(replay[0], replay[1])
                    continue
                raise UpstreamError(f"HTTP/2 upstream error: {e}") from None
        raise UpstreamError("HTTP/2 upstream refused the request twice")

    async def _h2_connection(self) -> object:
        """A connection with a free stream; a new one when all are full and the pool may grow."""
        from tether.proxy.http.h2client import H2ClientConnection

        while True:
            conns = self._h2
            conns[:] = [c for c in conns if isinstance(c, H2ClientConnection) and c.usable]
            for c in conns:
                assert isinstance(c, H2ClientConnection)
                if c.has_free_slot:
                    return c
            if self._h2_connecting is not None:
                # One connect at a time; whoever waited looks again (the new one may be full too).
                await asyncio.shield(self._h2_connecting)
                continue
            if len(conns) < max(1, self.cfg.h2_max_connections_per_endpoint):
                if conns:
                    log.debug("HTTP/2 endpoint %s:%d: %d connections at the stream limit; opening another",
                              self.address[0], self.address[1], len(conns))
                return await self._h2_connect()
            # The pool is full: wait for a stream on the least busy connection.
            return min(conns, key=lambda c: c.active_streams)  # type: ignore[attr-defined]

    async def _h2_connect(self) -> object:
        from tether.proxy.http.h2client import H2ClientConnection

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
            self._h2.append(proto)
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
        conns, self._h2 = self._h2, []
        for conn in conns:
            close = getattr(conn, "close", None)
            if close is not None:
                close()
