"""Response timeout: 504 when the response head does not arrive in time."""

from __future__ import annotations

import asyncio

from tether.proxy.errors import ResponseTimeoutError
from tether.proxy.http.message import Request, Response, Service


class ResponseTimeout:
    """Layer: bound the wait for the response head (``timeout`` None: no bound)."""

    def __init__(self, inner: Service, timeout: float | None) -> None:
        self.inner = inner
        self.timeout = timeout

    async def __call__(self, req: Request) -> Response:
        timeout = req.extensions.get("timeout", self.timeout)
        if timeout is None:
            return await self.inner(req)
        assert isinstance(timeout, float | int)
        try:
            async with asyncio.timeout(timeout):
                return await self.inner(req)
        except TimeoutError:
            raise ResponseTimeoutError(f"response timeout after {timeout:g}s") from None
