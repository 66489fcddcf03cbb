"""The cyclic garbage collector, kept short: what survives a full collection is frozen.

CPython's cyclic collector stops the interpreter while it runs, and a full (generation 2)
collection examines every object it tracks. A proxy holding 10,000 idle keep-alive connections
tracks ~330,000 objects: a full collection of them takes ~150 ms, and the default thresholds run
one each time the long-lived objects grow by a quarter, so opening 10,000 connections held the
event loop for 44, 95, 100, then 149 ms.

tether's connections leave no reference cycle behind when they close (each connection kind is
tested: ``tests/integration/test_gc_cycles.py``), so an object that survived a full collection is
freed by its reference count when it dies, not by the collector. The policy:

- once the proxy is ready, one full collection, then ``gc.freeze()``: start-up's objects (modules,
  configuration, the first stacks) are never examined again;
- after every full collection (the interpreter's own, triggered by its thresholds), its survivors
  are frozen too, so the next one examines only what became long-lived since: each full
  collection costs what is new, not what is alive;
- every ``full_interval`` seconds (``--gc-full-interval``, 15 minutes by default; 0: never), the
  frozen objects are given back and collected once, so a cycle that some path still leaves among
  long-lived objects is freed anyway. That one collection examines everything (~15 ms per 1,000
  open connections); it runs from the event loop, so its pause shows in
  ``tether_event_loop_blocked_max_seconds`` like any other.

/metrics: ``python_gc_collections_total``, ``python_gc_objects_collected_total`` and
``python_gc_objects_uncollectable_total`` by generation (prometheus_client's names, which Python
dashboards already chart), ``tether_gc_pause_seconds_total`` by generation,
``tether_gc_pause_max_seconds`` (the longest collection since start) and
``tether_gc_frozen_objects``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_FULL_INTERVAL = 900.0
FULL_AFTER = 1
_GENERATIONS = 3


class GcPolicy:
    """Freezes the survivors of full collections and counts every collection for /metrics."""

    def __init__(self, full_interval: float = DEFAULT_FULL_INTERVAL) -> None:
        self.full_interval = full_interval
        self.collections = [0] * _GENERATIONS
        self.collected = [0] * _GENERATIONS
        self.uncollectable = [0] * _GENERATIONS
        self.pause_total = [0.0] * _GENERATIONS
        self.pause_max = 0.0
        self._started_at = 0.0
        self._installed = False
        self._thresholds: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Count collections from now on, and freeze the survivors of each full one."""
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True
            # A full collection once the middle generation has been collected FULL_AFTER times
            # (CPython: 10): with survivors frozen, each examines only what those promoted.
            t0, t1, t2 = gc.get_threshold()
            self._thresholds = (t0, t1, t2)
            gc.set_threshold(t0, t1, FULL_AFTER)

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False
            if self._thresholds is not None:
                gc.set_threshold(*self._thresholds)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the interpreter's collection (on whichever thread allocated): counters only.
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        took = time.perf_counter() - self._started_at
        generation = int(info["generation"])
        self.collections[generation] += 1
        self.collected[generation] += int(info["collected"])
        self.uncollectable[generation] += int(info["uncollectable"])
        self.pause_total[generation] += took
        if took > self.pause_max:
            self.pause_max = took
        if generation == _GENERATIONS - 1:
            # A full collection leaves nothing in the younger generations: this freezes exactly
            # its survivors.
            gc.freeze()

    def settle(self) -> None:
        """Start-up is over: collect once and freeze what is left (see the module docstring)."""
        self.install()
        gc.collect()  # the callback freezes the survivors

    def collect_everything(self) -> int:
        """Give the frozen objects back and run one full collection; the number of objects freed."""
        gc.unfreeze()
        return gc.collect()

    async def run(self) -> None:
        """Collect everything once per ``full_interval`` (0: never)."""
        if self.full_interval <= 0:
            return
        while True:
            await asyncio.sleep(self.full_interval)
            started = time.perf_counter()
            freed = self.collect_everything()
            log.debug("periodic full collection: %d objects freed in %.1f ms", freed,
                      (time.perf_counter() - started) * 1000)

    def lines(self) -> list[str]:
        out: list[str] = []
        families: tuple[tuple[str, str, list[int] | list[float]], ...] = (
            ("python_gc_collections_total", "Collections of the cyclic garbage collector, by generation.",
             self.collections),
            ("python_gc_objects_collected_total", "Objects freed by the cyclic garbage collector, by generation.",
             self.collected),
            ("python_gc_objects_uncollectable_total", "Unreachable objects the collector could not free.",
             self.uncollectable),
            ("tether_gc_pause_seconds_total", "Time the cyclic garbage collector held the interpreter, by generation.",
             self.pause_total),
        )
        for name, help_text, values in families:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            out += [f'{name}{{generation="{g}"}} {v:.6f}' if isinstance(v, float) else
                    f'{name}{{generation="{g}"}} {v}' for g, v in enumerate(values)]
        out += [
            "# HELP tether_gc_pause_max_seconds Longest collection of the cyclic garbage collector since start.",
            "# TYPE tether_gc_pause_max_seconds gauge",
            f"tether_gc_pause_max_seconds {self.pause_max:.6f}",
            "# HELP tether_gc_frozen_objects Objects that survived a full collection, left out of the next ones.",
            "# TYPE tether_gc_frozen_objects gauge",
            f"tether_gc_frozen_objects {gc.get_freeze_count()}",
        ]
        return out
