"""A kind's resources as a watched state: the state (by namespace/name) and the events that change it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tether.core.resources.base import Resource

EventType = Literal["ADDED", "MODIFIED", "DELETED"]
Key = tuple[str, str]
KindState = Mapping[Key, Resource]
"""All objects of one kind by (namespace, name); treated as immutable."""


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    """One object added, modified or deleted (``resource`` is the last state for a delete)."""

    type: EventType
    resource: Resource

    @property
    def key(self) -> Key:
        return self.resource.key


def apply_event(state: KindState, event: ResourceEvent) -> KindState:
    """The state after ``event`` (a new mapping; the old one is left as it was)."""
    new = dict(state)
    if event.type == "DELETED":
        new.pop(event.key, None)
    else:
        new[event.key] = event.resource
    return new


def diff(old: KindState, new: KindState) -> list[ResourceEvent]:
    """The events that turn ``old`` into ``new``, in key order."""
    events: list[ResourceEvent] = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if after is None and before is not None:
            events.append(ResourceEvent("DELETED", before))
        elif before is None and after is not None:
            events.append(ResourceEvent("ADDED", after))
        elif before is not None and after is not None and before is not after and before != after:
            events.append(ResourceEvent("MODIFIED", after))
    return events


@dataclass(frozen=True, slots=True)
class SourceError:
    """A source (a file, a registry entry) a store could not use; its last good resources stay."""

    source: str
    errors: tuple[str, ...]
