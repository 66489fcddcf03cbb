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

from tether.core.routing.http_match import Condition, RequestInfo
from tether.core.routing.retry_budget import BudgetPolicy


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
        return (c.method, "(?s:.*)") if c.method is not None else None
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
            if p != "(?s:.*)":
                if pattern is not None:
                    return None
                pattern = p
        return method, pattern if pattern is not None else "(?s:.*)"
    return None


def _combined(routes: tuple[ProfileRoute, ...]) -> tuple[re.Pattern[str], tuple[bytes | None, ...]] | None:
    """One regex trying every route's path pattern in order (the first alternative that matches
    the whole path wins, as the first matching route does), and each route's method; None when a
    route's condition is not that simple or the patterns do not combine."""
    parts = []
    methods = []
    for i, r in enumerate(routes):
        one = _simple(r.condition)
        if one is None:
            return None
        methods.append(one[0])
        parts.append(f"(?P<_r{i}>{one[1]})")
    try:
        return re.compile("|".join(parts)), tuple(methods)
    except re.error:
        return None  # e.g. a backreference or an inline flag that only works alone


@dataclass(frozen=True, slots=True)
class Profile:
    routes: tuple[ProfileRoute, ...] = ()
    budget: BudgetPolicy | None = None
    dst_overrides: tuple[WeightedDst, ...] = ()
    opaque: bool = False
    fqn: str = ""
    _combined: tuple[re.Pattern[str], tuple[bytes | None, ...]] | None = field(
        default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_combined", _combined(self.routes) if len(self.routes) > 1 else None)

    def route_for(self, req: RequestInfo) -> ProfileRoute:
        for route in self.routes:
            if route.condition.matches(req):
                return route
        return DEFAULT_ROUTE

    def route_index(self, method: bytes, path: bytes, req: RequestInfo | None = None) -> int:
        """The index of the first route matching ``method`` and ``path`` (-1: the default route).
        One regex call when every route is a method and a path regex (the usual profile)."""
        combined = self._combined
        if combined is None:
            info = req if req is not None else RequestInfo(method, path, "")
            for i, route in enumerate(self.routes):
                if route.condition.matches(info):
                    return i
            return -1
        pattern, methods = combined
        path_only = path.split(b"?", 1)[0].decode("latin-1")
        m = pattern.fullmatch(path_only)
        if m is None:
            return -1
        first = int(m.lastgroup[2:]) if m.lastgroup else 0
        want = methods[first]
        if want is None or want == method:
            return first
        # The first route whose path matches wants another method: try the routes after it alone.
        info = req if req is not None else RequestInfo(method, path, "")
        for i in range(first + 1, len(self.routes)):
            if self.routes[i].condition.matches(info):
                return i
        return -1


def pick_weighted(dsts: tuple[WeightedDst, ...], r: float) -> WeightedDst:
    """The backend for a uniform ``r`` in [0, 1): each with probability weight / total."""
    total = sum(d.weight for d in dsts)
    if total <= 0:
        return dsts[0]
    point = r * total
    for d in dsts:
        point -= d.weight
        if point < 0:
            return d
    return dsts[-1]
