"""The event-loop lag monitor: what it records, what /metrics shows, and that it sees a blocked loop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from tether.proxy.looplag import SCHEDSTAT, LoopLagMonitor, runqueue_clock


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


def test_time_spent_waiting_for_a_cpu_is_not_counted_as_blocked() -> None:
    m = LoopLagMonitor(interval=0.025)
    m.record(0.08, now=0.0, waited=0.075)
    m.record(0.03, now=0.0, waited=0.0)
    m.record(0.01, now=0.0, waited=0.05)  # more waiting than lag: nothing blocked
    assert m.max_lag == 0.08
    assert abs(m.max_blocked - 0.03) < 1e-9
    assert "tether_event_loop_blocked_max_seconds 0.030000" in m.lines()


def test_a_blocking_callback_counts_as_blocked() -> None:
    assert runqueue_clock() is not None, f"{SCHEDSTAT} is unreadable: the lag cannot be split"

    async def scenario() -> LoopLagMonitor:
        m = LoopLagMonitor(interval=0.01)
        task = asyncio.create_task(m.run())
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_soon(time.sleep, 0.12)  # holds the loop, not waiting for a CPU
        await asyncio.sleep(0.2)
        task.cancel()
        return m

    m = asyncio.run(scenario())
    assert m.max_blocked >= 0.09, (m.max_lag, m.max_blocked)


# A monitor in a process at nice 19 sharing one CPU with a busy process at nice 0. Its loop is kept
# busy too, in 1 ms callbacks (a process that slept would get the scheduler's sleeper credit and run
# at once on waking): the kernel runs it a few milliseconds at a time, so its timer runs late, but no
# callback holds the loop for more than a millisecond.
STARVED = """
import asyncio, json, os, sys, time
from tether.proxy.looplag import LoopLagMonitor
os.sched_setaffinity(0, {int(sys.argv[1])})
os.nice(19)
print("ready", flush=True)
sys.stdin.readline()
async def busy():
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.001:
            pass
        await asyncio.sleep(0)
async def main():
    m = LoopLagMonitor(interval=0.01)
    task = asyncio.create_task(m.run())
    spin = asyncio.create_task(busy())
    await asyncio.sleep(1.5)
    task.cancel()
    spin.cancel()
    print(json.dumps([m.max_lag, m.max_blocked]), flush=True)
asyncio.run(main())
"""
HOG = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
"""


def test_a_starved_process_shows_lag_but_not_blocking() -> None:
    cpu = min(os.sched_getaffinity(0))
    starved = subprocess.Popen([sys.executable, "-c", STARVED, str(cpu)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert starved.stdout is not None and starved.stdin is not None
        assert starved.stdout.readline().strip() == "ready"
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(cpu), "3"])
        try:
            starved.stdin.write("go\n")
            starved.stdin.flush()
            out, _ = starved.communicate(timeout=30)
        finally:
            hog.kill()
            hog.wait()
    finally:
        starved.kill()
    max_lag, max_blocked = json.loads(out)
    assert max_lag >= 0.05, (max_lag, max_blocked)  # it was starved...
    assert max_blocked < max_lag / 2, (max_lag, max_blocked)  # ...and the split says so
