"""A destination's ServiceProfile as the proxy applies it (pure).

Routes are tried in order; the first whose condition matches names the request's route (for
``route_*`` metrics as ``rt_route``), its timeout, whether it is retryable (within the profile's
retry budget), and its response classes (which statuses are failures). Requests no route matches
take the default route (``rt_route=""`` in Linkerd, ``[DEFAULT]`` in ``viz routes``).
``dst_overrides`` split the destination's traffic over other authorities by weight (a
TrafficSplit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from tether.core.routing.http_match import Condition, RequestInfo
from tether.core.routing.retry_budget import BudgetPolicy

_QUESTION_MARK: Final = 0x3F  # b"?"[0]


@dataclass(frozen=True, slots=True)
class StatusMatch:
    """A response condition: an inclusive status range, or all/any/not of others."""

    min: int = 0
    max: int = 0
    all: tuple[StatusMatch, ...] | None = None
    any: tuple[StatusMatch, ...] | None = None
    not_: StatusMatch | None = None

    def matches(self, status: int) -> bool:
        if self.all is not None:
            return all(m.matches(status) for m in self.all)
        if self.any is not None:
            return any(m.matches(status) for m in self.any)
        if self.not_ is not None:
            return not self.not_.matches(status)
        return self.min <= status <= (self.max or 599)


@dataclass(frozen=True, slots=True)
class ResponseClass:
    condition: StatusMatch
    is_failure: bool


@dataclass(frozen=True, slots=True)
class ProfileRoute:
    name: str
    condition: Condition
    response_classes: tuple[ResponseClass, ...] = ()
    retryable: bool = False
    timeout: float | None = None
    max_retries: int | None = None  # tether extension: the route's own retry limit
    retry_timeout: float | None = None  # tether extension: per-try timeout
    labels: tuple[tuple[str, str], ...] = ()

    def is_failure(self, status: int) -> bool:
        """The first response class that matches decides; else a 5xx is a failure."""
        for rc in self.response_classes:
            if rc.condition.matches(status):
                return rc.is_failure
        return status >= 500


DEFAULT_ROUTE = ProfileRoute("", Condition())


@dataclass(frozen=True, slots=True)
class WeightedDst:
    authority: str
    weight: int


def _simple(c: Condition) -> tuple[bytes | None, str] | None:
    """A condition that is a method and/or a path regex only: (method, pattern); else None."""
    if c.all is None and c.any is None and c.not_ is None:
        if c.path_regex is not None:
            return c.method, c.path_regex
        return (c.method, _ANY_PATH) if c.method is not None else None
    if c.all is not None and c.any is None and c.not_ is None and c.method is None and c.path_regex is None:
        method: bytes | None = None
        pattern: str | None = None
        for part in c.all:
            one = _simple(part)
            if one is None:
                return None
            m, p = one
            if m is not None:
                if method is not None and method != m:
                    return None
                method = m
            if p != _ANY_PATH:
                if pattern is not None:
                    return None
                pattern = p
        return method, pattern if pattern is not None else _ANY_PATH
    return None


_SEGMENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~")
_ANY_PATH = "(?s:.*)"


def literal_segment(pattern: str) -> str | None:
    """The first path segment every path matching ``pattern`` has (``/users/\\d+`` -> ``users``),
    or None when the pattern does not fix it (a metacharacter, a quantifier or an alternation)."""
    if not pattern.startswith("/") or "|" in pattern:
        return None
    out = []
    i = 1
    while i < len(pattern):
        c = pattern[i]
        if c == "/":
            break
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in ".-_~":
            out.append(pattern[i + 1])
            i += 2
        elif c in _SEGMENT_CHARS:
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out)


def literal_path(pattern: str) -> str | None:
    """The one path ``pattern`` matches when it has no metacharacter (``/api/v1\\.0/echo``), else None."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern) and pattern[i + 1] in ".-_~/":
            out.append(pattern[i + 1])
            i += 2
        elif c in _SEGMENT_CHARS or c == "/":
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out)


