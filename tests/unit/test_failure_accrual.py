"""Failure accrual: the consecutive-failures breaker's state table, driven by hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.core.routing.failure_accrual import (
    TRANSITIONS,
    AccrualPolicy,
    Event,
    FailureAccrual,
    InvalidTransition,
    Permit,
    State,
)

POLICY = AccrualPolicy(max_failures=3, min_penalty=1.0, max_penalty=8.0, jitter=0.5)


def accrual(policy: AccrualPolicy = POLICY, u: float = 0.0) -> FailureAccrual:
    return FailureAccrual(policy, lambda: u)


def eject(acc: FailureAccrual, now: float = 0.0) -> None:
    for _ in range(acc.policy.max_failures):
        acc.failure(acc.dispatch(now), now)
    assert acc.state is State.PENALTY


def test_linkerd_defaults() -> None:
    p = AccrualPolicy()
    assert (p.max_failures, p.min_penalty, p.max_penalty, p.jitter) == (7, 1.0, 60.0, 0.5)


def test_max_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    acc = accrual()
    for _ in range(2):
        acc.failure(acc.dispatch(0.0), 0.0)
    acc.success(acc.dispatch(0.0), 0.0)
    for _ in range(2):
        acc.failure(acc.dispatch(0.0), 0.0)
    assert acc.state is State.HEALTHY
    acc.failure(acc.dispatch(0.0), 0.0)
    assert acc.state is State.PENALTY
    assert acc.until == 1.0


def test_penalty_then_one_probe_then_healthy() -> None:
    acc = accrual()
    eject(acc)
    assert not acc.ready(0.999)
    with pytest.raises(InvalidTransition):
        acc.dispatch(0.5)
    assert acc.ready(1.0)
    assert acc.state is State.PROBATION
    probe = acc.dispatch(1.0)
    assert probe.probe
    assert acc.state is State.PROBING
    assert not acc.ready(1.0)
    with pytest.raises(InvalidTransition):
        acc.dispatch(1.0)  # exactly one probe
    acc.success(probe, 1.1)
    assert acc.state is State.HEALTHY
    assert acc.ready(1.1)


def test_failed_probes_double_the_penalty_up_to_the_max() -> None:
    acc = accrual()
    eject(acc)
    now, penalties = 0.0, [acc.until - 0.0]
    for _ in range(5):
        now = acc.until
        probe = acc.dispatch(now)
        acc.failure(probe, now)
        penalties.append(acc.until - now)
    assert penalties == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    # A healthy period resets the backoff.
    now = acc.until
    acc.success(acc.dispatch(now), now)
    eject(acc, now)
    assert acc.until - now == 1.0


def test_a_cancelled_probe_frees_the_probe_slot() -> None:
    acc = accrual()
    eject(acc)
    probe = acc.dispatch(1.0)
    acc.cancel(probe, 1.0)
    assert acc.state is State.PROBATION
    assert acc.dispatch(1.0).probe


def test_stragglers_are_ignored_while_ejected() -> None:
    acc = accrual()
    straggler = acc.dispatch(0.0)
    eject(acc)
    acc.success(straggler, 0.5)
    assert acc.state is State.PENALTY


def test_an_outcome_reported_twice_is_an_error() -> None:
    acc = accrual()
    p = acc.dispatch(0.0)
    acc.success(p, 0.0)
    with pytest.raises(ValueError):
        acc.failure(p, 0.0)


@given(level=st.integers(min_value=0, max_value=200), u=st.floats(min_value=0.0, max_value=0.999999))
def test_jittered_penalty_is_within_bounds(level: int, u: float) -> None:
    p = AccrualPolicy()
    base = min(p.max_penalty, p.min_penalty * 2.0**level)
    pen = p.penalty(level, u)
    assert base <= pen <= min(p.max_penalty, base * (1 + p.jitter))
    assert p.min_penalty <= pen <= p.max_penalty


def test_every_pair_outside_the_table_is_an_error() -> None:
    missing = [k for k in itertools.product(State, Event) if k not in TRANSITIONS]
    assert missing  # the table is not total on purpose
    for state, event in missing:
        acc = accrual()
        acc.state = state
        with pytest.raises(InvalidTransition):
            acc._step(event, 0.0)
        assert acc.state is state


def test_invalid_policies_are_rejected() -> None:
    with pytest.raises(ValueError):
        AccrualPolicy(max_failures=0)
    with pytest.raises(ValueError):
        AccrualPolicy(min_penalty=2.0, max_penalty=1.0)
    with pytest.raises(ValueError):
        AccrualPolicy(jitter=-0.1)


class BreakerMachine(RuleBasedStateMachine):
    """Random dispatches, outcomes and time steps against a small reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.u = 0.25
        self.acc = FailureAccrual(POLICY, lambda: self.u)
        self.now = 0.0
        self.outstanding: list[Permit] = []
        self.consecutive = 0  # model: failures since the last success while healthy
        self.ejected_at: float | None = None

    @rule(dt=st.floats(min_value=0.0, max_value=5.0))
    def advance(self, dt: float) -> None:
        self.now += dt
        before = self.acc.state
        after = self.acc.poll(self.now)
        assert after in TRANSITIONS[(before, Event.TIMER)]
        if before is State.PENALTY:
            assert (after is State.PROBATION) == (self.now >= self.acc.until)

    @rule()
    def dispatch(self) -> None:
        state = self.acc.poll(self.now)
        if state in (State.HEALTHY, State.PROBATION):
            permit = self.acc.dispatch(self.now)
            assert permit.probe == (state is State.PROBATION)
            self.outstanding.append(permit)
        else:
            with pytest.raises(InvalidTransition):
                self.acc.dispatch(self.now)
            assert self.acc.state is state

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "cancel"]))
    def settle(self, data: st.DataObject, outcome: str) -> None:
        permit = self.outstanding.pop(data.draw(st.integers(0, len(self.outstanding) - 1)))
        before = self.acc.state
        getattr(self.acc, outcome)(permit, self.now)
        after = self.acc.state
        if permit.probe:
            assert before is State.PROBING
            expected = {"success": State.HEALTHY, "failure": State.PENALTY, "cancel": State.PROBATION}
            assert after is expected[outcome]
            if after is State.HEALTHY:
                self.consecutive = 0
        elif before is State.HEALTHY:
            if outcome == "success":
                self.consecutive = 0
            elif outcome == "failure":
                self.consecutive += 1
            if self.consecutive == POLICY.max_failures:
                assert after is State.PENALTY
                self.consecutive = 0
            else:
                assert after is State.HEALTHY
        else:
            assert after is before  # stragglers change nothing while ejected or on probation
        if after is State.PENALTY and before is not State.PENALTY:
            # ``until`` is ``now + penalty``; subtracting ``now`` back rounds (8.000000000000004).
            pen = self.acc.until - self.now
            eps = 1e-9 * max(1.0, abs(self.now))
            assert POLICY.min_penalty - eps <= pen <= POLICY.max_penalty + eps

    @invariant()
    def at_most_one_probe(self) -> None:
        probes = [p for p in self.outstanding if p.probe]
        assert len(probes) <= 1
        assert (self.acc.state is State.PROBING) == (len(probes) == 1)

    @invariant()
    def healthy_count_below_max(self) -> None:
        assert self.acc.failures < POLICY.max_failures


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
