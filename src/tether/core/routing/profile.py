"""A destination's ServiceProfile as the proxy applies it (pure).

Routes are tried in order; the first whose condition matches names the request's route (for
``route_*`` metrics as ``rt_route``), its timeout, whether it is retryable (within the profile's
retry budget), and its response classes (which statuses are failures). Requests no route matches
take the default route (``rt_route=""`` in Linkerd, ``[DEFAULT]`` in ``viz routes``).
``dst_overrides`` split the destination's traffic over other authorities by weight (a
TrafficSplit).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Profile:
    routes: tuple[ProfileRoute, ...] = ()
    budget: BudgetPolicy | None = None
    dst_overrides: tuple[WeightedDst, ...] = ()
    opaque: bool = False
    fqn: str = ""

    def route_for(self, req: RequestInfo) -> ProfileRoute:
        for route in self.routes:
            if route.condition.matches(req):
                return route
        return DEFAULT_ROUTE


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
