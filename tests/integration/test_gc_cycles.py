"""A closed connection leaves no reference cycle behind, whatever kind of connection it was.

An object in a reference cycle is freed only by the cyclic garbage collector, and a connection
that lived long enough is freed only by a full collection, which examines every object alive:
10,000 open connections made each such collection hold the event loop for ~150 ms. So every kind
of connection must be freed by reference counting the moment it closes; the proxy then freezes
what survives full collections (tether.proxy.gcpolicy), which is only safe because of this.

The proxy runs in this process (its objects are the only ones here besides the test's), on
uvloop as in production; clients and upstreams are other processes (tests/integration/gc_peers.py)
on loopback. After a warm-up, the collector keeps every object it finds unreachable
(``gc.DEBUG_SAVEALL``) while COUNT connections of one kind open, do their work and close.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from tether.proxy.app import Proxy
from tether.proxy.config import ProxyConfig
from tether.testing.procs import free_port

pytestmark = pytest.mark.integration

PEERS = str(Path(__file__).with_name("gc_peers.py"))
COUNT = 100
WARM_UP = 10


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, int]]:
    proc = subprocess.Popen([sys.executable, PEERS, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdin is not None
    ports = json.loads(proc.stdout.readline())
    with socket.socket() as refusing:  # a port nobody listens on: bound, never listening
        refusing.bind(("127.0.0.1", 0))
        ports["refusing"] = refusing.getsockname()[1]
        yield ports
    proc.stdin.close()
    proc.wait(10)


def _drive(kind: str, port: int, authority: str, count: int) -> None:
    subprocess.run([sys.executable, PEERS, "drive", kind, str(port), authority, str(count)], check=True,
                   timeout=120)


def _cycles(garbage: list[object]) -> list[str]:
    """The strongly connected components among ``garbage`` (its reference cycles), by the types in
    each, most frequent first: what a failure shows."""
    ids = {id(o): o for o in garbage}
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    shapes: collections.Counter[tuple[str, ...]] = collections.Counter()

    def inside(o: object) -> list[int]:
        return [id(r) for r in gc.get_referents(o) if id(r) in ids]

    for root in ids:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(inside(ids[root])))]
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(inside(ids[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in inside(ids[v]):
                        shapes[tuple(sorted(type(ids[i]).__qualname__ for i in component))] += 1
    return [f"{n} x {' '.join(shape)}" for shape, n in shapes.most_common(5)]


def _garbage_left_by(kind: str, peer: str, via: str, peers: dict[str, int], **settings: object) -> list[object]:
    """Everything the collector found unreachable while COUNT connections of ``kind`` came and went
    through a proxy in this process (``via``: its inbound or outbound listener)."""
    ports = {"inbound": free_port(), "outbound": free_port()}
    cfg = ProxyConfig(admin_addr=("127.0.0.1", 0), outbound_addr=("127.0.0.1", ports["outbound"]),
                      inbound_addr=("127.0.0.1", ports["inbound"]),
                      inbound_app_addr=("127.0.0.1", peers[peer]), shutdown_grace_period=1.0,
                      log_level="error")
    for name, value in settings.items():
        setattr(cfg, name, value)
    garbage: list[object] = []

    async def main() -> None:
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            port = ports[via]
            authority = f"127.0.0.1:{peers[peer]}"
            await asyncio.to_thread(_drive, kind, port, authority, WARM_UP)
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await asyncio.to_thread(_drive, kind, port, authority, COUNT)
                # The proxy sees each close a moment after the client: wait for the last ones.
                sides = (proxy.inbound.connections, proxy.outbound.connections)
                for _ in range(500):
                    if not any(side.h1.conns or side.h2 or side.tcp for side in sides):
                        break
                    await asyncio.sleep(0.01)
                gc.collect()
                garbage.extend(gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        finally:
            await proxy.shutdown()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return garbage


KINDS = {
    # kind: (client kind, upstream, listener, proxy settings)
    "HTTP/1 keep-alive, closed by the client": ("h1", "h1", "inbound", {}),
    "HTTP/1, closed by the proxy's idle timeout": ("h1-until-closed", "h1", "inbound", {"idle_timeout": 0.2}),
    "HTTP/1 answered 400 (malformed request line)": ("h1-bad", "h1", "inbound", {}),
    "HTTP/1 upstream connection closed by the upstream": ("h1", "h1close", "outbound", {}),
    "HTTP/1 to an upstream refusing connections (502)": ("h1-refused", "refusing", "outbound",
                                                          {"failure_accrual_max_failures": 1_000_000}),
    "HTTP/1 Upgrade, then bytes both ways": ("upgrade", "upgrade", "outbound", {}),
    "HTTP/2 with prior knowledge": ("h2", "h2", "inbound", {}),
    "HTTP/2 to an upstream that fails (502)": ("h2-failing", "h1", "inbound", {}),
    "opaque TCP, zero-copy splice": ("tcp", "tcp", "inbound", {"detect_timeout": 0.2}),
    "opaque TCP through Python": ("tcp", "tcp", "inbound", {"detect_timeout": 0.2, "tcp_zero_copy": False}),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_a_closed_connection_leaves_no_cyclic_garbage(name: str, peers: dict[str, int]) -> None:
    kind, peer, via, settings = KINDS[name]
    garbage = _garbage_left_by(kind, peer, via, peers, **settings)
    # A connection left to the collector is a cycle of 8 to 30 objects: COUNT connections would
    # leave hundreds. A few objects of the proxy's own background work are allowed.
    left = len(garbage)
    assert left < COUNT // 4, f"{left} unreachable objects after {COUNT} connections: {_cycles(garbage)}"
