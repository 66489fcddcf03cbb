"""Matching a request to a route: HTTPRoute/GRPCRoute rules and ServiceProfile conditions.

Two models, as the control plane streams them (linkerd2-proxy-api):

- HTTPRoute rules (Gateway API): a rule matches when any of its :class:`RouteMatch` matches; each
  match ANDs a path match (exact, prefix on ``/`` segment boundaries, or a full-match regex),
  header matches, query parameter matches and a method. When several rules match, the most
  specific wins, in Gateway API order: an exact path, then a regex (longer pattern first), then a
  longer prefix; then more header matches; then more query matches; then a method match; then the
  earlier rule. Hostnames narrow a route to the authorities it serves (``*.example.com`` matches
  one or more labels in front of ``example.com``).
- ServiceProfile routes: each has a :class:`Condition` tree (``all``, ``any``, ``not``,
  ``method``, ``pathRegex`` matched against the whole path); the first route in order that
  matches wins.

Pure: a request is described by :class:`RequestInfo`; nothing here reads a socket or a clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What route matching reads of a request."""

    method: bytes
    path: bytes  # origin-form target: path and query
    authority: str  # host[:port], lower case
    headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = ()
    # The path without its query, decoded once (every route's regex reads it).
    path_only: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path_only", self.path.split(b"?", 1)[0].decode("latin-1"))

    @property
    def query(self) -> list[tuple[str, str]]:
        # Imported here: only a route matching on query parameters asks, and urllib.parse is
        # ~0.1 MiB of an idle proxy's memory otherwise (issue 16).
        from urllib.parse import parse_qsl

        _, _, q = self.path.partition(b"?")
        return parse_qsl(q.decode("latin-1"), keep_blank_values=True)

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


def _full_regex(pattern: str) -> re.Pattern[str]:
    """Compile a regex that must match the whole value (RE2-style semantics of Linkerd)."""
    return re.compile(pattern)


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str  # "exact" | "prefix" | "regex"
    value: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("exact", "prefix", "regex"):
            raise ValueError(f"path match kind {self.kind!r} is not exact, prefix or regex")
        if self.kind == "regex":
            object.__setattr__(self, "_regex", _full_regex(self.value))
        elif not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with /")

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.value
        if self.kind == "prefix":
            prefix = self.value.rstrip("/")
            # On segment boundaries: /foo matches /foo and /foo/bar, not /foobar.
            return prefix == "" or path == prefix or path.startswith(prefix + "/")
        assert self._regex is not None
        return self._regex.fullmatch(path) is not None

    def rank(self) -> tuple[int, int]:
        """Higher is more specific: exact > regex > prefix, longer first within a kind."""
        order = {"exact": 2, "regex": 1, "prefix": 0}[self.kind]
        return order, len(self.value)


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query parameter match: ``name`` equal to ``value``, or fully matching a regex."""

    name: str
    value: str
    regex: bool = False
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.regex:
            object.__setattr__(self, "_regex", _full_regex(self.value))

    def matches_value(self, value: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(value) is not None
        return value == self.value


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One HTTPRoute match: every part that is set must match."""

    path: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: bytes | None = None

    def matches(self, req: RequestInfo) -> bool:
        if self.method is not None and req.method != self.method:
            return False
        if self.path is not None and not self.path.matches(req.path_only):
            return False
        for h in self.headers:
            # Header names are case-insensitive; a header that repeats matches when any value does.
            values = req.header_values(h.name.lower().encode("latin-1"))
            if not any(h.matches_value(v.decode("latin-1")) for v in values):
                return False
        if self.query:
            params = req.query
            for q in self.query:
                # Gateway API: the first value of a repeated parameter is the one matched.
                first = next((v for k, v in params if k == q.name), None)
                if first is None or not q.matches_value(first):
                    return False
        return True

    def rank(self) -> tuple[tuple[int, int], int, int, int]:
        path = self.path.rank() if self.path is not None else (-1, 0)
        return path, len(self.headers), len(self.query), int(self.method is not None)


def hostname_matches(pattern: str, host: str) -> bool:
    """``pattern`` an exact name or ``*.suffix``; ``host`` without its port, lower case."""
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def host_of(authority: str) -> str:
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return host.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Rule(Generic[T]):
    """A rule's matches (none: matches every request) and what it routes to."""

    matches: tuple[RouteMatch, ...]
    value: T


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """An HTTPRoute: the hostnames it serves (none: all) and its rules, in order."""

    hostnames: tuple[str, ...]
    rules: tuple[Rule[T], ...]


def select_rule(routes: Sequence[Route[T]], req: RequestInfo) -> tuple[T, RouteMatch | None] | None:
    """The most specific matching rule's value (and the match that chose it), or None."""
    host = host_of(req.authority)
    best: tuple[object, T, RouteMatch | None] | None = None
    for ri, route in enumerate(routes):
        if route.hostnames and not any(hostname_matches(p, host) for p in route.hostnames):
            continue
        for rj, rule in enumerate(route.rules):
            candidates: Sequence[RouteMatch | None] = rule.matches or (None,)
            for m in candidates:
                if m is not None and not m.matches(req):
                    continue
                # Earlier routes and rules win ties: negate their positions in the key.
                rank = m.rank() if m is not None else ((-1, 0), 0, 0, 0)
                key = (rank, -ri, -rj)
                if best is None or key > best[0]:  # type: ignore[operator]
                    best = (key, rule.value, m)
    return None if best is None else (best[1], best[2])


# -- ServiceProfile conditions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """A ServiceProfile route condition: exactly one of its fields is set."""

    method: bytes | None = None
    path_regex: str | None = None
    all: tuple[Condition, ...] | None = None
    any: tuple[Condition, ...] | None = None
    not_: Condition | None = None
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.path_regex is not None:
            object.__setattr__(self, "_regex", _full_regex(self.path_regex))

    def matches(self, req: RequestInfo) -> bool:
        """Every field that is set must hold (a condition with none set matches everything)."""
        if self.method is not None and req.method != self.method:
            return False
        if self._regex is not None and self._regex.fullmatch(req.path_only) is None:
            return False
        # Plain loops: this runs for every route of a profile on every request.
        if self.all is not None:
            for c in self.all:
                if not c.matches(req):
                    return False
        if self.any is not None:
            for c in self.any:
                if c.matches(req):
                    break
            else:
                return False
        return not (self.not_ is not None and self.not_.matches(req))


def first_matching(routes: Sequence[tuple[Condition, T]], req: RequestInfo) -> T | None:
    """The first ServiceProfile route (in order) whose condition matches."""
    for cond, value in routes:
        if cond.matches(req):
            return value
    return None
