"""Power of two choices: distinct draws, the cheaper candidate wins."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.routing.p2c import choose, pick_two


def test_no_candidates_gives_none_and_one_is_chosen_without_reading_its_cost() -> None:
    def cost(i: int) -> float:
        raise AssertionError("cost read")

    assert choose(0, cost, random.Random(1).randrange) is None
    assert choose(1, cost, random.Random(1).randrange) == 0


@given(n=st.integers(min_value=2, max_value=100), seed=st.integers())
def test_two_draws_are_distinct_and_in_range(n: int, seed: int) -> None:
    a, b = pick_two(n, random.Random(seed).randrange)
    assert a != b
    assert 0 <= a < n and 0 <= b < n


def test_with_two_candidates_the_cheaper_always_wins() -> None:
    rng = random.Random(7)
    costs = [0.050, 0.010]
    picks = Counter(choose(2, costs.__getitem__, rng.randrange) for _ in range(1000))
    assert picks == {1: 1000}


def test_the_cheaper_endpoint_gets_most_traffic_among_many() -> None:
    rng = random.Random(42)
    costs = [0.010] + [0.100] * 9
    picks = Counter(choose(10, costs.__getitem__, rng.randrange) for _ in range(10_000))
    # The cheap one wins whenever it is drawn: 2 draws of 10 -> ~20% of picks, vs 10% uniform.
    assert picks[0] > 1_700
    # The costliest ones are still picked when two of them are drawn (no starvation overall).
    assert len(picks) == 10


def test_only_the_two_drawn_costs_are_read() -> None:
    read: list[int] = []

    def cost(i: int) -> float:
        read.append(i)
        return float(i)

    choose(10, cost, random.Random(3).randrange)
    assert len(read) == 2


def test_ties_go_to_the_first_draw() -> None:
    draws = iter([3, 0])  # a = 3, b = 0
    assert choose(5, lambda i: 1.0, lambda n: next(draws)) == 3


def test_a_random_source_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError):
        pick_two(3, lambda n: n)
    with pytest.raises(ValueError):
        pick_two(1, random.Random().randrange)
