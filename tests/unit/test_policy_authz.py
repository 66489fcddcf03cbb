"""Authorization evaluation and local rate limits: the pure cores in tether.core.policy."""

from __future__ import annotations

import pytest

from tether.core.policy.authz import (
    DEFAULT_POLICIES,
    UNAUTHENTICATED,
    Authn,
    Authz,
    Meta,
    Network,
    PolicyError,
    authorize,
    default_authorizations,
    identities_authn,
    localhost_authz,
    parse_ip,
)
from tether.core.policy.ratelimit import LocalRateLimit, RateLimited, RateLimitSpec

CLUSTER = ("10.0.0.0/8",)
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
OTHER = "batch.jobs.serviceaccount.identity.linkerd.cluster.local"

# (client ip, client identity or None) -> allowed, per default policy.
CLIENTS = {
    "meshed-inside": ("10.1.2.3", WEB),
    "meshed-outside": ("203.0.113.9", WEB),
    "plain-inside": ("10.1.2.3", None),
    "plain-outside": ("203.0.113.9", None),
}
EXPECTED = {
    "all-unauthenticated": {"meshed-inside", "meshed-outside", "plain-inside", "plain-outside"},
    "audit": {"meshed-inside", "meshed-outside", "plain-inside", "plain-outside"},
    "all-authenticated": {"meshed-inside", "meshed-outside"},
    "cluster-authenticated": {"meshed-inside"},
    "cluster-unauthenticated": {"meshed-inside", "plain-inside"},
    "deny": set(),
}


@pytest.mark.parametrize("policy", DEFAULT_POLICIES)
def test_default_policies_permit_exactly_their_clients(policy: str) -> None:
    authzs = default_authorizations(policy, CLUSTER)
    allowed = {name for name, (ip, ident) in CLIENTS.items() if authorize(authzs, parse_ip(ip), ident) is not None}
    assert allowed == EXPECTED[policy]


def test_audit_is_marked_so_the_proxy_logs_what_it_permits() -> None:
    (a,) = default_authorizations("audit", CLUSTER)
    assert a.meta.is_audit and not default_authorizations("all-unauthenticated", CLUSTER)[0].meta.is_audit


def test_unknown_default_policy_is_refused_by_name() -> None:
    with pytest.raises(PolicyError, match="'allow-all' is not one of all-unauthenticated"):
        default_authorizations("allow-all", CLUSTER)


def test_identity_wildcards_match_on_label_boundaries() -> None:
    authn = identities_authn(["*.shop.serviceaccount.identity.linkerd.cluster.local", "exact.id"])
    assert authn.permits(WEB)
    assert authn.permits("exact.id")
    assert not authn.permits(OTHER)
    assert not authn.permits("shop.serviceaccount.identity.linkerd.cluster.local")  # the suffix alone
    assert not authn.permits("web.xshop.serviceaccount.identity.linkerd.cluster.local")  # not a label boundary
    assert not authn.permits(None)  # no mTLS: no identity to match
    assert identities_authn(["*"]).permits(OTHER)
    with pytest.raises(PolicyError, match="a wildcard may only be a leading"):
        identities_authn(["web.*.serviceaccount"])


def test_networks_with_exceptions() -> None:
    n = Network.parse("10.0.0.0/8", ["10.9.0.0/16"])
    assert n.contains(parse_ip("10.1.0.1"))
    assert not n.contains(parse_ip("10.9.1.1"))
    assert not n.contains(parse_ip("11.0.0.1"))
    assert not n.contains(parse_ip("::1"))  # another family never matches
    assert n.contains(parse_ip("::ffff:10.1.0.1"))  # v4-mapped peers count as IPv4
    with pytest.raises(PolicyError, match=r"network '10\.0\.0\.300/8'"):
        Network.parse("10.0.0.300/8")


def test_first_permitting_authorization_wins_and_names_the_metric_labels() -> None:
    a = Authz((Network.parse("10.0.0.0/8"),), identities_authn([WEB]),
              Meta("policy.linkerd.io", "authorizationpolicy", "web"))
    b = Authz((Network.parse("0.0.0.0/0"),), Authn(UNAUTHENTICATED), Meta.default("all-unauthenticated"))
    assert authorize((a, b), parse_ip("10.0.0.1"), WEB) is a
    assert authorize((a, b), parse_ip("10.0.0.1"), OTHER) is b
    assert authorize((a,), parse_ip("10.0.0.1"), OTHER) is None


def test_localhost_is_loopback_one_only() -> None:
    lh = localhost_authz()
    assert lh.permits(parse_ip("127.0.0.1"), None) and lh.permits(parse_ip("::1"), None)
    assert not lh.permits(parse_ip("127.0.0.2"), None)


# -- rate limits -------------------------------------------------------------------------------------


def admitted(lim: LocalRateLimit, client: str | None, times: list[float]) -> int:
    n = 0
    for t in times:
        try:
            lim.check(client, t)
            n += 1
        except RateLimited:
            pass
    return n


@pytest.mark.parametrize("rps", [10, 100, 1000])
def test_total_limit_admits_rps_per_second_over_a_window(rps: int) -> None:
    lim = LocalRateLimit(RateLimitSpec(total=rps))
    offered = 3 * rps  # three times the limit, evenly spread over 10 s
    times = [i * 10.0 / (offered * 10) for i in range(offered * 10)]
    got = admitted(lim, None, times)
    # One second of burst on top of 10 s at the rate.
    assert rps * 10 <= got <= rps * 11


def test_burst_is_one_second_then_the_rate() -> None:
    lim = LocalRateLimit(RateLimitSpec(total=5))
    assert admitted(lim, None, [0.0] * 10) == 5
    assert admitted(lim, None, [0.1]) == 0
    assert admitted(lim, None, [0.2]) == 1


def test_per_identity_limits_apart_and_overrides_replace_them() -> None:
    lim = LocalRateLimit(RateLimitSpec(identity=2, overrides={WEB: 5}))
    assert admitted(lim, OTHER, [0.0] * 4) == 2
    assert admitted(lim, "c.ns.serviceaccount.x", [0.0] * 4) == 2  # its own bucket
    assert admitted(lim, None, [0.0] * 4) == 2  # unauthenticated clients share one
    assert admitted(lim, WEB, [0.0] * 8) == 5  # the override, not the per-identity limit
    with pytest.raises(RateLimited) as e:
        lim.check(WEB, 0.0)
    assert (e.value.scope, str(e.value)) == ("identity", "override rate limit exceeded: 5rps")


def test_total_is_checked_first() -> None:
    lim = LocalRateLimit(RateLimitSpec(total=3, identity=10))
    assert admitted(lim, WEB, [0.0] * 5) == 3
    with pytest.raises(RateLimited) as e:
        lim.check(OTHER, 0.0)
    assert (e.value.scope, e.value.reason) == ("total", "total rate limit exceeded: 3rps")
