"""The destination controller's streams: a snapshot, then only relevant changes; a laggard is reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tether.control.destination.server import DestinationConfig, DestinationController, Reset
from tether.control.destination.world import World
from tether.platform.local.store import LocalStore

SVC = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: prod}}
spec:
  selector: {{app: web}}
  ports: [{{port: {port}}}]
"""


def _follow_all(c: DestinationController) -> None:
    for kind in ("Service", "ServiceProfile"):
        sub = c.store.watch(kind)
        u = sub.poll()
        assert u is not None
        c.world.change((kind, u.state))  # type: ignore[union-attr]
        sub.close()


def test_stream_sends_snapshot_then_only_relevant_changes(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SVC.format(port=80))
    store = LocalStore(tmp_path)
    c = DestinationController(store, DestinationConfig(queue_limit=10))
    _follow_all(c)
    calls: list[int] = []

    def compute(w: World) -> list[int]:
        calls.append(len(w.of("Service")))
        return [len(calls)]

    async def scenario() -> list[int]:
        gen = c._updates("test", frozenset({"Service"}), compute)
        got = [await anext(gen)]
        c.world.change(("ServiceProfile", {}))  # not relevant: no computation
        c.world.change(("Service", {}))
        got.append(await anext(gen))
        await gen.aclose()
        return got

    assert asyncio.run(scenario()) == [1, 2]
    assert calls == [1, 0]
    assert c.counters.streams["test"] == 0


def test_a_subscriber_that_falls_behind_is_reset(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    c = DestinationController(store, DestinationConfig(queue_limit=2))

    async def scenario() -> None:
        gen = c._updates("test", frozenset({"Service"}), lambda w: [w])
        await anext(gen)
        for _ in range(5):  # more changes than the queue holds, while the stream is not reading
            c.world.change(("Service", {}))
        with pytest.raises(Reset):
            await anext(gen)

    asyncio.run(scenario())
    assert c.counters.resets == 1
    assert "destination_stream_resets_total 1" in c.metrics_text()
