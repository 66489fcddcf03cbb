"""The watch primitive: snapshot, ordered changes, bounded queues with reset, close."""

from __future__ import annotations

import asyncio

import pytest

from tether.runtime.watch import Change, Snapshot, WatchClosed, Watched


def _add(state: frozenset[int], change: int) -> frozenset[int]:
    return state | {change}


def test_snapshot_then_changes_in_order() -> None:
    w: Watched[frozenset[int], int] = Watched(frozenset({1}), _add)
    sub = w.subscribe()
    w.change(2)
    w.change(3)
    first = sub.poll()
    # The snapshot is taken late: it already holds every change made before it was read.
    assert first == Snapshot(frozenset({1, 2, 3}), 2)
    assert sub.poll() is None
    w.change(4)
    assert sub.poll() == Change(4, 3)
    assert w.state == frozenset({1, 2, 3, 4})


def test_slow_subscriber_is_reset_with_a_fresh_snapshot_others_are_not() -> None:
    w: Watched[frozenset[int], int] = Watched(frozenset(), _add, queue_limit=3)
    slow, fast = w.subscribe(), w.subscribe()
    assert isinstance(slow.poll(), Snapshot)
    assert isinstance(fast.poll(), Snapshot)
    for i in range(3):
        w.change(i)
        assert fast.poll() == Change(i, i + 1)
    w.change(3)  # the fourth change overflows slow's queue of 3
    assert fast.poll() == Change(3, 4)
    update = slow.poll()
    assert update == Snapshot(frozenset({0, 1, 2, 3}), 4, reset=True)
    assert slow.resets == 1 and slow.poll() is None


def test_replace_sends_snapshots() -> None:
    w: Watched[frozenset[int], int] = Watched(frozenset({1}), _add)
    sub = w.subscribe()
    sub.poll()
    w.change(2)
    w.replace(frozenset({9}))
    assert sub.poll() == Snapshot(frozenset({9}), 2)
    assert sub.poll() is None


def test_async_iteration_wakes_on_change_and_ends_on_close() -> None:
    async def main() -> list[object]:
        w: Watched[frozenset[int], int] = Watched(frozenset(), _add)
        got: list[object] = []

        async def consume() -> None:
            async with w.subscribe() as sub:
                async for update in sub:
                    got.append(update)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        w.change(1)
        await asyncio.sleep(0)
        w.change(2)
        w.close()
        async with asyncio.timeout(5):
            await task
        assert w.subscribers == 0
        return got

    got = asyncio.run(main())
    assert got[0] == Snapshot(frozenset(), 0)
    assert got[1:] == [Change(1, 1), Change(2, 2)]


def test_closed_subscription_stops_receiving() -> None:
    w: Watched[frozenset[int], int] = Watched(frozenset(), _add)
    sub = w.subscribe()
    sub.close()
    assert w.subscribers == 0
    w.change(1)
    sub.poll()  # the snapshot taken at subscribe time
    with pytest.raises(WatchClosed):
        sub.poll()


def test_change_after_close_is_an_error() -> None:
    w: Watched[frozenset[int], int] = Watched(frozenset(), _add)
    w.close()
    with pytest.raises(WatchClosed):
        w.change(1)
    sub = w.subscribe()
    assert sub.closed
