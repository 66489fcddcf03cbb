"""Typed proxy errors: each carries the HTTP status the client gets and a reason.

The reason goes into the ``l5d-proxy-error`` response header. :func:`rescue` is the one place
that turns an error into the response a client sees, for HTTP/1, HTTP/2 and gRPC (trailers-only
``grpc-status``): the rescue layer and both server codecs call it.

Statuses, and how they compare with linkerd2-proxy's outbound error responses
(``app/outbound/src/http/server.rs`` and ``endpoint.rs``, ``ServerRescue``/``ClientRescue``):

==========================  ======  ==================  =============================================
error                       status  gRPC status         linkerd2-proxy
==========================  ======  ==================  =============================================
UpstreamError, ConnectError 502     UNAVAILABLE (14)    I/O errors from the endpoint: 502
ConnectTimeoutError         504     DEADLINE_EXCEEDED   ConnectTimeout: 504
ResponseTimeoutError        504     DEADLINE_EXCEEDED   ResponseTimeoutError: 504
FailFastError               503     UNAVAILABLE (14)    FailFastError: 504 today, with a maintainer's
                                                        note that it should be 503; tether answers 503
                                                        as the Linkerd docs and our issue say
LoadShedError               503     UNAVAILABLE (14)    LoadShedError (balancer queue full): 503
UnavailableError            503     UNAVAILABLE (14)    no endpoints known for the destination
StreamCapacityError         503     UNAVAILABLE (14)    every HTTP/2 connection to the endpoint is at its
                                                        stream limit; not an endpoint failure
==========================  ======  ==================  =============================================
"""

from __future__ import annotations

from tether.proxy.http.body import BodyError, BytesBody
from tether.proxy.http.message import Request, Response

GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNAVAILABLE = 14


class ProxyError(Exception):
    """Base: an error the proxy answers with ``status`` and ``reason``."""

    status = 502
    # The grpc-status a gRPC client gets instead (gRPC errors ride on HTTP 200).
    grpc_status = GRPC_UNAVAILABLE

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status is not None:
            self.status = status
            self.grpc_status = _GRPC_FOR_HTTP.get(status, GRPC_UNAVAILABLE)


class UpstreamError(ProxyError):
    """The upstream failed: connection reset, invalid response (502)."""

    status = 502


class ConnectError(UpstreamError):
    """Could not connect to the endpoint (502); counts as an endpoint failure."""


class ConnectTimeoutError(ConnectError):
    """The connection to the endpoint was not established within the connect timeout (504, as linkerd)."""

    status = 504
    grpc_status = GRPC_DEADLINE_EXCEEDED


class FailFastError(ProxyError):
    """No endpoint became available within the fail-fast timeout (503)."""

    status = 503


class LoadShedError(ProxyError):
    """The balancer's queue of requests waiting for an endpoint is full (503)."""

    status = 503


class UnavailableError(ProxyError):
    """The destination is known to have no endpoints (503)."""

    status = 503


class StreamCapacityError(ProxyError):
    """Every HTTP/2 connection to the endpoint stayed at the peer's stream limit (503).

    The endpoint is busy, not failing: failure accrual must not count it.
    """

    status = 503


class ResponseTimeoutError(ProxyError):
    """The response did not arrive in time (504)."""

    status = 504
    grpc_status = GRPC_DEADLINE_EXCEEDED


# -- the one rescue: every error the proxy answers becomes its HTTP/1, HTTP/2 or gRPC response ----

GRPC_INTERNAL = 13
# The gRPC status a client gets for a proxy error of each HTTP status (gRPC's HTTP-to-gRPC table,
# with 403 and 429 as linkerd2-proxy answers them).
_GRPC_FOR_HTTP = {400: GRPC_INTERNAL, 403: 7, 404: 5, 429: 8, 502: GRPC_UNAVAILABLE, 503: GRPC_UNAVAILABLE,
                  504: GRPC_DEADLINE_EXCEEDED}


def describe(exc: BaseException) -> tuple[int, int, str]:
    """(HTTP status, gRPC status, reason) for an error raised below a server."""
    if isinstance(exc, ProxyError):
        return exc.status, exc.grpc_status, exc.reason
    if isinstance(exc, BodyError):
        return 400, GRPC_INTERNAL, f"request body error: {exc}"
    return 502, GRPC_UNAVAILABLE, str(exc) or type(exc).__name__


def is_grpc_request(version: str, content_type: bytes | None) -> bool:
    """gRPC rides on HTTP/2 with an application/grpc content type."""
    return version == "2" and content_type is not None and content_type.startswith(b"application/grpc")


def error_response(status: int, reason: str, grpc: bool = False, grpc_status: int | None = None) -> Response:
    """A proxy-generated response with the reason in ``l5d-proxy-error`` (and the body).

    For gRPC clients: HTTP 200, trailers-only, ``grpc-status``/``grpc-message`` in the head, the
    only form in which gRPC clients see an error."""
    clean = reason.replace("\r", " ").replace("\n", " ")[:512].encode("ascii", "replace")
    headers = [(b"l5d-proxy-error", clean)]
    if grpc:
        code = grpc_status if grpc_status is not None else _GRPC_FOR_HTTP.get(status, GRPC_UNAVAILABLE)
        headers += [(b"content-type", b"application/grpc"), (b"grpc-status", str(code).encode()),
                    (b"grpc-message", clean)]
        return Response(200, headers, BytesBody(b""))
    headers.append((b"content-type", b"text/plain"))
    return Response(status, headers, BytesBody(clean + b"\n"))


def rescue(exc: BaseException, req: Request) -> Response:
    """The response a client gets for ``exc`` raised while serving ``req``."""
    status, grpc_status, reason = describe(exc)
    return error_response(status, reason, is_grpc_request(req.version, req.header(b"content-type")), grpc_status)