class RouteIndex:
    """A profile's simple routes (a method and/or a path regex each) grouped by the literal first
    path segment they require: per request, one dictionary lookup and one regex trying, in route
    order, only the routes that can match (the first alternative matching the whole path wins, as
    the first matching route does)."""

    __slots__ = ("by_segment", "literal", "methods", "names", "other")

    def __init__(self, simple: list[tuple[bytes | None, str]]) -> None:
        segments = [literal_segment(p) for _, p in simple]
        anywhere = [i for i, seg in enumerate(segments) if seg is None]
        self.methods = tuple(m for m, _ in simple)
        self.names = {f"_r{i}": i for i in range(len(simple))}
        # A segment whose routes are all literal paths: the path itself is the key (first route wins).
        self.literal: dict[str, dict[str, int]] = {}
        self.by_segment: dict[str, re.Pattern[str]] = {}
        for seg in {x for x in segments if x is not None}:
            members = sorted([i for i, x in enumerate(segments) if x == seg] + anywhere)
            paths = [literal_path(simple[i][1]) for i in members]
            if all(p is not None for p in paths):
                exact: dict[str, int] = {}
                for i, path in zip(members, paths, strict=True):
                    assert path is not None
                    exact.setdefault(path, i)
                self.literal[seg] = exact
            else:
                self.by_segment[seg] = self._alternatives(simple, members)
        self.other = self._alternatives(simple, anywhere) if anywhere else None

    @staticmethod
    def _alternatives(simple: list[tuple[bytes | None, str]], members: list[int]) -> re.Pattern[str]:
        return re.compile("|".join(f"(?P<_r{i}>{simple[i][1]})" for i in members))

    def first(self, path_only: str) -> int:
        """The first route whose path pattern matches (-1: none)."""
        pattern = self.other
        if path_only.startswith("/"):
            end = path_only.find("/", 1)
            seg = path_only[1:] if end < 0 else path_only[1:end]
            exact = self.literal.get(seg)
            if exact is not None:
                return exact.get(path_only, -1)
            pattern = self.by_segment.get(seg, pattern)
        if pattern is None:
            return -1
        m = pattern.fullmatch(path_only)
        if m is None or m.lastgroup is None:
            return -1
        return self.names[m.lastgroup]


def _route_index(routes: tuple[ProfileRoute, ...]) -> RouteIndex | None:
    """The index of a profile whose routes are all simple; None otherwise, or when the patterns
    do not combine (a backreference, an inline flag that only works alone)."""
    simple = []
    for r in routes:
        one = _simple(r.condition)
        if one is None:
            return None
        simple.append(one)
    try:
        return RouteIndex(simple)
    except re.error:
        return None


@dataclass(frozen=True, slots=True)
class Profile:
    routes: tuple[ProfileRoute, ...] = ()
    budget: BudgetPolicy | None = None
    dst_overrides: tuple[WeightedDst, ...] = ()
    opaque: bool = False
    fqn: str = ""
    _index: RouteIndex | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _route_index(self.routes) if len(self.routes) > 1 else None)

    def route_for(self, req: RequestInfo) -> ProfileRoute:
        for route in self.routes:
            if route.condition.matches(req):
                return route
        return DEFAULT_ROUTE

    def route_index(self, method: bytes, path: bytes, req: RequestInfo | None = None) -> int:
        """The index of the first route matching ``method`` and ``path`` (-1: the default route).
        One regex call when every route is a method and a path regex (the usual profile)."""
        index = self._index
        if index is None:
            info = req if req is not None else RequestInfo(method, path, "")
            for i, route in enumerate(self.routes):
                if route.condition.matches(info):
                    return i
            return -1
        # An int operand makes `in` a plain byte search; a bytes operand is first tried as an index
        # (a TypeError raised and cleared per request), and bytes.find is a method call.
        if _QUESTION_MARK in path:
            path = path[:path.index(b"?")]
        first = index.first(path.decode("latin-1"))
        if first < 0:
            return -1
        want = index.methods[first]
        if want is None or want == method:
            return first
        # The first route whose path matches wants another method: try the routes after it alone.
        info = req if req is not None else RequestInfo(method, path, "")
        for i in range(first + 1, len(self.routes)):
            if self.routes[i].condition.matches(info):
                return i
        return -1
