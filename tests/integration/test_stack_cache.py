"""A proxy that has seen many destinations holds memory flat once they are idle.

Every distinct fallback target (an address the application named that discovery does not know)
gets its own stack: a logical stack, an endpoint client, a pooled connection, metric series. They
must all go once idle past the eviction age, or a proxy in front of a client that talks to many
hosts grows without bound.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.backend import start_in_thread
from tether.testing.procs import ProxyProc, wait_for

pytestmark = pytest.mark.integration

TARGETS = 10_000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def gauge(proxy: ProxyProc, name: str, direction: str) -> float:
    for line in proxy.metrics().splitlines():
        if line.startswith(f'{name}{{direction="{direction}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def series(proxy: ProxyProc) -> int:
    return sum(1 for line in proxy.metrics().splitlines() if line.startswith("request_total{"))


def addresses(batch: int) -> Iterator[str]:
    # Distinct loopback addresses (all of 127/8 reaches a server bound to 0.0.0.0).
    for i in range(TARGETS):
        n = batch * TARGETS + i + 1
        yield f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255 or 1}"


def send_batch(proxy: ProxyProc, port: int, batch: int) -> None:
    """One keep-alive client connection, a request to each of TARGETS distinct destinations."""
    with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=10) as c:
        f = c.makefile("rb")
        for host in addresses(batch):
            c.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 200"), (host, status)
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)


def test_ten_thousand_idle_destinations_leave_memory_flat(tmp_path: Path) -> None:
    backend = start_in_thread("many", host="0.0.0.0")
    port = backend.server_address[1]
    proxy = ProxyProc(tmp_path, cache_max_idle_age="1s", metrics_retain_idle="1s",
                      pool_idle_timeout="1s").wait_ready()
    try:
        started_kib = rss_kib(proxy.pid)
        rss: list[int] = []
        fds: list[int] = []
        for batch in range(4):
            send_batch(proxy, port, batch)
            assert gauge(proxy, "tether_stack_cache_entries", "outbound") > 0
            # Idle past the eviction age: every stack, pooled connection and series goes.
            wait_for(lambda: gauge(proxy, "tether_stack_cache_entries", "outbound") == 0, timeout=20)
            wait_for(lambda: series(proxy) == 0, timeout=20)
            wait_for(lambda: open_fds(proxy.pid) < 40, timeout=20)
            # The connections' buffers freed with the idle stacks go back to the system (without it
            # the idle proxy stayed ~70 MiB above where it started).
            wait_for(lambda: rss_kib(proxy.pid) - started_kib < 40 * 1024, timeout=20,
                     what="RSS back within 40 MiB of the proxy's start")
            rss.append(rss_kib(proxy.pid))
            fds.append(open_fds(proxy.pid))
        # The first batch warms the allocator; after it, 10,000 more destinations cost ~nothing. A leak
        # grows with every batch; the allocator's fragmentation can lift one reading alone.
        growth_mib = (min(rss[2], rss[3]) - rss[1]) / 1024
        print(f"RSS after each batch of {TARGETS} destinations, once idle: {[r // 1024 for r in rss]} MiB")
        assert growth_mib < 4, f"RSS grew {growth_mib:.1f} MiB over {TARGETS} more destinations: {rss}"
        assert fds[3] <= fds[1] + 2
    finally:
        proxy.stop()
        backend.kill()


def test_balancer_gauges_are_rendered_per_destination(tmp_path: Path) -> None:
    backend = start_in_thread("web")
    port = backend.server_address[1]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    dead_port = dead.getsockname()[1]
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        f'destinations: {{"web.test:80": ["127.0.0.1:{port}", "127.0.0.1:{dead_port}"]}}\n')
    proxy = ProxyProc(tmp_path, destinations_file=str(destinations)).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound_port), timeout=10) as c:
            f = c.makefile("rb")
            for _ in range(20):
                c.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
                assert f.readline().startswith(b"HTTP/1.1 200")  # a refused endpoint is retried
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
        text = proxy.metrics()
        states = {}
        for line in text.splitlines():
            if line.startswith('outbound_http_balancer_endpoints{authority="web.test:80"'):
                states[line.split('endpoint_state="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        # The refused endpoint is unready while its reconnect backoff runs (or ready to be probed).
        assert states["ready"] + states["pending"] == 2 and states["ready"] >= 1, states
        assert 'tether_balancer_failfast_total{authority="web.test:80"} 0' in text
    finally:
        proxy.stop()
        backend.kill()
        dead.close()
