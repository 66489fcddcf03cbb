"""The event-loop lag monitor: what it records, what /metrics shows, and that it sees a blocked loop."""

from __future__ import annotations

import asyncio
import time

from tether.proxy.looplag import LoopLagMonitor


def test_samples_land_in_buckets_and_the_largest_is_kept() -> None:
    m = LoopLagMonitor(interval=0.025)
    for lag in (0.0005, 0.003, 0.07, -0.001):
        m.record(lag, now=0.0)
    lines = m.lines()
    assert "tether_event_loop_lag_max_seconds 0.070000" in lines
    assert 'tether_event_loop_lag_seconds_bucket{le="0.001"} 2' in lines  # a negative delay counts as 0
    assert 'tether_event_loop_lag_seconds_bucket{le="0.005"} 3' in lines
    assert 'tether_event_loop_lag_seconds_bucket{le="0.05"} 3' in lines
    assert 'tether_event_loop_lag_seconds_bucket{le="0.1"} 4' in lines
    assert 'tether_event_loop_lag_seconds_bucket{le="+Inf"} 4' in lines
    assert "tether_event_loop_lag_seconds_count 4" in lines


def test_a_callback_that_blocks_the_loop_shows_as_lag() -> None:
    def block() -> None:
        time.sleep(0.12)  # a callback holding the loop for 120 ms

    async def scenario() -> LoopLagMonitor:
        m = LoopLagMonitor(interval=0.01)
        task = asyncio.create_task(m.run())
        await asyncio.sleep(0.05)  # a few samples first
        asyncio.get_running_loop().call_soon(block)
        await asyncio.sleep(0.2)  # the sample that waited for the blocking callback is taken
        task.cancel()
        return m

    m = asyncio.run(scenario())
    assert 0.09 <= m.max_lag < 1.0
