"""Rescue: an error raised below becomes the response the client gets (see ``errors.rescue``), so
the layers above (metrics) see a status code and the client a reason in ``l5d-proxy-error``."""

from __future__ import annotations

import logging

from tether.proxy.errors import ProxyError, rescue
from tether.proxy.http.message import Request, Response, Service

log = logging.getLogger(__name__)


class Rescue:
    """Layer: ProxyError from below becomes its status + reason response (gRPC: trailers-only)."""

    __slots__ = ("inner",)

    def __init__(self, inner: Service) -> None:
        self.inner = inner

    async def __call__(self, req: Request) -> Response:
        try:
            return await self.inner(req)
        except ProxyError as e:
            log.debug("%s %s -> %d %s", req.method.decode(), req.authority.decode("latin-1"), e.status, e.reason)
            return rescue(e, req)
