"""Rapid-reset judgement (tether.core.http.reset_budget) with a fake clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http.reset_budget import ResetBudget, Verdict


def test_a_flood_of_instant_resets_gets_goaway() -> None:
    b = ResetBudget(max_resets=200, window=10, min_age=1.0)
    verdicts = []
    for i in range(300):
        now = 100 + i * 0.001
        b.opened(now)
        verdicts.append(b.reset(now, 0.0005, answered=False))
    assert verdicts[:200] == [Verdict.OK] * 200
    assert verdicts[200] is Verdict.GOAWAY


def test_cancelling_answered_or_old_streams_is_never_counted() -> None:
    b = ResetBudget(max_resets=200, window=10, min_age=1.0)
    for i in range(10_000):
        now = 100 + i * 0.0005
        b.opened(now)
        assert b.reset(now, 0.01, answered=True) is Verdict.OK
        assert b.reset(now, 1.5, answered=False) is Verdict.OK
    assert b.rapid_resets == 0


def test_a_busy_peer_over_budget_is_shed_not_disconnected() -> None:
    b = ResetBudget(max_resets=200, window=10, min_age=1.0)
    now = 100.0
    for _ in range(2000):  # real work: 2,000 streams
        b.opened(now)
    verdicts = {b.reset(now, 0.1, answered=False) for _ in range(300)}  # 300 quick cancels
    assert verdicts == {Verdict.OK, Verdict.SHED}
    assert b.verdict(now + 5) is Verdict.SHED
    assert b.verdict(now + 11) is Verdict.OK  # the window has passed: back under the budget


def test_counts_leave_the_window() -> None:
    b = ResetBudget(max_resets=5, window=10, min_age=1.0)
    for i in range(5):
        b.opened(100 + i)
        b.reset(100 + i, 0, answered=False)
    assert b.rapid_resets == 5
    assert b.verdict(112) is Verdict.OK
    assert b.rapid_resets == 2  # seconds 103 and 104 are still within (102, 112]
    assert b.verdict(200) is Verdict.OK and b.rapid_resets == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.booleans(), st.floats(0, 2), st.booleans()), max_size=400))
def test_rapid_count_matches_a_sliding_window(events: list[tuple[float, bool, float, bool]]) -> None:
    """The bucketed count equals a plain count of rapid resets in the last whole seconds."""
    b = ResetBudget(max_resets=50, window=10, min_age=1.0)
    t = 1000.0
    rapid_at: list[int] = []
    for dt, opened, age, answered in events:
        t += dt / 10
        if opened:
            b.opened(t)
        b.reset(t, age, answered)
        if not answered and age < 1.0:
            rapid_at.append(int(t))
        b.verdict(t)
        assert b.rapid_resets == sum(1 for s in rapid_at if s > int(t) - 10)
