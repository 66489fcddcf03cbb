"""HTTPLocalRateLimitPolicy: a total limit, a per-identity limit, overrides for named identities.

Each limit is a GCRA (generic cell rate algorithm) with a burst of one second's worth of requests,
the quota linkerd2-proxy builds with ``governor::Quota::per_second(rps)``: a request is admitted
when the limit's "theoretical arrival time" is no more than one second ahead of now, and each
admitted request moves it on by ``1/rps``. Over any window of T seconds at most ``rps * (T + 1)``
requests pass, so the long-run rate is ``rps``.

Checked in linkerd2-proxy's order: the total limit first; then a client whose identity has an
override is held to that override only; any other client to the per-identity limit, where all
clients without an identity share one key.

Pure: ``now`` (seconds, monotonic) is a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Keys of the per-identity limiter kept at most (the oldest idle are dropped first beyond it).
MAX_KEYS = 10_000


class RateLimited(Exception):
    """A request over a limit: ``scope`` is ``total`` or ``identity`` (as Linkerd's metric label)."""

    def __init__(self, reason: str, scope: str, rps: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.scope = scope
        self.rps = rps


class Gcra:
    """One limiter of ``rps`` requests per second with a one-second burst."""

    __slots__ = ("burst", "interval", "tat")

    def __init__(self, rps: int) -> None:
        if rps <= 0:
            raise ValueError("requests per second must be positive")
        self.interval = 1.0 / rps
        self.burst = 1.0  # seconds of credit: rps requests at once
        self.tat = 0.0

    def admit(self, now: float) -> bool:
        tat = self.tat if self.tat > now else now
        if tat - now + self.interval > self.burst + 1e-9:
            return False
        self.tat = tat + self.interval
        return True


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """What the control plane streams: None means no limit of that kind."""

    total: int | None = None
    identity: int | None = None
    overrides: Mapping[str, int] = field(default_factory=dict)  # client identity -> rps
    meta: tuple[str, str, str] | None = None  # (group, kind, name) of the policy resource

    def __hash__(self) -> int:
        return hash((self.total, self.identity, tuple(sorted(self.overrides.items())), self.meta))


class LocalRateLimit:
    """The limiters of one server's policy (state lives as long as the policy does)."""

    def __init__(self, spec: RateLimitSpec) -> None:
        self.spec = spec
        self.total = Gcra(spec.total) if spec.total else None
        self.overrides = {ident: Gcra(rps) for ident, rps in spec.overrides.items() if rps > 0}
        self.per_identity: dict[str | None, Gcra] = {}

    def check(self, client_id: str | None, now: float) -> None:
        """Admit a request or raise :class:`RateLimited`."""
        spec = self.spec
        total = self.total
        if total is not None:
            # Gcra.admit, inlined: this runs for every request on a limited server.
            tat = total.tat if total.tat > now else now
            if tat - now + total.interval > total.burst + 1e-9:
                raise RateLimited(f"total rate limit exceeded: {spec.total}rps", "total", spec.total or 0)
            total.tat = tat + total.interval
        if client_id is not None:
            lim = self.overrides.get(client_id)
            if lim is not None:
                if not lim.admit(now):
                    rps = spec.overrides[client_id]
                    raise RateLimited(f"override rate limit exceeded: {rps}rps", "identity", rps)
                return
        if spec.identity:
            lim = self.per_identity.get(client_id)
            if lim is None:
                if len(self.per_identity) >= MAX_KEYS:
                    self._forget_idle(now)
                lim = self.per_identity[client_id] = Gcra(spec.identity)
            if not lim.admit(now):
                raise RateLimited(f"per-identity rate limit exceeded: {spec.identity}rps", "identity",
                                  spec.identity)

    def _forget_idle(self, now: float) -> None:
        # A limiter whose arrival time has passed holds no state a fresh one would not.
        for key in [k for k, g in self.per_identity.items() if g.tat <= now]:
            del self.per_identity[key]
        while len(self.per_identity) >= MAX_KEYS:
            del self.per_identity[next(iter(self.per_identity))]
