"""Retry: send a failed request again, within the route's limit and budget.

A request is retried when its response has a status (or, trailers-only, a gRPC status) the
route's :class:`~tether.core.routing.retry_policy.RetryPolicy` retries, when its endpoint could not
be reached or failed mid-way, or when a try outlived the per-try timeout. It is retried only if
its whole body went out in the first try and was at most 64 KiB (the layer keeps a copy while it
streams; a larger body is never held); each retry takes a token from the route's budget when it
has one. The counters follow Linkerd's ``outbound_http_route_retry_*`` families.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from tether.core.routing.retry_budget import RetryBudget
from tether.core.routing.retry_policy import RetryPolicy
from tether.proxy.errors import ResponseTimeoutError, UpstreamError
from tether.proxy.http.body import Body, BytesBody, Headers
from tether.proxy.http.message import Request, Response, Service


class RetryCounts(Protocol):
    """What the retry layer counts into (RetryStats, or a route's labelled counters)."""

    requests: int
    successes: int
    limit_exceeded: int
    overflow: int


class RetryStats:
    """outbound_http_route_retry_{requests,successes,limit_exceeded,overflow}_total of one route."""

    __slots__ = ("limit_exceeded", "overflow", "requests", "successes")

    def __init__(self) -> None:
        self.requests = 0  # retries sent
        self.successes = 0  # retries that succeeded
        self.limit_exceeded = 0  # failures that could have been retried but the limit was reached
        self.overflow = 0  # retries the budget (or the body's size) did not allow


class _Recording(Body):
    """The request body as the first try reads it, kept (up to ``cap`` bytes) for a replay."""

    def __init__(self, inner: Body, cap: int) -> None:
        self._inner = inner
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._cap = cap
        self.complete = False
        self.length = inner.length

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    async def read(self) -> bytes:
        chunk = await self._inner.read()
        if not chunk:
            self.complete = True
        elif self._chunks is not None:
            self._size += len(chunk)
            if self._size > self._cap:
                self._chunks = None  # too large to hold: this request won't be retried
            else:
                self._chunks.append(chunk)
        return chunk

    def is_end_known(self) -> bool:
        return self._inner.is_end_known()

    def discard(self) -> None:
        self._inner.discard()

    def replayable(self) -> bool:
        return self.complete and self._chunks is not None

    def replay(self) -> BytesBody:
        assert self._chunks is not None
        return BytesBody(b"".join(self._chunks), self._inner.trailers)


def _grpc_status(rsp: Response) -> int | None:
    v = rsp.header(b"grpc-status")
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return 2


class Retry:
    """Layer: retries per the route's policy (built only for routes that retry)."""

    __slots__ = ("budget", "clock", "inner", "policy", "stats")

    def __init__(self, inner: Service, policy: RetryPolicy, budget: RetryBudget | None, stats: RetryCounts,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.policy = policy
        self.budget = budget
        self.stats = stats
        self.clock = clock

    def _retryable(self, rsp: Response) -> bool:
        code = _grpc_status(rsp)
        if code is not None:
            return self.policy.retries_grpc(code)
        return self.policy.retries_status(rsp.status)

    async def _try(self, req: Request) -> Response:
        timeout = self.policy.per_try_timeout
        if timeout is None:
            return await self.inner(req)
        try:
            async with asyncio.timeout(timeout):
                return await self.inner(req)
        except TimeoutError:
            raise ResponseTimeoutError(f"response timeout after {timeout:g}s (per try)") from None

    async def __call__(self, req: Request) -> Response:
        policy = self.policy
        body = req.body
        if body.length is not None and body.length > policy.max_body:
            return await self._try(req)  # never held, never retried
        budget = self.budget
        if budget is not None:
            budget.deposit(self.clock())
        recording = _Recording(body, policy.max_body)
        if body.is_end_known() and body.length is not None:
            # Already whole in memory (empty, buffered): hold it now, whether or not a try reads it.
            while await recording.read():
                pass
            req.body = recording.replay()
        else:
            req.body = recording
        retries = 0
        while True:
            error: UpstreamError | ResponseTimeoutError | None = None
            rsp: Response | None = None
            try:
                rsp = await self._try(req)
            except (UpstreamError, ResponseTimeoutError) as e:
                error = e
            if rsp is not None and not self._retryable(rsp):
                if retries:
                    self.stats.successes += 1
                return rsp
            # A failure this route retries: may it go again?
            if retries >= policy.limit:
                self.stats.limit_exceeded += 1
                break
            if not recording.replayable() or (budget is not None and not budget.try_withdraw(self.clock())):
                self.stats.overflow += 1
                break
            if rsp is not None:
                rsp.body.discard()
            retries += 1
            self.stats.requests += 1
            req.body = recording.replay()
        if rsp is not None:
            return rsp
        assert error is not None
        raise error
