"""Fakes for the layer tests: a clock, a scripted inner service, and a bounded wait.

Layers are tested against these instead of sockets (the seam between pure cores and real
processes): time is a parameter, the inner service does what the test scripts, and a wait yields
to the event loop until a condition holds or fails loudly instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tether.proxy.http.message import Request, Response


class FakeClock:
    """A clock that moves only when the test moves it (``clock.t += 0.5``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class FakeService:
    """A scripted inner service: ``delay`` advances the fake clock; ``error`` raises; ``gate``
    holds calls until set; ``response`` builds the answer (default: ``status``)."""

    def __init__(self, clock: FakeClock | None = None, name: str = "") -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.name = name
        self.calls = 0
        self.requests: list[Request] = []
        self.delay = 0.001
        self.status = 200
        self.error: BaseException | None = None
        self.errors: list[BaseException] = []  # raised in order, one per call, before ``error``
        self.gate: asyncio.Event | None = None
        self.closed = False
        self.response: Callable[[], Response] | None = None

    async def __call__(self, req: Request) -> Response:
        self.calls += 1
        self.requests.append(req)
        if self.gate is not None:
            await self.gate.wait()
        self.clock.t += self.delay
        if self.errors:
            raise self.errors.pop(0)
        if self.error is not None:
            raise self.error
        if self.response is not None:
            return self.response()
        return Response(self.status)

    async def aclose(self) -> None:
        self.closed = True


async def until(cond: Callable[[], bool], what: str = "condition", steps: int = 100_000) -> None:
    """Yield to the loop until ``cond()`` holds; fail (never hang) after ``steps`` turns."""
    for _ in range(steps):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
