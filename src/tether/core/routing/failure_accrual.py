"""Consecutive-failures accrual for one endpoint (``balancer.linkerd.io/failure-accrual: consecutive``).

Linkerd's breaker: ``max_failures`` consecutive failed responses eject the endpoint for a penalty;
when the penalty ends the endpoint is in probation and exactly one real request is let through as
a probe. A successful probe makes the endpoint healthy again; a failed one ejects it for twice the
previous penalty (``min_penalty`` doubling up to ``max_penalty``, plus up to ``jitter`` times the
base at random). Responses to requests sent before an ejection that arrive during it are ignored,
as linkerd2-proxy ignores them.

States and events form the table :data:`TRANSITIONS`; an event not in the table for the current
state is a caller bug and raises :class:`InvalidTransition`. Pure: ``now`` is a parameter and
randomness comes from the injected ``rng`` (a ``random.random``-like function).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    HEALTHY = "healthy"  # requests flow; consecutive failures are counted
    PENALTY = "penalty"  # ejected until ``until``
    PROBATION = "probation"  # penalty over: the next request dispatched is the probe
    PROBING = "probing"  # the probe is in flight; no other request is let through

    # Members are singletons: identity hashing keeps table lookups off Enum's Python __hash__.
    __hash__ = object.__hash__


class Event(enum.Enum):
    DISPATCH = "dispatch"  # a request is sent to the endpoint (in probation: the probe)
    SUCCESS = "success"  # a non-probe request's response was a success
    FAILURE = "failure"  # a non-probe request failed (error, 5xx, failing gRPC status)
    PROBE_SUCCESS = "probe_success"
    PROBE_FAILURE = "probe_failure"
    PROBE_CANCEL = "probe_cancel"  # the probe ended without an outcome (client went away)
    TIMER = "timer"  # time passed (``poll``)

    __hash__ = object.__hash__


# (state, event) -> the states the event may lead to. Anything absent is an error.
TRANSITIONS: dict[tuple[State, Event], frozenset[State]] = {
    (State.HEALTHY, Event.DISPATCH): frozenset({State.HEALTHY}),
    (State.HEALTHY, Event.SUCCESS): frozenset({State.HEALTHY}),
    (State.HEALTHY, Event.FAILURE): frozenset({State.HEALTHY, State.PENALTY}),
    (State.HEALTHY, Event.TIMER): frozenset({State.HEALTHY}),
    # Stragglers sent before the ejection are ignored while ejected or on probation.
    (State.PENALTY, Event.SUCCESS): frozenset({State.PENALTY}),
    (State.PENALTY, Event.FAILURE): frozenset({State.PENALTY}),
    (State.PENALTY, Event.TIMER): frozenset({State.PENALTY, State.PROBATION}),
    (State.PROBATION, Event.DISPATCH): frozenset({State.PROBING}),
    (State.PROBATION, Event.SUCCESS): frozenset({State.PROBATION}),
    (State.PROBATION, Event.FAILURE): frozenset({State.PROBATION}),
    (State.PROBATION, Event.TIMER): frozenset({State.PROBATION}),
    (State.PROBING, Event.SUCCESS): frozenset({State.PROBING}),
    (State.PROBING, Event.FAILURE): frozenset({State.PROBING}),
    (State.PROBING, Event.TIMER): frozenset({State.PROBING}),
    (State.PROBING, Event.PROBE_SUCCESS): frozenset({State.HEALTHY}),
    (State.PROBING, Event.PROBE_FAILURE): frozenset({State.PENALTY}),
    (State.PROBING, Event.PROBE_CANCEL): frozenset({State.PROBATION}),
}

READY_STATES = frozenset({State.HEALTHY, State.PROBATION})


class InvalidTransition(Exception):
    """An event that the current state does not accept (a bug in the caller)."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"failure accrual: event {event.value!r} is not allowed in state {state.value!r}")
        self.state = state
        self.event = event


@dataclass(frozen=True, slots=True)
class AccrualPolicy:
    """Linkerd's defaults: 7 failures, penalty 1 s doubling to 60 s, jitter 0.5."""

    max_failures: int = 7
    min_penalty: float = 1.0
    max_penalty: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, not {self.max_failures}")
        if not 0 < self.min_penalty <= self.max_penalty:
            raise ValueError(
                f"penalties must satisfy 0 < min ({self.min_penalty}) <= max ({self.max_penalty})"
            )
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, not {self.jitter}")

    def penalty(self, level: int, u: float) -> float:
        """The penalty after ``level`` failed probes; ``u`` in [0, 1) draws the jitter."""
        base = self.min_penalty * 2.0 ** min(level, 64)
        base = min(base, self.max_penalty)
        return min(self.max_penalty, base + base * self.jitter * u)


