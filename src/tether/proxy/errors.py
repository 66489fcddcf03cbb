"""Typed proxy errors: each carries the HTTP status the client gets and a reason.

The reason goes into the ``l5d-proxy-error`` response header. (Created by the lead for the HTTP/1
codec; the balancer work may add types here: add, don't rename.)

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
