"""List-then-watch of one API resource, as client-go's reflector does it.

An :class:`Informer` lists the resource (in pages), hands the whole set to its handler, then watches
from the list's resourceVersion with bookmarks on, handing over each event. A watch the server ends
(``timeoutSeconds``) or that breaks is resumed from the last version seen (the last event's or
bookmark's); a ``410 Gone`` (the version fell out of the server's window, e.g. after a compaction or an
API server restart) means a fresh list, whose differences the handler turns into events. Errors back
off exponentially with jitter, up to a bound, and the back-off resets after a watch that worked. A
resource the server does not serve (a CRD not installed) is looked for again on the same back-off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tether.platform.kubernetes.client import ApiResource, KubeClient, KubeError

log = logging.getLogger("tether.kubernetes")


class Handler(Protocol):
    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        """The whole current set (after a list)."""
        ...

    def event(self, type_: str, obj: Mapping[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED object."""
        ...


@dataclass(frozen=True)
class InformerSettings:
    """Bounds of one informer (house rule 4: every wait and buffer named in one place)."""

    page_size: int = 500
    # The server ends each watch after about this long; the informer then resumes from its version.
    watch_timeout: int = 300
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # A watch that lasted this long counts as working: the back-off starts again from the bottom.
    healthy_after: float = 5.0


class Gone(Exception):
    """410: the version is too old; a fresh list is due."""


@dataclass
class InformerStats:
    lists: int = 0
    relists_gone: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    errors: int = 0
    last_error: str | None = None


@dataclass
class Backoff:
    initial: float
    maximum: float
    rng: Callable[[], float] = field(default=random.random)
    attempt: int = 0

    def next(self) -> float:
        base = min(self.maximum, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        # Full jitter over the upper half: replicas that failed together do not retry together.
        return base * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


class Informer:
    """Follow one API resource into a handler. ``run`` until ``stop``; ``synced`` after the first list."""

    def __init__(
        self,
        client: KubeClient,
        resource: ApiResource,
        handler: Handler,
        *,
        settings: InformerSettings | None = None,
        namespace: str | None = None,
        field_selector: str | None = None,
        label_selector: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.handler = handler
        self.settings = settings or InformerSettings()
        self.namespace = namespace
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.version: str | None = None
        self.synced = asyncio.Event()
        # None until known; False while the server does not serve the resource (CRD not installed).
        self.served: bool | None = None
        self.stats = InformerStats()
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        self._watch: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"Informer({self.resource})"

    def _params(self) -> dict[str, str]:
        p: dict[str, str] = {}
        if self.field_selector:
            p["fieldSelector"] = self.field_selector
        if self.label_selector:
            p["labelSelector"] = self.label_selector
        return p

    async def list_once(self) -> None:
        """List every page and hand the set over; sets the version to watch from."""
        items: list[Mapping[str, Any]] = []
        params = self._params()
        params["limit"] = str(self.settings.page_size)
        path = self.resource.path(self.namespace)
        while True:
            try:
                page = await self.client.get(path, **params)
            except KubeError as e:
                if e.status == 410 and "continue" in params:
                    # The continue token expired between pages: start the list again.
                    items, params = [], {**self._params(), "limit": str(self.settings.page_size)}
                    continue
                if e.status == 404:
                    self.served = False
                raise
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            if meta.get("continue"):
                params["continue"] = meta["continue"]
                continue
            self.version = str(meta.get("resourceVersion") or "") or None
            break
        self.served = True
        self.stats.lists += 1
        self.handler.replace(items)
        self.synced.set()

    async def _watch_once(self) -> None:
        params = self._params()
        params.update(
            watch="true",
            allowWatchBookmarks="true",
            timeoutSeconds=str(self.settings.watch_timeout),
        )
        if self.version:
            params["resourceVersion"] = self.version
        self.stats.watches += 1
        async for line in self.client.lines(self.resource.path(self.namespace), params):
            try:
                ev = json.loads(line)
                type_, obj = ev["type"], ev["object"]
            except (ValueError, KeyError, TypeError):
                raise KubeError(f"watch {self.resource}: undecodable event {line[:120]!r}") from None
            if type_ == "ERROR":
                code = obj.get("code") if isinstance(obj, Mapping) else None
                if code == 410:
                    raise Gone(str(obj.get("message", "")))
                raise KubeError(f"watch {self.resource}: {obj.get('message', obj)}", int(code or 0))
            rv = ((obj.get("metadata") or {}) if isinstance(obj, Mapping) else {}).get("resourceVersion")
            if type_ == "BOOKMARK":
                self.stats.bookmarks += 1
            elif type_ in ("ADDED", "MODIFIED", "DELETED"):
                self.stats.events += 1
                self.handler.event(type_, obj)
            if rv:
                self.version = str(rv)

    def disconnect(self, *, stale_version: str | None = None) -> None:
        """Drop the current watch as a broken connection would (it resumes from its version, or from
        ``stale_version`` when given: an old one makes the server answer 410 and forces a re-list)."""
        if stale_version is not None:
            self.version = stale_version
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        """List (unless already listed), then watch, until ``stop`` is set."""
        while not stop.is_set():
            began = self._clock()
            try:
                if self.version is None or not self.synced.is_set():
                    await self.list_once()
                watch = self._watch = asyncio.ensure_future(self._watch_once())
                stopping = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopping.cancel()
                    if not watch.done():
                        watch.cancel()
                        await asyncio.gather(watch, return_exceptions=True)
                if stop.is_set():
                    return
                if watch.cancelled():
                    log.info("watch %s dropped; resuming from version %s", self.resource, self.version)
                    continue
                watch.result()  # re-raises what ended the watch
                if self._clock() - began >= self.settings.healthy_after:
                    self._backoff.reset()
                continue
            except Gone as e:
                self.stats.relists_gone += 1
                log.info("watch %s: %s (410 Gone); listing again", self.resource, e or "version too old")
                self.version = None
                self.synced.clear()
                continue
            except KubeError as e:
                if e.status == 410:  # a watch's "too old resource version" may come as the status too
                    self.stats.relists_gone += 1
                    log.info("watch %s: 410 Gone; listing again", self.resource)
                    self.version = None
                    self.synced.clear()
                    continue
                self.stats.errors += 1
                self.stats.last_error = str(e)
                if self.served is False:
                    log.debug("%s not served yet: %s", self.resource, e)
                else:
                    log.warning("%s: %s; retrying", self.resource, e)
            delay = self._backoff.next()
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass
