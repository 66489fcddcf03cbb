"""Peak-EWMA estimator: peak sensitivity, decay, cost with pending requests."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.routing.ewma import DEFAULT_DECAY, DEFAULT_RTT, PeakEwma

rtts = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
gaps = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


def test_new_endpoint_costs_the_default_rtt() -> None:
    e = PeakEwma(now=5.0)
    assert e.estimate == DEFAULT_RTT == 0.030
    assert e.decay == DEFAULT_DECAY == 10.0
    assert e.cost(5.0) == pytest.approx(0.030)


def test_a_slow_sample_replaces_the_estimate_at_once() -> None:
    e = PeakEwma(now=0.0)
    e.observe(0.001, 0.5)
    assert e.estimate == 0.5


def test_fast_samples_wear_a_peak_down_with_the_decay_time_constant() -> None:
    e = PeakEwma(now=0.0, default_rtt=1.0, decay=10.0)
    # One sample of 0 after one time constant: 1/e of the old estimate remains.
    e.observe(10.0, 0.0)
    assert e.estimate == pytest.approx(math.exp(-1))


def test_cost_multiplies_by_pending_plus_one() -> None:
    e = PeakEwma(now=0.0, default_rtt=0.1)
    e.start()
    e.start()
    assert e.cost(0.0) == pytest.approx(0.3)
    e.finish(0.0, None)
    assert e.pending == 1
    assert e.cost(0.0) == pytest.approx(0.2)


def test_finish_without_start_is_an_error() -> None:
    with pytest.raises(ValueError):
        PeakEwma(now=0.0).finish(0.0, 0.01)


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        PeakEwma(now=0.0, decay=0.0)
    with pytest.raises(ValueError):
        PeakEwma(now=0.0, default_rtt=-1.0)


@given(start=rtts, samples=st.lists(st.tuples(gaps, rtts), max_size=30))
def test_estimate_stays_between_zero_and_the_largest_value_seen(
    start: float, samples: list[tuple[float, float]]
) -> None:
    e = PeakEwma(now=0.0, default_rtt=start)
    now, peak = 0.0, start
    for gap, rtt in samples:
        now += gap
        e.observe(now, rtt)
        peak = max(peak, rtt)
        assert 0.0 <= e.estimate <= peak + 1e-12


@given(start=rtts, t=gaps, rtt=rtts)
def test_a_sample_above_the_estimate_becomes_the_estimate_otherwise_it_mixes(
    start: float, t: float, rtt: float
) -> None:
    e = PeakEwma(now=0.0, default_rtt=start)
    new = e.observe(t, rtt)
    if rtt > start:
        assert new == rtt
    else:
        assert rtt - 1e-12 <= new <= start + 1e-12


@given(start=st.floats(min_value=0.001, max_value=10.0), reads=st.lists(gaps, max_size=10), tail=gaps)
def test_reading_the_cost_decays_the_same_however_often_it_is_read(
    start: float, reads: list[float], tail: float
) -> None:
    # exp decay is memoryless: k reads on the way give the same estimate as one read at the end.
    a = PeakEwma(now=0.0, default_rtt=start)
    b = PeakEwma(now=0.0, default_rtt=start)
    now = 0.0
    for gap in reads:
        now += gap
        a.cost(now)
    now += tail
    assert a.cost(now) == pytest.approx(b.cost(now), rel=1e-9, abs=1e-15)
    assert b.estimate == pytest.approx(start * math.exp(-now / b.decay), rel=1e-9, abs=1e-15)


@given(pending=st.integers(min_value=0, max_value=50))
def test_cost_grows_with_pending_requests(pending: int) -> None:
    e = PeakEwma(now=0.0)
    base = e.cost(0.0)
    for _ in range(pending):
        e.start()
    assert e.cost(0.0) == pytest.approx(base * (pending + 1))


def test_a_clock_going_backwards_does_not_reapply_decay() -> None:
    e = PeakEwma(now=10.0, default_rtt=1.0)
    e.observe(5.0, 0.0)  # elapsed clamps to 0
    assert e.estimate == 1.0
    assert e.stamp == 10.0
