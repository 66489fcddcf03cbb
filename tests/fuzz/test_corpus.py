"""The fuzz corpus replays in CI: every saved input of every target, then a short hypothesis run.

The long runs are by hand (``scripts/fuzz TARGET --minutes N``, coverage-guided with atheris);
inputs they find interesting are saved under ``corpus/TARGET`` and replayed here from then on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CORPUS = Path(__file__).parent / "corpus"


def test_every_target_has_a_corpus() -> None:
    for name in TARGETS:
        assert any((CORPUS / name).iterdir()), f"no seed inputs for fuzz target {name}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_without_a_crash(name: str) -> None:
    target = TARGETS[name]
    for path in sorted((CORPUS / name).iterdir()):
        try:
            target(path.read_bytes())
        except Exception as e:
            raise AssertionError(f"{name} crashed on {path.relative_to(CORPUS.parent)}: {e!r}") from e


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_inputs_do_not_crash(name: str) -> None:
    target = TARGETS[name]
    seeds = [p.read_bytes() for p in sorted((CORPUS / name).iterdir())]
    # Random bytes, and seeds with random bytes spliced in (closer to the formats).
    inputs = st.binary(max_size=512) | st.builds(
        lambda s, i, b: s[:i] + b + s[i:], st.sampled_from(seeds), st.integers(0, 64), st.binary(max_size=16))

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs)
    def run(data: bytes) -> None:
        target(data)

    run()
