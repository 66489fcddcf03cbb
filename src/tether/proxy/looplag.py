"""How late the event loop runs: a timer that should fire every ``interval`` measures its own delay.

Every connection of the proxy shares one event loop, so any callback that runs long (a big
synchronous parse, a scrape over many series) delays every other connection by as much. The
monitor's lateness is that delay; /metrics shows the largest seen and a histogram of samples:

- ``tether_event_loop_lag_max_seconds``: the largest lag since the proxy started;
- ``tether_event_loop_lag_seconds``: a histogram of the samples (one per ``interval``);
- ``tether_event_loop_blocked_max_seconds``: the largest lag less the time the loop's thread spent
  runnable but waiting for a CPU during the same sample (the kernel's run-queue delay, from
  /proc/thread-self/schedstat). Lag is what every client felt; this is the part the proxy itself
  caused (a long callback, a blocking call). On a busy machine the two differ by the neighbours'
  share of the CPUs. Without schedstat (a kernel without CONFIG_SCHED_INFO) it equals the lag.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# One sample per 25 ms: 40 timer callbacks a second cost nothing measurable, and a stall longer
# than 25 ms is always seen by at least one sample.
DEFAULT_INTERVAL = 0.025
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A stall this long is logged (at most once a second): it is a latency every client felt.
WARN_LAG = 0.25
SCHEDSTAT = "/proc/thread-self/schedstat"


def runqueue_clock() -> Callable[[], float] | None:
    """Seconds the calling thread has spent runnable but not running (schedstat's second field), read
    through a descriptor kept open: call it on the thread to be measured. None where the kernel has
    no schedstat."""
    try:
        fd = os.open(SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
        int(os.pread(fd, 128, 0).split()[1])
    except (OSError, IndexError, ValueError):
        return None

    def waited() -> float:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9

    return waited


class LoopLagMonitor:
    """Samples the event loop's lag; ``lines`` renders it for /metrics."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self.max_lag = 0.0
        self.max_blocked = 0.0
        self.samples = 0
        self.total = 0.0
        self._counts = [0] * len(BUCKETS)
        self._last_warn = 0.0

    def record(self, lag: float, now: float, waited: float = 0.0) -> None:
        """Count one sample of ``lag`` seconds of which the thread spent ``waited`` seconds waiting for a
        CPU (``now``: loop time, for rate-limiting the log)."""
        lag = max(0.0, lag)
        blocked = max(0.0, lag - waited)
        if blocked > self.max_blocked:
            self.max_blocked = blocked
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
            log.warning("event loop ran %.0f ms late (%.0f ms of it waiting for a CPU)", lag * 1000,
                        min(lag, waited) * 1000)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        runqueue = runqueue_clock()
        waited = runqueue() if runqueue else 0.0
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            before, waited = waited, runqueue() if runqueue else 0.0
            self.record(now - start - interval, now, waited - before)

    def lines(self) -> list[str]:
        out = [
            "# HELP tether_event_loop_lag_max_seconds Largest delay of the event loop seen since start.",
            "# TYPE tether_event_loop_lag_max_seconds gauge",
            f"tether_event_loop_lag_max_seconds {self.max_lag:.6f}",
            "# HELP tether_event_loop_blocked_max_seconds Largest event-loop lag less the time its thread waited"
            " for a CPU in that sample: the delay the proxy itself caused.",
            "# TYPE tether_event_loop_blocked_max_seconds gauge",
            f"tether_event_loop_blocked_max_seconds {self.max_blocked:.6f}",
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
