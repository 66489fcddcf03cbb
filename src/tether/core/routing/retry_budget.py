"""The retry budget: retries allowed as a share of recent requests, plus a floor.

Linkerd's ServiceProfile ``retryBudget`` (defaults: ``retryRatio`` 0.2, ``minRetriesPerSecond``
10, ``ttl`` 10s): over the last ``ttl`` seconds, at most ``min_per_second * ttl`` retries plus
``ratio`` times the requests made. A retry storm therefore adds at most ~20% load to a failing
service, while a quiet service can still retry its occasional failure.

Pure: time is passed in. The window is kept in ``buckets`` slices so old requests age out
smoothly and memory stays constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1000.0:
            raise ValueError(f"retry ratio {self.ratio} must be between 0 and 1000")
        if self.min_per_second < 0:
            raise ValueError(f"minRetriesPerSecond {self.min_per_second} must not be negative")
        if not 1.0 <= self.ttl <= 60.0:
            raise ValueError(f"retry budget ttl {self.ttl}s must be between 1s and 60s")


class RetryBudget:
    """Counts requests (deposits) and retries (withdrawals) over a sliding window."""

    __slots__ = ("_buckets", "_epoch", "_requests", "_retries", "_width", "exhausted_total", "policy")

    def __init__(self, policy: BudgetPolicy, now: float, buckets: int = 10) -> None:
        self.policy = policy
        self._width = policy.ttl / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._buckets = buckets
        self._epoch = math.floor(now / self._width)
        self.exhausted_total = 0

    def _advance(self, now: float) -> int:
        epoch = math.floor(now / self._width)
        gap = epoch - self._epoch
        if gap > 0:
            for i in range(min(gap, self._buckets)):
                slot = (self._epoch + 1 + i) % self._buckets
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._epoch = epoch
        return self._epoch % self._buckets

    def deposit(self, now: float) -> None:
        """A request (first attempt) was made."""
        self._requests[self._advance(now)] += 1

    def try_withdraw(self, now: float) -> bool:
        """May one more retry be sent now? Counts it when it may."""
        slot = self._advance(now)
        p = self.policy
        allowed = p.min_per_second * p.ttl + p.ratio * sum(self._requests)
        if sum(self._retries) + 1 > allowed:
            self.exhausted_total += 1
            return False
        self._retries[slot] += 1
        return True
