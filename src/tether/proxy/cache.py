"""Per-target stacks kept while used and dropped once idle (linkerd2-proxy's ``push_cache``).

A proxy builds a stack per target (a destination's balancer and connection pools, an inbound
port's forwarder). :class:`IdleCache` keeps each one while it is used and drops it, closing it,
once nobody has asked for it for ``max_idle_age`` seconds, so a proxy that talks to many
destinations holds memory flat instead of growing with every target it ever saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from tether.proxy.http.message import Service

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

BULK_DROP = 64  # stacks dropped by one sweep that count as a burst gone idle


class CacheEntry(Generic[V]):
    """One cached stack; once the cache drops it, ``live`` turns False and the entry lets go of the
    stack (a caller that kept the entry must not keep the stack, its connections and series, alive)."""

    __slots__ = ("last_used", "live", "value")

    def __init__(self, value: V, now: float) -> None:
        self.value: V | None = value
        self.last_used = now
        self.live = True

    def release(self) -> V | None:
        value, self.value, self.live = self.value, None, False
        return value


class IdleCache(Generic[K, V]):
    """``get(key)`` builds with ``make(key)`` on first use; ``sweep`` drops entries idle too long."""

    def __init__(
        self,
        make: Callable[[K], V],
        max_idle_age: float,
        *,
        close: Callable[[V], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self._make = make
        self.max_idle_age = max_idle_age
        self._close = close
        self._clock = clock
        self.name = name
        self._entries: dict[K, CacheEntry[V]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.evicted_total = 0
        # Called a sweep interval after a sweep dropped at least BULK_DROP stacks: the proxy gives
        # the C heap's free pages back then (a burst of 10,000 destinations, once idle, otherwise
        # leaves ~70 MiB of freed connection buffers in glibc's heap).
        self.after_bulk_drop: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V:
        """The stack for ``key``, built on first use; marks it used now."""
        value = self.entry(key).value
        assert value is not None  # entries in the cache are live
        return value

    def entry(self, key: K) -> CacheEntry[V]:
        """The entry for ``key``, built on first use; marks it used now. A caller may keep it and
        :meth:`use` it again while it is ``live`` (no lookup by key: hashing a target costs more)."""
        e = self._entries.get(key)
        now = self._clock()
        if e is None:
            e = self._entries[key] = CacheEntry(self._make(key), now)
        else:
            e.last_used = now
        return e

    def use(self, e: CacheEntry[V]) -> V:
        """A kept entry's stack, marked used now (check ``e.live`` first)."""
        e.last_used = self._clock()
        value = e.value
        assert value is not None, "a kept cache entry used after the cache dropped it"
        return value

    def values(self) -> list[V]:
        """The cached stacks (a copy: scrapes read it while requests add to it)."""
        return [e.value for e in self._entries.values() if e.value is not None]

    def peek(self, key: K) -> V | None:
        """The cached stack for ``key`` without building or touching it."""
        e = self._entries.get(key)
        return e.value if e is not None else None

    def sweep(self, now: float | None = None) -> list[V]:
        """Drop (and close, in the background) the entries idle for ``max_idle_age``; return them."""
        now = self._clock() if now is None else now
        old = [k for k, e in self._entries.items() if now - e.last_used >= self.max_idle_age]
        dropped: list[V] = []
        for k in old:
            value = self._entries.pop(k).release()
            if value is not None:
                dropped.append(value)
        self.evicted_total += len(dropped)
        if dropped and self._close is not None:
            for value in dropped:
                self._spawn_close(value)
        if dropped:
            log.debug("%s cache: %d idle stacks dropped, %d kept", self.name, len(dropped), len(self._entries))
        return dropped

    def _spawn_close(self, value: V) -> None:
        assert self._close is not None
        task = asyncio.get_running_loop().create_task(self._run_close(value))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _run_close(self, value: V) -> None:
        assert self._close is not None
        try:
            await self._close(value)
        except Exception:
            log.warning("%s cache: closing an idle stack failed", self.name, exc_info=True)

    async def run(self) -> None:
        """Sweep periodically until cancelled (a quarter of the idle age, at most every 10 s)."""
        interval = min(max(self.max_idle_age / 4, 0.05), 10.0)
        trim_due = False
        while True:
            await asyncio.sleep(interval)
            if trim_due and self.after_bulk_drop is not None:
                # A tick after the bulk drop: the stacks' connections have closed and been freed.
                self.after_bulk_drop()
            trim_due = len(self.sweep()) >= BULK_DROP

    async def aclose(self) -> None:
        """Drop and close every entry."""
        values = [v for e in self._entries.values() if (v := e.release()) is not None]
        self._entries.clear()
        if self._close is not None:
            for value in values:
                await self._run_close(value)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class Stack:
    """A built stack: the service requests go to, and what closes it when it is dropped."""

    __slots__ = ("balancer", "closers", "service")

    def __init__(self, service: Service, closers: list[Callable[[], object]] | None = None,
                 balancer: object | None = None) -> None:
        self.service = service
        self.closers = closers if closers is not None else []
        self.balancer = balancer  # the destination's balancer, for its gauges at scrape time

    async def aclose(self) -> None:
        for close in self.closers:
            result = close()
            if isinstance(result, Awaitable):
                await result
