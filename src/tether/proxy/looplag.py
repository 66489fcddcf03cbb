"""How late the event loop runs: a timer that should fire every ``interval`` measures its own delay.

Every connection of the proxy shares one event loop, so any callback that runs long (a big
synchronous parse, a scrape over many series) delays every other connection by as much. The
monitor's lateness is that delay; /metrics shows the largest seen and a histogram of samples:

- ``tether_event_loop_lag_max_seconds``: the largest lag since the proxy started;
- ``tether_event_loop_lag_seconds``: a histogram of the samples (one per ``interval``).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

# One sample per 25 ms: 40 timer callbacks a second cost nothing measurable, and a stall longer
# than 25 ms is always seen by at least one sample.
DEFAULT_INTERVAL = 0.025
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A stall this long is logged (at most once a second): it is a latency every client felt.
WARN_LAG = 0.25


class LoopLagMonitor:
    """Samples the event loop's lag; ``lines`` renders it for /metrics."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self.samples = 0
        self.total = 0.0
        self._counts = [0] * len(BUCKETS)
        self._last_warn = 0.0

    def record(self, lag: float, now: float) -> None:
        """Count one sample of ``lag`` seconds (``now``: loop time, for rate-limiting the log)."""
        lag = max(0.0, lag)
        self.samples += 1
        self.total += lag
        if lag > self.max_lag:
            self.max_lag = lag
        for i, le in enumerate(BUCKETS):
            if lag <= le:
                self._counts[i] += 1
                break
        if lag >= WARN_LAG and now - self._last_warn >= 1.0:
            self._last_warn = now
            log.warning("event loop blocked for %.0f ms", lag * 1000)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            self.record(now - start - interval, now)

    def lines(self) -> list[str]:
        out = [
            "# HELP tether_event_loop_lag_max_seconds Largest delay of the event loop seen since start.",
            "# TYPE tether_event_loop_lag_max_seconds gauge",
            f"tether_event_loop_lag_max_seconds {self.max_lag:.6f}",
            "# HELP tether_event_loop_lag_seconds How late the event loop ran a timer, sampled every"
            f" {self.interval * 1000:g} ms.",
            "# TYPE tether_event_loop_lag_seconds histogram",
        ]
        cumulative = 0
        for le, n in zip(BUCKETS, self._counts, strict=True):
            cumulative += n
            out.append(f'tether_event_loop_lag_seconds_bucket{{le="{le:g}"}} {cumulative}')
        out.append(f'tether_event_loop_lag_seconds_bucket{{le="+Inf"}} {self.samples}')
        out.append(f"tether_event_loop_lag_seconds_sum {self.total:.6f}")
        out.append(f"tether_event_loop_lag_seconds_count {self.samples}")
        return out
