"""Which failed requests a route retries, how often, and within what budget (pure).

Linkerd's retry annotations (``retry.linkerd.io/http``, ``/grpc``, ``/limit``, ``/timeout``) and
the same per-request headers (``l5d-retry-http``, ``l5d-retry-grpc``, ``l5d-retry-limit``,
``l5d-retry-timeout``) read into a :class:`RetryPolicy`; a ServiceProfile route's
``isRetryable`` gives a policy with its profile's budget. Requests whose body is larger than
64 KiB are never retried (the proxy would have to hold it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tether.core.routing.retry_budget import BudgetPolicy

MAX_RETRY_BODY = 64 * 1024

# gRPC status names as Linkerd's retry.linkerd.io/grpc spells them.
GRPC_CODES = {
    "cancelled": 1, "unknown": 2, "invalid-argument": 3, "deadline-exceeded": 4, "not-found": 5,
    "already-exists": 6, "permission-denied": 7, "resource-exhausted": 8, "failed-precondition": 9,
    "aborted": 10, "out-of-range": 11, "unimplemented": 12, "internal": 13, "unavailable": 14,
    "data-loss": 15, "unauthenticated": 16,
}


class RetryPolicyError(ValueError):
    """A retry setting could not be read; the message names the value."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``limit`` retries at most; on these HTTP status ranges or gRPC codes, on connection errors,
    and on per-try timeouts; within ``budget`` when the route has one."""

    limit: int = 1
    http_statuses: tuple[tuple[int, int], ...] = ()
    grpc_codes: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    budget: BudgetPolicy | None = field(default=None)
    max_body: int = MAX_RETRY_BODY
    # A ServiceProfile route retries what its response classes call a failure.
    is_failure: Callable[[int], bool] | None = field(default=None, compare=False)

    def retries_status(self, status: int) -> bool:
        if self.is_failure is not None:
            return self.is_failure(status)
        return any(lo <= status <= hi for lo, hi in self.http_statuses)

    def retries_grpc(self, code: int) -> bool:
        return code in self.grpc_codes


def parse_http_statuses(text: str) -> tuple[tuple[int, int], ...]:
    """``5xx``, ``429``, ``500-504``, comma-separated, as in ``retry.linkerd.io/http``."""
    out: list[tuple[int, int]] = []
    for raw in text.split(","):
        part = raw.strip().lower()
        if not part:
            continue
        if len(part) == 3 and part.endswith("xx") and part[0].isdigit():
            lo = int(part[0]) * 100
            out.append((lo, lo + 99))
            continue
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        except ValueError:
            raise RetryPolicyError(f"{raw.strip()!r} is not a status code, a range like 500-504, or 5xx") from None
        if not (100 <= lo <= hi <= 599):
            raise RetryPolicyError(f"{raw.strip()!r} is not within 100-599")
        out.append((lo, hi))
    return tuple(out)


def parse_grpc_codes(text: str) -> frozenset[int]:
    """``cancelled,deadline-exceeded,...`` as in ``retry.linkerd.io/grpc``."""
    codes: set[int] = set()
    for raw in text.split(","):
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        if name not in GRPC_CODES:
            raise RetryPolicyError(f"{raw.strip()!r} is not a gRPC status name ({', '.join(GRPC_CODES)})")
        codes.add(GRPC_CODES[name])
    return frozenset(codes)


def parse_limit(text: str) -> int:
    try:
        n = int(text.strip())
    except ValueError:
        raise RetryPolicyError(f"retry limit {text.strip()!r} is not a number") from None
    if not 0 <= n <= 100:
        raise RetryPolicyError(f"retry limit {n} is not within 0-100")
    return n
