"""A watched state: every subscriber gets a snapshot, then the ordered changes after it.

:class:`Watched` holds a state of type ``S`` that changes by changes of type ``D`` (an endpoint
set and its diffs; a store's resources of one kind and their add/update/delete events). Each
:class:`Subscription` first yields a :class:`Snapshot` of the state, then one :class:`Change`
per change, in order, each carrying the version it produced. A subscriber's queue is bounded: one
that falls more than ``queue_limit`` changes behind is reset: its queue is dropped and the next
item is a fresh snapshot with ``reset=True`` (a gRPC stream answers that by ending, so the peer
reconnects for a new snapshot; an in-process consumer just rebuilds from it).

The state is handed out as is: treat it as immutable (``apply`` returns a new state).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S")
D = TypeVar("D")


@dataclass(frozen=True, slots=True)
class Snapshot(Generic[S]):
    """The whole state at ``version``; ``reset`` when sent because the subscriber fell behind."""

    state: S
    version: int
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Change(Generic[D]):
    """One change, which made the state ``version``."""

    change: D
    version: int


class WatchClosed(Exception):
    """The watched state was closed: no more updates will come."""


class Subscription(Generic[S, D]):
    """One subscriber's view: iterate it (``async for update in sub``) or ``await sub.next()``."""

    def __init__(self, owner: Watched[S, D]) -> None:
        self._owner = owner
        self._queue: deque[Change[D]] = deque()
        self._snapshot: Snapshot[S] | None = Snapshot(owner.state, owner.version)
        self._wake: asyncio.Future[None] | None = None
        self.closed = False
        self.resets = 0

    def _push(self, change: Change[D], limit: int) -> None:
        if self._snapshot is not None:
            # A snapshot not yet taken already holds this change: send the newer state instead.
            self._snapshot = Snapshot(self._owner.state, change.version, self._snapshot.reset)
        elif len(self._queue) >= limit:
            self._queue.clear()
            self.resets += 1
            self._snapshot = Snapshot(self._owner.state, change.version, reset=True)
        else:
            self._queue.append(change)
        self._wakeup()

    def _replace(self) -> None:
        self._queue.clear()
        self._snapshot = Snapshot(self._owner.state, self._owner.version)
        self._wakeup()

    def _wakeup(self) -> None:
        fut = self._wake
        if fut is not None and not fut.done():
            fut.set_result(None)

    def pending(self) -> int:
        """Updates ready to be taken without waiting."""
        return len(self._queue) + (self._snapshot is not None)

    def poll(self) -> Snapshot[S] | Change[D] | None:
        """The next update if one is ready, else None (raises WatchClosed once closed and drained)."""
        snap = self._snapshot
        if snap is not None:
            self._snapshot = None
            return snap
        if self._queue:
            return self._queue.popleft()
        if self.closed:
            raise WatchClosed
        return None

    async def next(self) -> Snapshot[S] | Change[D]:
        """Wait for the next update."""
        while True:
            update = self.poll()
            if update is not None:
                return update
            fut = self._wake = asyncio.get_running_loop().create_future()
            try:
                await fut
            finally:
                self._wake = None

    def __aiter__(self) -> AsyncIterator[Snapshot[S] | Change[D]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Snapshot[S] | Change[D]]:
        try:
            while True:
                yield await self.next()
        except WatchClosed:
            return

    def close(self) -> None:
        """Stop receiving updates (idempotent)."""
        if not self.closed:
            self.closed = True
            self._owner._subs.discard(self)
            self._wakeup()

    async def __aenter__(self) -> Subscription[S, D]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Watched(Generic[S, D]):
    """A state with subscribers; ``change`` and ``replace`` are called on the event loop's thread."""

    def __init__(self, state: S, apply: Callable[[S, D], S], *, queue_limit: int = 1000) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        self._state = state
        self._apply = apply
        self.queue_limit = queue_limit
        self.version = 0
        self._subs: set[Subscription[S, D]] = set()
        self.closed = False

    @property
    def state(self) -> S:
        return self._state

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription[S, D]:
        """A new subscription; its first update is a snapshot of the current state."""
        sub: Subscription[S, D] = Subscription(self)
        if self.closed:
            sub.closed = True
        else:
            self._subs.add(sub)
        return sub

    def change(self, change: D) -> None:
        """Apply ``change`` and send it to every subscriber."""
        if self.closed:
            raise WatchClosed
        self._state = self._apply(self._state, change)
        self.version += 1
        item = Change(change, self.version)
        for sub in list(self._subs):
            sub._push(item, self.queue_limit)

    def replace(self, state: S) -> None:
        """Set a whole new state: every subscriber's next update is a snapshot of it."""
        if self.closed:
            raise WatchClosed
        self._state = state
        self.version += 1
        for sub in list(self._subs):
            sub._replace()

    def close(self) -> None:
        """End every subscription (their iteration stops once drained)."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()
