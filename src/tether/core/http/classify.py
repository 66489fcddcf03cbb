"""Response classification: is a response a success or a failure? One implementation, two policies.

- :data:`METRICS`: Linkerd's default classification for ``response_total`` and success rates: a
  5xx, a non-OK ``grpc-status``, a gRPC response without a status, or an error is a failure.
- :data:`ACCRUAL`: what counts against an endpoint in failure accrual: a 5xx, or a gRPC status
  that says the server failed (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS, the
  codes linkerd2-proxy's gRPC routes classify as failures by default). NOT_FOUND or
  INVALID_ARGUMENT are the application's answers: they fail the call, not the endpoint.

When a gRPC response's status comes only in its trailers, :meth:`Classifier.head` says None
(not known yet) and :meth:`Classifier.end` decides at the end of the body.
"""

from __future__ import annotations

from typing import Final


class Classifier:
    """A response classification policy (a route's, once routes carry their own)."""

    __slots__ = ("grpc_failures",)

    def __init__(self, grpc_failures: frozenset[int] | None) -> None:
        # None: every non-OK gRPC status is a failure.
        self.grpc_failures = grpc_failures

    def grpc_ok(self, grpc_status: int) -> bool:
        failures = self.grpc_failures
        if failures is None:
            return grpc_status == 0
        return grpc_status not in failures

    def head(self, status: int, grpc: bool, grpc_status: int | None) -> bool | None:
        """From the response head: True success, False failure, None when the trailers decide."""
        if grpc_status is not None:  # trailers-only gRPC: the status wins over the HTTP status
            return self.grpc_ok(grpc_status)
        if grpc:
            return None if status < 500 else False
        return status < 500

    def end(self, status: int | None, grpc: bool, grpc_status: int | None, error: bool = False) -> bool:
        """At the end of the response (or when it failed): True for a success."""
        if error or status is None:
            return False
        if grpc_status is not None:
            return self.grpc_ok(grpc_status)
        if grpc:
            return False  # a gRPC call that ended without a status did not complete
        return status < 500


def parse_grpc_status(value: bytes) -> int:
    """A ``grpc-status`` value; an unreadable one is UNKNOWN (2), never OK."""
    # Codes are one or two digits: read natively (``int()`` is a generic call when compiled).
    n = len(value)
    if n == 1 or n == 2:
        d = value[0] - 48
        if 0 <= d <= 9:
            if n == 1:
                return d
            e = value[1] - 48
            if 0 <= e <= 9:
                return d * 10 + e
    try:
        return int(value)
    except ValueError:
        return 2


METRICS: Final = Classifier(None)
ACCRUAL: Final = Classifier(frozenset({2, 4, 13, 14, 15}))
