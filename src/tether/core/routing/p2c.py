"""Power of two choices: pick two distinct endpoints at random, keep the one with the lower load.

As in tower's ``p2c::Balance`` (which linkerd2-proxy uses): with one candidate there is nothing to
compare and its load is not read; with two or more, two distinct indices are drawn uniformly and
the lower cost wins (ties go to the first draw). Only the two drawn candidates have their cost
read, because reading a peak-EWMA cost updates its decay.

Pure: randomness comes from ``randrange`` (``random.Random.randrange`` or a scripted fake).
"""

from __future__ import annotations

from collections.abc import Callable

RandRange = Callable[[int], int]  # randrange(n) -> an int in [0, n)


def pick_two(n: int, randrange: RandRange) -> tuple[int, int]:
    """Two distinct indices in [0, n), uniformly (n >= 2)."""
    if n < 2:
        raise ValueError(f"pick_two needs at least 2 candidates, not {n}")
    a = randrange(n)
    b = randrange(n - 1)
    if b >= a:
        b += 1
    if not (0 <= a < n and 0 <= b < n):
        raise ValueError(f"randrange returned an index out of range for n={n}: {a}, {b}")
    return a, b


def choose(n: int, cost: Callable[[int], float], randrange: RandRange) -> int | None:
    """The index of the chosen candidate among ``n``, or None when there are none."""
    if n <= 0:
        return None
    if n == 1:
        return 0
    a, b = pick_two(n, randrange)
    return a if cost(a) <= cost(b) else b
