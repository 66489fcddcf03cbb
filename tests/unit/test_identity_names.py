"""Identity names and SPIFFE ids: what is accepted, what is refused, and that they round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.identity.names import (
    IdentityNameError,
    WorkloadIdentity,
    identity_from_spiffe_id,
    parse_identity_name,
    parse_spiffe_id,
)

label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
trust_domain = st.lists(label, min_size=1, max_size=3).map(".".join)


def test_names_of_a_workload() -> None:
    ident = WorkloadIdentity("web", "shop", "linkerd", "cluster.local")
    assert ident.dns_name == "web.shop.serviceaccount.identity.linkerd.cluster.local"
    assert ident.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"


@given(label, label, label, trust_domain)
def test_dns_name_round_trips(sa: str, ns: str, cp: str, td: str) -> None:
    ident = WorkloadIdentity(sa, ns, cp, td)
    assert parse_identity_name(ident.dns_name) == ident
    assert identity_from_spiffe_id(ident.spiffe_id, cp) == ident
    assert str(parse_spiffe_id(ident.spiffe_id)) == ident.spiffe_id


@given(st.text(max_size=300))
def test_spiffe_parser_only_raises_its_own_error(text: str) -> None:
    try:
        sid = parse_spiffe_id(text)
    except IdentityNameError:
        return
    # Whatever it accepts must print back to the same text.
    assert str(sid) == text


@given(st.text(max_size=300))
def test_identity_parser_only_raises_its_own_error(text: str) -> None:
    try:
        ident = parse_identity_name(text)
    except IdentityNameError:
        return
    assert ident.dns_name == text


@pytest.mark.parametrize(
    "text, reason",
    [
        ("spiffe://", "empty trust domain"),
        ("SPIFFE://td/x", "must start with 'spiffe://'"),
        ("https://td/x", "must start with 'spiffe://'"),
        ("spiffe://Td/x", "trust domain"),
        ("spiffe://td/x/", "must not end with '/'"),
        ("spiffe://td/", "must not end with '/'"),
        ("spiffe://td//x", "empty path segment"),
        ("spiffe://td/./x", "relative path segment"),
        ("spiffe://td/x/..", "relative path segment"),
        ("spiffe://td/x?y=1", "query"),
        ("spiffe://td/x#f", "fragment"),
        ("spiffe://td:443/x", "port"),
        ("spiffe://user@td/x", "user info"),
        ("spiffe://td/a%20b", "path segment"),
        ("spiffe://" + "a" * 256 + "/x", "trust domain over 255 bytes"),
        ("spiffe://td/" + "a" * 2048, "longer than 2048 bytes"),
    ],
)
def test_spiffe_rules(text: str, reason: str) -> None:
    with pytest.raises(IdentityNameError, match=reason.replace("(", r"\(").replace("?", r"\?")):
        parse_spiffe_id(text)


def test_spiffe_accepts_underscore_trust_domain_and_mixed_case_paths() -> None:
    assert parse_spiffe_id("spiffe://my_td.example/Ns/A-b.c_d").segments == ("Ns", "A-b.c_d")


@pytest.mark.parametrize(
    "args, reason",
    [
        (("Web", "ns", "linkerd", "cluster.local"), "service account 'Web' is not a DNS label"),
        (("web", "my_ns", "linkerd", "cluster.local"), "namespace 'my_ns'"),
        (("web", "ns", "-linkerd", "cluster.local"), "control-plane namespace"),
        (("web", "ns", "linkerd", "cluster_local"), "trust domain"),
        (("web", "ns", "linkerd", ""), "trust domain is empty"),
        (("a" * 64, "ns", "linkerd", "cluster.local"), "1-63"),
        (("web", "ns", "linkerd", ".".join(["a" * 60] * 4)), "longer than 253 bytes"),
    ],
)
def test_identity_rules(args: tuple[str, str, str, str], reason: str) -> None:
    with pytest.raises(IdentityNameError, match=reason):
        WorkloadIdentity(*args)


@pytest.mark.parametrize(
    "name",
    [
        "web.ns.linkerd.cluster.local",
        "web.ns.serviceaccount.identities.linkerd.cluster.local",
        "web.ns.serviceaccount.identity.linkerd",
        "web..serviceaccount.identity.linkerd.cluster.local",
    ],
)
def test_identity_name_shape(name: str) -> None:
    with pytest.raises(IdentityNameError):
        parse_identity_name(name)


def test_spiffe_id_shape_for_workloads() -> None:
    with pytest.raises(IdentityNameError, match="spiffe://<td>/ns/<ns>/sa/<sa>"):
        identity_from_spiffe_id("spiffe://cluster.local/ns/shop", "linkerd")
