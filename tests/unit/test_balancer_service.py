"""Balancer with fake endpoint services and a fake clock: choice, ejection, probes, fail-fast."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from tether.core.discovery.endpoints import Endpoint
from tether.proxy.balancer import Balancer
from tether.proxy.config import ProxyConfig, balancer_settings
from tether.proxy.errors import (
    ConnectError,
    FailFastError,
    LoadShedError,
    ProxyError,
    StreamCapacityError,
    UpstreamError,
)
from tether.proxy.http.body import PipeBody, read_all
from tether.proxy.http.message import Request, Response
from tether.testing.fakes import FakeClock, FakeService, until

Clock = FakeClock


class FakeEndpoint(FakeService):
    """A scripted endpoint service (see FakeService), remembering its endpoint."""

    def __init__(self, ep: Endpoint, clock: FakeClock) -> None:
        super().__init__(clock, str(ep))
        self.ep = ep


class Harness:
    def __init__(self, n: int, **cfg: object) -> None:
        self.clock = Clock()
        self.config = ProxyConfig()
        for k, v in cfg.items():
            setattr(self.config, k, v)
        self.services: dict[str, FakeEndpoint] = {}
        self.built: list[FakeEndpoint] = []
        self.lb = Balancer(self.make, balancer_settings(self.config), name="web:80", clock=self.clock,
                           rng=random.Random(1))
        self.eps = [Endpoint.of(f"10.0.0.{i + 1}:80") for i in range(n)]
        self.lb.update(add=self.eps)

    def make(self, ep: Endpoint) -> FakeEndpoint:
        svc = FakeEndpoint(ep, self.clock)
        self.services[str(ep)] = svc
        self.built.append(svc)
        return svc

    def svc(self, i: int) -> FakeEndpoint:
        return self.services[f"10.0.0.{i + 1}:80"]

    async def send(self) -> Response:
        return await self.lb(Request(b"GET", b"/", b"web:80"))

    async def send_many(self, n: int) -> Counter[str]:
        """Send ``n`` requests one after another; count outcomes by status or error name."""
        out: Counter[str] = Counter()
        for _ in range(n):
            try:
                out[str((await self.send()).status)] += 1
            except ProxyError as e:
                out[type(e).__name__] += 1
        return out


def run(coro: Awaitable[None]) -> None:
    async def main() -> None:
        async with asyncio.timeout(20):
            await coro

    asyncio.run(main())




def test_the_faster_endpoint_gets_most_requests() -> None:
    async def main() -> None:
        h = Harness(2)
        h.svc(0).delay = 0.200  # peak above the 30 ms default: counts at once
        h.svc(1).delay = 0.002
        await h.send_many(200)
        assert h.svc(1).calls > 190
        assert h.svc(0).calls < 10

    run(main())


def test_requests_in_flight_raise_an_endpoints_cost() -> None:
    async def main() -> None:
        h = Harness(2)
        gate = asyncio.Event()
        h.svc(0).gate = gate
        h.svc(1).gate = gate
        tasks = [asyncio.create_task(h.send()) for _ in range(10)]
        await asyncio.sleep(0)
        # Equal latency estimates: pending requests alone spread the load evenly.
        assert abs(h.svc(0).calls - h.svc(1).calls) <= 1
        gate.set()
        await asyncio.gather(*tasks)

    run(main())


def test_consecutive_failures_eject_an_endpoint_and_traffic_shifts() -> None:
    async def main() -> None:
        h = Harness(2)
        h.svc(0).error = ConnectionRefusedError("refused")
        out = await h.send_many(100)
        assert out["UpstreamError"] == 7  # the linkerd default: 7 consecutive failures
        assert out["200"] == 93
        assert (h.lb.endpoints_ready, h.lb.endpoints_pending) == (1, 1)
        assert h.lb.ejections_total == 1
        before = h.svc(0).calls
        await h.send_many(20)
        assert h.svc(0).calls == before  # ejected: no traffic during the penalty

    run(main())


def test_an_endpoint_out_of_http2_streams_is_busy_not_failing() -> None:
    async def main() -> None:
        h = Harness(2)
        h.svc(0).error = StreamCapacityError("every connection at the stream limit")
        out = await h.send_many(60)
        assert out["StreamCapacityError"] > 7  # more than failure accrual would ever allow
        assert h.lb.ejections_total == 0
        assert (h.lb.endpoints_ready, h.lb.endpoints_pending) == (2, 0)

    run(main())


def test_5xx_responses_are_failures_and_4xx_are_not() -> None:
    async def main() -> None:
        h = Harness(2)
        h.svc(0).status = 404
        await h.send_many(50)
        assert h.lb.endpoints_ready == 2
        h.svc(0).status = 503
        out = await h.send_many(100)
        assert out["503"] == 7
        assert h.lb.endpoints_pending == 1

    run(main())


def test_proxy_errors_pass_through_and_other_errors_become_502() -> None:
    async def main() -> None:
        h = Harness(1)
        h.svc(0).error = OSError("reset")
        with pytest.raises(UpstreamError, match=r"endpoint 10.0.0.1:80: reset") as exc:
            await h.send()
        assert exc.value.status == 502
        h.svc(0).error = ConnectError("connection refused")
        with pytest.raises(ConnectError):
            await h.send()

    run(main())


def grpc_response(status: bytes) -> Callable[[], Response]:
    def make() -> Response:
        body = PipeBody(None)
        body.feed(b"\x00\x00\x00\x00\x00")
        body.finish([(b"grpc-status", status)])
        return Response(200, [(b"content-type", b"application/grpc")], body)

    return make


def test_grpc_failures_are_classified_from_the_trailers() -> None:
    async def main() -> None:
        h = Harness(1)
        h.svc(0).response = grpc_response(b"5")  # NOT_FOUND: the application's answer
        for _ in range(10):
            await read_all((await h.send()).body, 1024)
        assert h.lb.endpoints_ready == 1
        h.svc(0).response = grpc_response(b"14")  # UNAVAILABLE: a failure
        for _ in range(7):
            rsp = await h.send()
            assert await read_all(rsp.body, 1024) == b"\x00" * 5
            assert rsp.body.trailers == [(b"grpc-status", b"14")]
        assert h.lb.endpoints_pending == 1

    run(main())


def test_grpc_failures_are_classified_when_the_whole_answer_is_taken_at_once() -> None:
    # The HTTP/2 codec takes a response that is all here without reading it chunk by chunk.
    async def main() -> None:
        h = Harness(1)
        h.svc(0).response = grpc_response(b"14")  # UNAVAILABLE: a failure
        for _ in range(7):
            rsp = await h.send()
            assert rsp.body.take() == b"\x00" * 5
            assert rsp.body.take() == b""
            assert rsp.body.trailers == [(b"grpc-status", b"14")]
        assert h.lb.endpoints_pending == 1

    run(main())


async def eject(h: Harness, i: int) -> None:
    h.svc(i).error = ConnectionRefusedError("refused")
    for _ in range(1000):
        if h.lb.endpoints_pending:
            return
        await h.send_many(1)
    raise AssertionError("endpoint not ejected")


def test_after_the_penalty_exactly_one_request_probes_and_success_restores() -> None:
    async def main() -> None:
        h = Harness(1, failfast_timeout=5.0)
        await eject(h, 0)
        assert h.lb.endpoints_pending == 1
        h.svc(0).error = None
        h.clock.t += 1.5  # min penalty 1 s plus up to 50% jitter
        gate = asyncio.Event()
        h.svc(0).gate = gate
        probe = asyncio.create_task(h.send())
        second = asyncio.create_task(h.send())
        await until(lambda: h.lb.queue_length == 1)
        assert h.svc(0).calls == 8  # 7 failures + the probe; the second request waits
        assert h.lb.endpoints_pending == 1  # probing
        gate.set()
        assert (await probe).status == 200
        assert (await second).status == 200
        assert h.lb.endpoints_ready == 1
        assert h.svc(0).calls == 9

    run(main())


def test_a_failed_probe_doubles_the_penalty() -> None:
    async def main() -> None:
        h = Harness(2)
        await eject(h, 0)
        h.svc(1).delay = 0.5  # make the other endpoint costly so the probe is chosen
        h.clock.t += 1.5
        stats = {s["addr"]: s for s in h.lb.endpoint_stats()}
        assert stats["10.0.0.1:80"]["state"] == "probation"
        h.svc(0).calls = 0
        for _ in range(100):
            await h.send_many(1)
            if h.svc(0).calls:
                break
        assert h.svc(0).calls == 1  # the probe, which fails
        stats = {s["addr"]: s for s in h.lb.endpoint_stats()}
        assert stats["10.0.0.1:80"]["state"] == "penalty"
        # Second penalty: 2 s base plus up to 50% jitter.
        h.clock.t += 1.99
        assert h.lb.endpoints_pending == 1
        h.clock.t += 1.02
        assert h.lb.endpoints_ready == 2

    run(main())


def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    async def main() -> None:
        h = Harness(1)
        await eject(h, 0)
        h.svc(0).error = None
        h.clock.t += 1.5
        h.svc(0).gate = asyncio.Event()
        probe = asyncio.create_task(h.send())
        await until(lambda: h.svc(0).calls == 8)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert h.lb.endpoints_ready == 1
        h.svc(0).gate = None
        assert (await h.send()).status == 200

    run(main())


def test_no_endpoints_fails_fast_after_the_timeout_and_then_at_once() -> None:
    async def main() -> None:
        h = Harness(0, failfast_timeout=0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(FailFastError, match="web:80: service in fail-fast") as exc:
            await h.send()
        assert exc.value.status == 503
        assert loop.time() - t0 >= 0.045
        assert h.lb.in_failfast
        t1 = loop.time()
        with pytest.raises(FailFastError):
            await h.send()
        assert loop.time() - t1 < 0.04  # in fail-fast: no wait
        h.lb.update(add=[Endpoint.of("10.0.0.9:80")])
        assert (await h.send()).status == 200
        assert not h.lb.in_failfast
        assert h.lb.failfast_total == 2

    run(main())


def test_a_waiting_request_is_served_when_an_endpoint_appears() -> None:
    async def main() -> None:
        h = Harness(0, failfast_timeout=5.0)
        task = asyncio.create_task(h.send())
        await until(lambda: h.lb.queue_length == 1)
        h.lb.update(add=[Endpoint.of("10.0.0.1:80")])
        assert (await task).status == 200
        assert h.lb.queue_length == 0

    run(main())


def test_a_waiting_request_is_served_when_a_penalty_ends() -> None:
    async def main() -> None:
        # A real clock here: the penalty timer runs on the event loop.
        cfg = ProxyConfig(
            failfast_timeout=5.0, failure_accrual_min_penalty=0.05, failure_accrual_max_penalty=0.05
        )
        svc: list[FakeEndpoint] = []
        clock = Clock()

        def make(ep: Endpoint) -> FakeEndpoint:
            svc.append(FakeEndpoint(ep, clock))
            return svc[-1]

        lb = Balancer(make, cfg)
        lb.update(add=[Endpoint.of("10.0.0.1:80")])
        svc[0].error = ConnectionRefusedError()
        for _ in range(7):
            with pytest.raises(UpstreamError):
                await lb(Request(b"GET", b"/", b"x"))
        svc[0].error = None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await lb(Request(b"GET", b"/", b"x"))).status == 200
        assert 0.03 <= loop.time() - t0 < 2.0

    run(main())


def test_a_full_queue_sheds_load() -> None:
    async def main() -> None:
        h = Harness(0, failfast_timeout=5.0, balancer_queue_capacity=2)
        waiting = [asyncio.create_task(h.send()) for _ in range(2)]
        await until(lambda: h.lb.queue_length == 2)
        with pytest.raises(LoadShedError) as exc:
            await h.send()
        assert exc.value.status == 503
        h.lb.update(add=[Endpoint.of("10.0.0.1:80")])
        assert [r.status for r in await asyncio.gather(*waiting)] == [200, 200]

    run(main())


def test_removal_closes_the_client_after_requests_in_flight() -> None:
    async def main() -> None:
        h = Harness(2)
        gate = asyncio.Event()
        h.svc(0).gate = h.svc(1).gate = gate
        task = asyncio.create_task(h.send())
        await until(lambda: h.svc(0).calls + h.svc(1).calls == 1)
        busy, idle = (h.svc(0), h.svc(1)) if h.svc(0).calls else (h.svc(1), h.svc(0))
        h.lb.update(remove=[h.eps[0].addr, h.eps[1].addr])
        await until(lambda: idle.closed)
        assert not busy.closed
        gate.set()
        assert (await task).status == 200
        await until(lambda: busy.closed)
        assert len(h.lb.endpoints) == 0

    run(main())


def test_metadata_updates_keep_or_rebuild_the_client() -> None:
    async def main() -> None:
        h = Harness(1)
        first = h.svc(0)
        h.lb.update(add=[Endpoint.of("10.0.0.1:80", weight=5, labels={"pod": "a"})])
        assert h.built == [first]
        assert h.lb.endpoints.get(("10.0.0.1", 80)) == Endpoint.of(
            "10.0.0.1:80", weight=5, labels={"pod": "a"}
        )
        h.lb.replace([Endpoint.of("10.0.0.1:80", identity="web.ns.serviceaccount.identity.l5d")])
        assert len(h.built) == 2
        await asyncio.sleep(0)
        assert first.closed
        await h.lb(Request(b"GET", b"/", b"web:80"))
        assert h.built[1].calls == 1 and first.calls == 0  # the rebuilt client served it
        await h.lb.aclose()
        assert h.built[1].closed

    run(main())


def test_weight_divides_the_cost() -> None:
    async def main() -> None:
        h = Harness(0)
        h.lb.update(add=[Endpoint.of("10.0.0.1:80", weight=1), Endpoint.of("10.0.0.2:80", weight=4)])
        h.svc(0).delay = h.svc(1).delay = 0.050
        await h.send_many(100)
        assert h.svc(1).calls > 3 * h.svc(0).calls

    run(main())
