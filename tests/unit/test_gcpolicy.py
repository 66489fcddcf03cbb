"""The proxy's garbage-collector policy: survivors of full collections are frozen, and a periodic
collection of everything still frees a cycle that was frozen."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from tether.proxy.gcpolicy import GcPolicy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def policy() -> Iterator[GcPolicy]:
    p = GcPolicy(full_interval=0.05)
    yield p
    p.uninstall()
    gc.unfreeze()


def _metric(lines: list[str], name: str) -> float:
    return float(next(ln.split()[-1] for ln in lines if ln.startswith(name)))


def test_settle_freezes_what_is_alive_and_full_collections_freeze_their_survivors(policy: GcPolicy) -> None:
    policy.settle()
    frozen = gc.get_freeze_count()
    assert frozen > 1000  # the interpreter's and the test run's objects
    kept = [Node() for _ in range(5000)]  # long-lived objects made after start-up
    gc.collect()
    assert gc.get_freeze_count() >= frozen + 5000  # frozen in turn by the full collection's callback
    lines = policy.lines()
    assert _metric(lines, 'python_gc_collections_total{generation="2"}') >= 2
    assert _metric(lines, "tether_gc_frozen_objects") == gc.get_freeze_count()
    assert _metric(lines, "tether_gc_pause_max_seconds") > 0
    del kept


def test_a_cycle_among_frozen_objects_is_freed_by_the_periodic_full_collection(policy: GcPolicy) -> None:
    policy.settle()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect()  # survivors frozen: a and b among them
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is not None  # frozen: no ordinary collection examines it

    async def main() -> None:
        freed = asyncio.Event()
        node = gone()
        assert node is not None
        weakref.finalize(node, freed.set)  # run by the collection that frees the cycle
        del node
        task = asyncio.create_task(policy.run())
        try:
            async with asyncio.timeout(10):
                await freed.wait()
        finally:
            task.cancel()

    asyncio.run(main())
    assert gone() is None
    assert gc.get_freeze_count() > 0  # the periodic collection's survivors are frozen again


def test_counts_by_generation_in_prometheus_clients_names(policy: GcPolicy) -> None:
    policy.install()
    before = _metric(policy.lines(), 'python_gc_collections_total{generation="0"}')
    a = Node()
    a.other = a
    del a
    gc.collect(0)
    lines = policy.lines()
    assert _metric(lines, 'python_gc_collections_total{generation="0"}') == before + 1
    assert _metric(lines, 'python_gc_objects_collected_total{generation="0"}') >= 1
    assert "# TYPE python_gc_objects_uncollectable_total counter" in lines
    assert any(ln.startswith('tether_gc_pause_seconds_total{generation="0"}') for ln in lines)
