"""Response timeout: 504 when the response head does not arrive within the route's timeout."""

from __future__ import annotations

import asyncio

from tether.proxy.errors import ResponseTimeoutError
from tether.proxy.http.message import Request, Response, Service


class ResponseTimeout:
    """Layer: bound the wait for the response head (built only for a route with a timeout)."""

    __slots__ = ("inner", "timeout")

    def __init__(self, inner: Service, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout

    async def __call__(self, req: Request) -> Response:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.inner(req)
        except TimeoutError:
            raise ResponseTimeoutError(f"response timeout after {self.timeout:g}s") from None
