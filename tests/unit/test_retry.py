"""The retry layer and the retry settings, against a fake inner service and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from tether.core.routing.retry_budget import BudgetPolicy, RetryBudget
from tether.core.routing.retry_policy import (
    RetryPolicy,
    RetryPolicyError,
    parse_grpc_codes,
    parse_http_statuses,
    parse_limit,
)
from tether.proxy.errors import ConnectError, ResponseTimeoutError
from tether.proxy.http.body import BytesBody, PipeBody, read_all
from tether.proxy.http.message import Request, Response
from tether.proxy.layers.retry import Retry, RetryStats
from tether.testing.fakes import FakeClock, FakeService

FIVE_XX = RetryPolicy(limit=1, http_statuses=parse_http_statuses("5xx"))


def run(coro: Awaitable[Response]) -> Response:
    async def bounded() -> Response:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


class Scripted(FakeService):
    """Answers with the given statuses in order (the last one repeats), recording request bodies."""

    def __init__(self, *statuses: int) -> None:
        super().__init__()
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []

    async def __call__(self, req: Request) -> Response:
        self.bodies.append(await read_all(req.body, 1 << 20))
        await super().__call__(req)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return Response(status, body=BytesBody(b"x"))


def retry(inner: FakeService, policy: RetryPolicy = FIVE_XX,
          budget: RetryBudget | None = None) -> tuple[Retry, RetryStats]:
    stats = RetryStats()
    return Retry(inner, policy, budget, stats, clock=FakeClock()), stats


def test_a_5xx_is_retried_once_and_the_success_returned() -> None:
    inner = Scripted(503, 200)
    layer, stats = retry(inner)
    assert run(layer(Request(b"GET", b"/", b"web"))).status == 200
    assert inner.calls == 2 and (stats.requests, stats.successes, stats.limit_exceeded) == (1, 1, 0)


def test_the_limit_bounds_retries_and_the_last_failure_reaches_the_client() -> None:
    inner = Scripted(503)
    layer, stats = retry(inner, RetryPolicy(limit=2, http_statuses=((500, 599),)))
    assert run(layer(Request(b"GET", b"/", b"web"))).status == 503
    assert inner.calls == 3 and stats.limit_exceeded == 1


def test_statuses_not_listed_are_returned_at_once() -> None:
    inner = Scripted(404, 200)
    layer, stats = retry(inner)
    assert run(layer(Request(b"GET", b"/", b"web"))).status == 404
    assert inner.calls == 1 and stats.requests == 0


def test_a_body_is_sent_again_identically() -> None:
    inner = Scripted(502, 201)
    layer, _ = retry(inner)
    body = PipeBody(None)
    body.feed(b"order=")
    body.feed(b"42")
    body.finish()
    assert run(layer(Request(b"POST", b"/orders", b"web", body=body))).status == 201
    assert inner.bodies == [b"order=42", b"order=42"]


def test_bodies_over_64_kib_are_never_retried() -> None:
    inner = Scripted(503, 200)
    layer, _ = retry(inner)
    big = BytesBody(b"x" * (64 * 1024 + 1))
    assert run(layer(Request(b"POST", b"/", b"web", body=big))).status == 503
    inner = Scripted(503, 200)
    layer, stats = retry(inner)
    streamed = PipeBody(None)  # no declared length: found too large while streaming
    streamed.feed(b"y" * (70 * 1024))
    streamed.finish()
    assert run(layer(Request(b"POST", b"/", b"web", body=streamed))).status == 503
    assert inner.calls == 1 and stats.overflow == 1


def test_connection_errors_and_per_try_timeouts_are_retried() -> None:
    inner = Scripted(200)
    inner.errors = [ConnectError("refused")]
    layer, stats = retry(inner)
    assert run(layer(Request(b"GET", b"/", b"web"))).status == 200 and stats.successes == 1

    slow = FakeService()
    slow.gate = asyncio.Event()  # never answers
    layer, stats = retry(slow, RetryPolicy(limit=2, per_try_timeout=0.02))
    with pytest.raises(ResponseTimeoutError):
        run(layer(Request(b"GET", b"/", b"web")))
    assert slow.calls == 3 and stats.limit_exceeded == 1


def test_grpc_codes_in_a_trailers_only_response() -> None:
    def grpc(code: bytes) -> Response:
        return Response(200, [(b"content-type", b"application/grpc"), (b"grpc-status", code)])

    answers = [grpc(b"14"), grpc(b"0")]
    inner = FakeService()
    inner.response = lambda: answers.pop(0)
    layer, _ = retry(inner, RetryPolicy(limit=1, grpc_codes=parse_grpc_codes("unavailable")))
    assert run(layer(Request(b"POST", b"/a.B/C", b"grpc", version="2"))).header(b"grpc-status") == b"0"
    inner = FakeService()
    inner.response = lambda: grpc(b"5")  # NOT_FOUND: not in the policy
    layer, _ = retry(inner, RetryPolicy(limit=1, grpc_codes=parse_grpc_codes("unavailable")))
    run(layer(Request(b"POST", b"/a.B/C", b"grpc", version="2")))
    assert inner.calls == 1


def test_the_budget_caps_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, ttl=10), clock())
    inner = Scripted(503)
    stats = RetryStats()
    layer = Retry(inner, RetryPolicy(limit=3, http_statuses=((503, 503),)), budget, stats, clock=clock)
    for _ in range(100):
        run(layer(Request(b"GET", b"/", b"web")))
    # 100 requests allow 20 retries in the window, whatever each request's own limit.
    assert stats.requests == 20 and inner.calls == 120


def test_settings_parse_like_linkerds_annotations() -> None:
    assert parse_http_statuses("5xx, 429,500-504") == ((500, 599), (429, 429), (500, 504))
    assert parse_grpc_codes("cancelled,deadline-exceeded,UNAVAILABLE") == frozenset({1, 4, 14})
    assert parse_limit("3") == 3
    for bad, fn in (("5x", parse_http_statuses), ("700", parse_http_statuses), ("nope", parse_grpc_codes),
                    ("-1", parse_limit), ("many", parse_limit)):
        with pytest.raises(RetryPolicyError):
            fn(bad)  # type: ignore[operator]
