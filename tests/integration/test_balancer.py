"""The balancer against real loopback HTTP/1 servers, through a tiny HTTP/1 client written here.

Backends are asyncio servers started by the test; each answers with its name (after an optional
delay) and counts requests. The client opens one connection per request (``Connection: close``);
the proxy's pooled client plugs into the same ``make_endpoint`` seam.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tether.core.discovery.endpoints import Addr, Endpoint
from tether.proxy.balancer import Balancer
from tether.proxy.config import ProxyConfig, balancer_settings
from tether.proxy.discovery import StaticDiscovery, feed
from tether.proxy.errors import FailFastError, ProxyError, UpstreamError
from tether.proxy.http.body import BytesBody, read_all
from tether.proxy.http.message import Request, Response

pytestmark = pytest.mark.integration


class Backend:
    """A tiny HTTP/1.1 server on 127.0.0.1 that answers every request with its name."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay  # simulated service time
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.of(f"127.0.0.1:{self.port}")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            body = self.name.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class TinyClient:
    """A minimal HTTP/1.1 client Service: one connection per request, bounded in time and size."""

    def __init__(self, addr: Addr, timeout: float = 2.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.closed = False

    async def __call__(self, req: Request) -> Response:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(*self.addr)
            try:
                writer.write(
                    b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                    % (req.method, req.path, req.authority)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split()[1])
                headers = [
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(b":") for line in lines[1:] if line)
                ]
                body = await reader.read(64 * 1024)
            finally:
                writer.close()
        return Response(status, headers, BytesBody(body))

    async def aclose(self) -> None:
        self.closed = True


def make_balancer(**cfg: object) -> Balancer:
    config = ProxyConfig()
    for k, v in cfg.items():
        setattr(config, k, v)
    return Balancer(lambda ep: TinyClient(ep.addr), balancer_settings(config), name="web.test:80")


async def get(lb: Balancer) -> str:
    """One request through the balancer; the answering backend's name or the error's class name."""
    try:
        rsp = await lb(Request(b"GET", b"/", b"web.test:80"))
    except ProxyError as e:
        return type(e).__name__
    return (await read_all(rsp.body, 1024)).decode()


async def load(lb: Balancer, workers: int, until: Callable[[], bool], limit: int = 5000) -> Counter[str]:
    """``workers`` concurrent request loops until ``until()`` holds or ``limit`` requests were sent."""
    out: Counter[str] = Counter()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while not until() and sent < limit:
            sent += 1
            out[await get(lb)] += 1

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return out


def run(main: Callable[[], Awaitable[None]], timeout: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


def test_a_dead_endpoint_is_ejected_and_a_real_request_probes_it_back() -> None:
    async def main() -> None:
        a, b = Backend("a"), Backend("b")
        await a.start()
        await b.start()
        lb = make_balancer(failure_accrual_min_penalty=1.0, failure_accrual_max_penalty=2.0)
        lb.update(add=[a.endpoint, b.endpoint])
        try:
            warm = await load(lb, 1, lambda: False, limit=50)
            assert warm["a"] + warm["b"] == 50

            await a.stop()
            out: Counter[str] = Counter()
            for _ in range(1000):
                out[await get(lb)] += 1
                if lb.endpoints_pending:
                    break
            # A refused connection takes the endpoint out at once (reconnect backoff), before
            # failure accrual's 7 consecutive failures would.
            assert 1 <= out["UpstreamError"] + out["ConnectError"] <= 7, out
            assert (lb.endpoints_ready, lb.endpoints_pending) == (1, 1)

            # Traffic shifts: everything goes to b during the penalty (1 s..1.5 s).
            shifted = await load(lb, 1, lambda: False, limit=50)
            assert shifted == Counter({"b": 50})

            # a comes back on the same port; after its penalty a real request probes it in.
            await a.start()
            before = a.requests
            probing = await load(lb, 4, lambda: a.requests > before and lb.endpoints_ready == 2, limit=200_000)
            assert a.requests > before
            assert lb.endpoints_ready == 2
            assert probing["UpstreamError"] == 0
            after = await load(lb, 4, lambda: False, limit=400)
            # a takes traffic again (how much depends on both latency estimates: not asserted).
            assert after["a"] > 0
            assert after["a"] + after["b"] == 400
        finally:
            await lb.aclose()
            await b.stop()
            with contextlib.suppress(AssertionError):
                await a.stop()

    run(main)


def test_a_slow_endpoint_gets_less_traffic_than_a_fast_one() -> None:
    async def main() -> None:
        slow, fast = Backend("slow", delay=0.050), Backend("fast")
        await slow.start()
        await fast.start()
        lb = make_balancer()
        lb.update(add=[slow.endpoint, fast.endpoint])
        try:
            out = await load(lb, 4, lambda: False, limit=400)
            assert out["slow"] + out["fast"] == 400
            # Peak-EWMA: one 50 ms response makes "slow" cost more than the 30 ms default at once.
            assert out["slow"] * 5 < out["fast"], out
        finally:
            await lb.aclose()
            await slow.stop()
            await fast.stop()

    run(main)


def test_no_endpoint_fails_fast_after_the_timeout() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lb = make_balancer(failfast_timeout=0.3)
        t0 = loop.time()
        with pytest.raises(FailFastError) as exc:
            await lb(Request(b"GET", b"/", b"web.test:80"))
        waited = loop.time() - t0
        assert exc.value.status == 503
        assert "service in fail-fast" in exc.value.reason
        assert 0.29 <= waited < 2.0

        # All endpoints ejected is "no endpoint available" too.
        dead = Backend("dead")
        await dead.start()
        await dead.stop()  # the port is now closed: connections are refused
        lb2 = make_balancer(
            failfast_timeout=0.3, failure_accrual_min_penalty=30.0, failure_accrual_max_penalty=30.0
        )
        lb2.update(add=[dead.endpoint])
        for _ in range(7):
            with pytest.raises(UpstreamError):
                await lb2(Request(b"GET", b"/", b"web.test:80"))
        t0 = loop.time()
        with pytest.raises(FailFastError, match="all 1 endpoints unavailable"):
            await lb2(Request(b"GET", b"/", b"web.test:80"))
        assert loop.time() - t0 >= 0.29
        await lb.aclose()
        await lb2.aclose()

    run(main)


def test_static_discovery_feeds_the_balancer(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = Backend("a"), Backend("b")
        await a.start()
        await b.start()
        f = tmp_path / "destinations.yaml"
        f.write_text(f'destinations: {{"web.test:80": ["127.0.0.1:{a.port}"]}}\n')
        discovery = StaticDiscovery(str(f))
        watch = discovery.watch(b"web.test")
        assert watch is not None
        assert discovery.watch("other.test:80") is None
        lb = make_balancer(failfast_timeout=5.0)
        try:
            async with asyncio.TaskGroup() as tg:
                feeder = tg.create_task(feed(watch.endpoints.subscribe(), lb))
                assert await get(lb) == "a"  # waits for the snapshot, well within fail-fast
                tmp = tmp_path / "destinations.yaml.new"
                tmp.write_text(f'destinations: {{"web.test:80": ["127.0.0.1:{b.port}"]}}\n')
                tmp.replace(f)
                assert discovery.check()
                await load(lb, 1, lambda: len(lb.endpoints) == 1 and b.endpoint.addr in lb.endpoints)
                assert await get(lb) == "b"
                feeder.cancel()
        finally:
            await lb.aclose()
            await a.stop()
            await b.stop()

    run(main)
