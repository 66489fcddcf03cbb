"""Rapid-reset protection (CVE-2023-44487) that a meshed peer multiplexing many clients survives.

A rapid-reset attack opens streams and resets them at once, so the server starts work for each
and the attacker pays nothing. A proxy peer carrying many clients also resets streams, each time
one of its clients cancels a call: that is the normal end of work that was done. So a reset is
judged by the work it cut short:

- a reset of a stream that was already answered (response head sent), or that ran for at least
  ``min_age`` seconds, is an ordinary cancellation and is not counted;
- other resets are "rapid". Up to ``max_resets`` of them per ``window`` are allowed;
- past that, if rapid resets are at least half of the streams the peer had served (work started)
  in the window, the peer is doing little else: GOAWAY (ENHANCE_YOUR_CALM);
- otherwise the peer does real work too: new streams are refused one by one (REFUSED_STREAM,
  which clients retry) until the rapid resets in the window fall back under the budget, and the
  shared connection stays up.

Counts are kept per second in a ring of buckets (bounded memory at any rate). Time is a parameter.
"""

from __future__ import annotations

import enum
import math


class Verdict(enum.Enum):
    OK = "ok"
    SHED = "shed"  # refuse new streams for now
    GOAWAY = "goaway"  # end the connection


class _Window:
    """Event counts over the last ``window`` seconds, in one-second buckets."""

    __slots__ = ("_counts", "_last", "_seconds", "total")

    def __init__(self, window: float) -> None:
        n = max(1, math.ceil(window))
        self._counts = [0] * n
        self._seconds = [-1] * n
        self._last = -1  # the second of the last advance: within it there is nothing to drop
        self.total = 0

    def add(self, now: float) -> None:
        self.advance(now)
        sec = int(now)
        self._counts[sec % len(self._counts)] += 1
        self.total += 1

    def advance(self, now: float) -> None:
        """Drop the buckets older than the window."""
        sec = int(now)
        if sec == self._last:
            return  # every stream of a busy connection lands here: one comparison, not a sweep
        self._last = sec
        n = len(self._counts)
        for i in range(n):
            if self._seconds[i] != -1 and self._seconds[i] <= sec - n:
                self.total -= self._counts[i]
                self._counts[i] = 0
                self._seconds[i] = -1
        i = sec % n
        if self._seconds[i] != sec:
            self.total -= self._counts[i]
            self._counts[i] = 0
            self._seconds[i] = sec


class ResetBudget:
    """Judges a peer's stream resets; one per HTTP/2 server connection."""

    __slots__ = ("_opened", "_rapid", "max_resets", "min_age")

    def __init__(self, max_resets: int, window: float, min_age: float) -> None:
        self.max_resets = max_resets
        self.min_age = min_age
        self._opened = _Window(window)
        self._rapid = _Window(window)

    def opened(self, now: float) -> None:
        """Work started for a stream the peer opened (a refused stream is not counted)."""
        self._opened.add(now)

    def reset(self, now: float, age: float, answered: bool) -> Verdict:
        """The peer reset a stream opened ``age`` seconds ago; ``answered``: its response head was sent."""
        if answered or age >= self.min_age:
            return self.verdict(now)
        self._rapid.add(now)
        return self.verdict(now)

    def verdict(self, now: float) -> Verdict:
        """What to do with the peer now (also: whether to refuse a new stream)."""
        self._rapid.advance(now)
        rapid = self._rapid.total
        if rapid <= self.max_resets:
            return Verdict.OK
        self._opened.advance(now)
        if 2 * rapid >= self._opened.total:
            return Verdict.GOAWAY
        return Verdict.SHED

    @property
    def rapid_resets(self) -> int:
        return self._rapid.total