class Permit:
    """A dispatched request's ticket: report its outcome once with success/failure/cancel."""

    __slots__ = ("done", "probe")

    def __init__(self, probe: bool) -> None:
        self.probe = probe
        self.done = False


class FailureAccrual:
    """The breaker state of one endpoint."""

    __slots__ = ("failures", "level", "policy", "rng", "state", "until")

    def __init__(self, policy: AccrualPolicy, rng: Callable[[], float]) -> None:
        self.policy = policy
        self.rng = rng
        self.state = State.HEALTHY
        self.failures = 0  # consecutive failures while healthy
        self.level = 0  # failed probes since the last healthy period
        self.until = 0.0  # end of the current penalty

    # -- queries ---------------------------------------------------------------------------------
    def poll(self, now: float) -> State:
        """Let time pass (a penalty may end) and return the state."""
        if self.state is State.HEALTHY:
            return State.HEALTHY  # (HEALTHY, TIMER) -> HEALTHY, without the table on the hot path
        self._step(Event.TIMER, now)
        return self.state

    def ready(self, now: float) -> bool:
        """True when a request may be dispatched now (healthy, or the probe slot is free)."""
        return self.poll(now) in READY_STATES

    # -- events ----------------------------------------------------------------------------------
    def dispatch(self, now: float) -> Permit:
        """A request is sent; in probation it becomes the probe. Raises unless ``ready``."""
        if self.state is State.HEALTHY:
            return Permit(False)  # (HEALTHY, DISPATCH) -> HEALTHY, without the table on the hot path
        probe = self.poll(now) is State.PROBATION
        self._step(Event.DISPATCH, now)
        return Permit(probe)

    def success(self, permit: Permit, now: float) -> State:
        """The request behind ``permit`` succeeded."""
        self._settle(permit)
        if self.state is State.HEALTHY and not permit.probe:
            self.failures = 0  # (HEALTHY, SUCCESS) -> HEALTHY, without the table on the hot path
            return State.HEALTHY
        return self._step(Event.PROBE_SUCCESS if permit.probe else Event.SUCCESS, now)

    def failure(self, permit: Permit, now: float) -> State:
        """The request behind ``permit`` failed."""
        self._settle(permit)
        return self._step(Event.PROBE_FAILURE if permit.probe else Event.FAILURE, now)

    def cancel(self, permit: Permit, now: float) -> State:
        """The request ended with no outcome; a cancelled probe frees the probe slot."""
        self._settle(permit)
        if permit.probe:
            return self._step(Event.PROBE_CANCEL, now)
        return self.state

    # -- the table -------------------------------------------------------------------------------
    @staticmethod
    def _settle(permit: Permit) -> None:
        if permit.done:
            raise ValueError("failure accrual: a permit's outcome was reported twice")
        permit.done = True

    def _step(self, event: Event, now: float) -> State:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None:
            raise InvalidTransition(self.state, event)
        new = self._next(event, now)
        if new not in allowed:  # pragma: no cover - the table and _next disagree
            raise AssertionError(f"{self.state} --{event}--> {new} is not in the table")
        self.state = new
        return new

    def _next(self, event: Event, now: float) -> State:
        s = self.state
        if s is State.HEALTHY:
            if event is Event.SUCCESS:
                self.failures = 0
            elif event is Event.FAILURE:
                self.failures += 1
                if self.failures >= self.policy.max_failures:
                    self.failures = 0
                    self.level = 0
                    return self._eject(now)
            return State.HEALTHY
        if s is State.PENALTY:
            if event is Event.TIMER and now >= self.until:
                return State.PROBATION
            return State.PENALTY
        if s is State.PROBATION:
            return State.PROBING if event is Event.DISPATCH else State.PROBATION
        # PROBING
        if event is Event.PROBE_SUCCESS:
            self.level = 0
            self.failures = 0
            return State.HEALTHY
        if event is Event.PROBE_FAILURE:
            self.level += 1
            return self._eject(now)
        if event is Event.PROBE_CANCEL:
            return State.PROBATION
        return State.PROBING

    def _eject(self, now: float) -> State:
        self.until = now + self.policy.penalty(self.level, self.rng())
        return State.PENALTY
