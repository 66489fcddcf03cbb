"""Peak-EWMA latency estimate of one endpoint, as finagle and linkerd2-proxy (tower) compute it.

The estimate is an exponentially weighted moving average of round-trip times that jumps to any
sample above it (peak sensitivity: one slow response makes the endpoint look slow at once) and
decays toward faster samples with time constant ``decay``. Reading the cost observes a zero
sample, so an idle endpoint's estimate decays toward zero and it gets tried again. The load
compared by P2C is ``estimate * (pending + 1)``: in-flight requests multiply it.

Pure: ``now`` is a parameter (seconds on any monotonic clock); times are in seconds.
"""

from __future__ import annotations

import math
from typing import Final

DEFAULT_RTT: Final = 0.030  # linkerd2-proxy's default_rtt: the estimate of an endpoint never measured
DEFAULT_DECAY: Final = 10.0  # linkerd2-proxy's decay: a sample's weight falls by 1/e every 10 s


class PeakEwma:
    """The latency estimate and pending-request count of one endpoint."""

    __slots__ = ("decay", "estimate", "pending", "stamp")

    def __init__(self, now: float, default_rtt: float = DEFAULT_RTT, decay: float = DEFAULT_DECAY) -> None:
        if default_rtt < 0:
            raise ValueError(f"default_rtt must be >= 0, not {default_rtt}")
        if decay <= 0:
            raise ValueError(f"decay must be > 0, not {decay}")
        self.estimate = default_rtt
        self.stamp = now
        self.pending = 0
        self.decay = decay

    def observe(self, now: float, rtt: float) -> float:
        """Fold one round-trip time into the estimate and return the new estimate."""
        elapsed = now - self.stamp
        if elapsed < 0.0:
            # A clock that went backwards must not move the stamp back (it would re-apply decay).
            elapsed = 0.0
        else:
            self.stamp = now
        if rtt > self.estimate:
            # Peak: the worst recent latency is the estimate until faster samples wear it down.
            self.estimate = rtt
        elif elapsed > 0.0:
            w = math.exp(-elapsed / self.decay)
            self.estimate = self.estimate * w + (rtt if rtt > 0.0 else 0.0) * (1.0 - w)
        return self.estimate

    def cost(self, now: float) -> float:
        """The load P2C compares: the decayed estimate times (pending + 1)."""
        return self.observe(now, 0.0) * (self.pending + 1)

    def start(self) -> None:
        """A request was dispatched to the endpoint."""
        self.pending += 1

    def finish(self, now: float, rtt: float | None) -> None:
        """A request ended; ``rtt`` is its time to response headers (None: no sample)."""
        if self.pending <= 0:
            raise ValueError("finish() without a matching start()")
        self.pending -= 1
        if rtt is not None:
            self.observe(now, rtt)
