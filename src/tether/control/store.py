"""The store the control plane reads the world from: list and watch resources per kind.

Adapters implement :class:`Store` (``tether.platform.local.store.LocalStore`` over a directory of
YAML files and the local workload registry; a Kubernetes adapter later). The control plane only sees
this interface, so the destination and policy services are the same code on every platform.

A watch is a :class:`tether.runtime.watch.Subscription`: first a snapshot of the kind (a mapping of
(namespace, name) to resource), then one :class:`ResourceEvent` per change with the version it made,
in order; a subscriber that falls behind gets a fresh snapshot with ``reset=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tether.core.resources import Resource
from tether.core.resources.events import KindState, ResourceEvent, SourceError
from tether.runtime.watch import Subscription, Watched

__all__ = ["KindState", "KindStates", "ResourceEvent", "SourceError", "Store"]


class Store(Protocol):
    """What the control plane needs from a platform."""

    def list(self, kind: str, namespace: str | None = None) -> Sequence[Resource]:
        """Every object of ``kind`` (a kind name such as "ServiceProfile"), optionally in one namespace."""
        ...

    def get(self, kind: str, namespace: str, name: str) -> Resource | None: ...

    def watch(self, kind: str) -> Subscription[KindState, ResourceEvent]:
        """Snapshot, then ordered changes, of one kind."""
        ...

    def version(self, kind: str) -> int:
        """The kind's current resource version (bumped by every change)."""
        ...

    def source_errors(self) -> Sequence[SourceError]:
        """Sources currently refused (with the errors to show a user)."""
        ...


class KindStates:
    """The read side of :class:`Store` that every platform shares: one watched state per kind in
    ``self._kinds``, which the platform's adapter fills and publishes to."""

    _kinds: dict[str, Watched[KindState, ResourceEvent]]

    def _watched(self, kind: str) -> Watched[KindState, ResourceEvent]:
        try:
            return self._kinds[kind]
        except KeyError:
            raise ValueError(f"unknown kind {kind!r}") from None

    def list(self, kind: str, namespace: str | None = None) -> Sequence[Resource]:
        state = self._watched(kind).state
        return [r for k, r in sorted(state.items()) if namespace is None or k[0] == namespace]

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self._watched(kind).state.get((namespace, name))

    def watch(self, kind: str) -> Subscription[KindState, ResourceEvent]:
        return self._watched(kind).subscribe()

    def version(self, kind: str) -> int:
        return self._watched(kind).version
