"""Turn typed proxy errors into responses, so the layers above (metrics) see a status code."""

from __future__ import annotations

import logging

from tether.proxy.errors import ProxyError
from tether.proxy.http.body import BytesBody
from tether.proxy.http.message import Request, Response, Service

log = logging.getLogger(__name__)


def error_response(status: int, reason: str, grpc: bool = False, grpc_status: int | None = None) -> Response:
    """A proxy-generated response: the reason in ``l5d-proxy-error`` and in the body.

    For gRPC clients the status is 200 with ``grpc-status``/``grpc-message`` headers (a
    trailers-only response), as gRPC clients only understand errors in that form.
    """
    headers = [(b"l5d-proxy-error", reason.encode("ascii", "replace"))]
    if grpc:
        if grpc_status is not None:
            code = str(grpc_status).encode()
        else:
            code = {503: b"14", 504: b"4", 403: b"7", 429: b"8"}.get(status, b"14")  # UNAVAILABLE
        headers += [
            (b"content-type", b"application/grpc"),
            (b"grpc-status", code),
            (b"grpc-message", reason.encode("ascii", "replace")),
        ]
        resp = Response(200, headers, BytesBody(b""))
        resp.extensions["proxy_error"] = status
        return resp
    headers.append((b"content-type", b"text/plain"))
    return Response(status, headers, BytesBody((reason + "\n").encode()))


def is_grpc(req: Request) -> bool:
    ct = req.header(b"content-type")
    return ct is not None and ct.startswith(b"application/grpc")


class ErrorResponses:
    """Layer: ProxyError from below becomes its status + reason response."""

    def __init__(self, inner: Service) -> None:
        self.inner = inner

    async def __call__(self, req: Request) -> Response:
        try:
            return await self.inner(req)
        except ProxyError as e:
            log.debug("%s %s -> %d %s", req.method.decode(), req.authority.decode("latin-1"), e.status, e.reason)
            return error_response(e.status, e.reason, grpc=req.version == "2" and is_grpc(req),
                                  grpc_status=getattr(e, "grpc_status", None))
