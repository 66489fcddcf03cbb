"""Endpoint sets and diffs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.discovery.endpoints import (
    Endpoint,
    EndpointDiff,
    EndpointError,
    EndpointSet,
    format_addr,
    parse_addr,
)


def test_parse_and_format_addresses() -> None:
    assert parse_addr("10.0.0.1:8080") == ("10.0.0.1", 8080)
    assert parse_addr("[::1]:80") == ("::1", 80)
    assert format_addr(("::1", 80)) == "[::1]:80"
    for bad in ("10.0.0.1", "web:80", "10.0.0.1:0", "10.0.0.1:70000", "10.0.0.1:x", ":80"):
        with pytest.raises(EndpointError):
            parse_addr(bad)


def test_endpoint_metadata_is_validated_and_labels_sorted() -> None:
    ep = Endpoint.of("10.0.0.1:80", weight=3, labels={"b": "2", "a": "1"}, protocol_hint="h2")
    assert ep.labels == (("a", "1"), ("b", "2"))
    assert ep.label_dict == {"a": "1", "b": "2"}
    with pytest.raises(EndpointError, match="weight"):
        Endpoint.of("10.0.0.1:80", weight=0)
    with pytest.raises(EndpointError, match="protocol hint"):
        Endpoint.of("10.0.0.1:80", protocol_hint="h3")


def test_same_connection_ignores_weight_and_labels_only() -> None:
    a = Endpoint.of("10.0.0.1:80", identity="x")
    assert a.same_connection(Endpoint.of("10.0.0.1:80", identity="x", weight=5, labels={"k": "v"}))
    assert not a.same_connection(Endpoint.of("10.0.0.1:80", identity="y"))


def test_diff_adds_changed_metadata_and_removes_missing() -> None:
    a, b, c = (Endpoint.of(f"10.0.0.{i}:80") for i in (1, 2, 3))
    b2 = Endpoint.of("10.0.0.2:80", weight=2)
    old, new = EndpointSet([a, b]), EndpointSet([b2, c])
    d = old.diff(new)
    assert set(d.add) == {b2, c}
    assert d.remove == (a.addr,)
    assert old.apply(d) == new
    assert not new.diff(new)


def test_apply_is_idempotent_for_removals() -> None:
    s = EndpointSet([Endpoint.of("10.0.0.1:80")])
    d = EndpointDiff(remove=(("10.0.0.9", 80),))
    assert s.apply(d) == s


endpoint = st.builds(
    lambda i, w: Endpoint.of(f"10.0.0.{i}:80", weight=w),
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=1, max_value=3),
)


@given(old=st.lists(endpoint, max_size=15), new=st.lists(endpoint, max_size=15))
def test_applying_a_diff_yields_the_target_set(old: list[Endpoint], new: list[Endpoint]) -> None:
    a, b = EndpointSet(old), EndpointSet(new)
    assert a.apply(a.diff(b)) == b
    assert a == EndpointSet(old)  # immutable
