"""Send a request again when its endpoint could not even be connected to.

A connection failure means no byte of the request left the proxy, so trying another endpoint is
safe for any request whose body can be sent again (empty or held in memory). The balancer's
failure accrual sees the failed attempt and ejects the endpoint after enough of them; clients
see no error while another endpoint can serve.
"""

from __future__ import annotations

from tether.proxy.errors import ConnectError
from tether.proxy.http.body import BytesBody, EmptyBody
from tether.proxy.http.message import Request, Response, Service


class ConnectRetry:
    """Layer: up to ``attempts`` tries while the failure is a connect error."""

    __slots__ = ("attempts", "inner")

    def __init__(self, inner: Service, attempts: int) -> None:
        self.inner = inner
        self.attempts = attempts

    async def __call__(self, req: Request) -> Response:
        body = req.body
        replayable = type(body) is EmptyBody or (type(body) is BytesBody and body.length == 0)
        if not replayable:
            return await self.inner(req)
        for _ in range(self.attempts - 1):
            try:
                return await self.inner(req)
            except ConnectError:
                continue
        return await self.inner(req)
