"""Route matching (HTTPRoute rules, ServiceProfile conditions) and the retry budget, as pure code."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.routing.http_match import (
    Condition,
    PathMatch,
    RequestInfo,
    Route,
    RouteMatch,
    Rule,
    ValueMatch,
    first_matching,
    hostname_matches,
    select_rule,
)
from tether.core.routing.retry_budget import BudgetPolicy, RetryBudget


def req(path: str = "/", method: bytes = b"GET", authority: str = "web.ns.svc.cluster.local:80",
        headers: tuple[tuple[bytes, bytes], ...] = ()) -> RequestInfo:
    return RequestInfo(method, path.encode(), authority, headers)


def test_path_kinds() -> None:
    assert PathMatch("exact", "/api").matches("/api")
    assert not PathMatch("exact", "/api").matches("/api/")
    prefix = PathMatch("prefix", "/api/")
    assert prefix.matches("/api") and prefix.matches("/api/users")
    assert not prefix.matches("/apiv2")  # prefixes match whole segments
    assert PathMatch("prefix", "/").matches("/anything")
    rx = PathMatch("regex", "/users/[0-9]+")
    assert rx.matches("/users/42") and not rx.matches("/users/42/x")  # the whole path
    with pytest.raises(ValueError):
        PathMatch("exact", "no-slash")


def test_the_most_specific_rule_wins_in_gateway_api_order() -> None:
    routes = [Route((), (
        Rule((RouteMatch(PathMatch("prefix", "/")),), "catch-all"),
        Rule((RouteMatch(PathMatch("prefix", "/api")),), "api"),
        Rule((RouteMatch(PathMatch("prefix", "/api/v2")),), "api-v2"),
        Rule((RouteMatch(PathMatch("exact", "/api/v2/login")),), "login"),
        Rule((RouteMatch(PathMatch("prefix", "/api"), headers=(ValueMatch("x-canary", "1"),)),), "canary"),
        Rule((RouteMatch(PathMatch("prefix", "/api"), method=b"POST"),), "api-post"),
    ))]

    def pick(r: RequestInfo) -> str | None:
        got = select_rule(routes, r)
        return None if got is None else got[0]

    assert pick(req("/")) == "catch-all"
    assert pick(req("/api/users")) == "api"
    assert pick(req("/api/v2/users")) == "api-v2"  # a longer prefix
    assert pick(req("/api/v2/login")) == "login"  # exact beats every prefix
    assert pick(req("/api/x", headers=((b"x-canary", b"1"),))) == "canary"  # more headers
    assert pick(req("/api/x", method=b"POST")) == "api-post"  # a method match
    # Header beats method (Gateway API: headers before method).
    assert pick(req("/api/x", method=b"POST", headers=((b"x-canary", b"1"),))) == "canary"


def test_query_params_hostnames_and_ties() -> None:
    q = RouteMatch(PathMatch("prefix", "/"), query=(ValueMatch("debug", "t.*", regex=True),))
    routes = [
        Route(("other.example.com",), (Rule((), "elsewhere"),)),
        Route(("*.svc.cluster.local",), (Rule((RouteMatch(PathMatch("prefix", "/")),), "first"),
                                          Rule((RouteMatch(PathMatch("prefix", "/")),), "second"),
                                          Rule((q,), "debug"))),
    ]
    assert select_rule(routes, req("/x"))[0] == "first"  # type: ignore[index]  # ties: the earlier rule
    assert select_rule(routes, req("/x?debug=true&debug=no"))[0] == "debug"  # type: ignore[index]
    assert select_rule(routes, req("/x", authority="nothing.example.org")) is None
    assert hostname_matches("*.example.com", "a.b.example.com")
    assert not hostname_matches("*.example.com", "example.com")


def test_service_profile_conditions_first_match_in_order() -> None:
    # The shapes of the seeds' ServiceProfile routes.
    routes = [
        (Condition(method=b"GET", path_regex="/api/users/[^/]*"), "GET /api/users/{id}"),
        (Condition(all=(Condition(method=b"POST"), Condition(path_regex="/api/orders"))), "POST /api/orders"),
        (Condition(any=(Condition(path_regex="/healthz"), Condition(path_regex="/ready"))), "probes"),
        (Condition(not_=Condition(method=b"GET")), "writes"),
    ]
    assert first_matching(routes, req("/api/users/7")) == "GET /api/users/{id}"
    assert first_matching(routes, req("/api/users/7/orders")) is None  # pathRegex matches the whole path
    assert first_matching(routes, req("/api/orders", method=b"POST")) == "POST /api/orders"
    assert first_matching(routes, req("/ready")) == "probes"
    assert first_matching(routes, req("/x", method=b"DELETE")) == "writes"


@given(st.text(alphabet="/abc0", max_size=12))
def test_a_prefix_of_slash_matches_every_path(path: str) -> None:
    assert PathMatch("prefix", "/").matches("/" + path)


def test_retry_budget_floor_ratio_and_expiry() -> None:
    b = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=10, ttl=10), now=0.0)
    # No traffic: the floor alone, 10/s over 10 s.
    assert sum(b.try_withdraw(0.0) for _ in range(150)) == 100
    assert b.exhausted_total == 50
    b2 = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=0, ttl=10), now=0.0)
    for _ in range(1000):
        b2.deposit(1.0)
    assert sum(b2.try_withdraw(1.0) for _ in range(500)) == 200  # 20% of the requests
    # Past the ttl the window is empty again.
    assert not b2.try_withdraw(11.5)
    for _ in range(10):
        b2.deposit(11.5)
    assert sum(b2.try_withdraw(11.5) for _ in range(10)) == 2


def test_budget_policy_bounds() -> None:
    with pytest.raises(ValueError):
        BudgetPolicy(ttl=0.5)
    with pytest.raises(ValueError):
        BudgetPolicy(min_per_second=-1)


_PROFILE_ROUTES = (
    ("GET /users/:id", Condition(all=(Condition(method=b"GET"), Condition(path_regex=r"/users/(\d+)")))),
    ("POST /users", Condition(all=(Condition(method=b"POST"), Condition(path_regex=r"/users/?")))),
    ("any /users/*", Condition(path_regex=r"/users/(?P<rest>.*)")),
    ("DELETE", Condition(method=b"DELETE")),
    ("/health", Condition(path_regex="/health")),
    ("/health again", Condition(path_regex="/health")),
    ("/healthz", Condition(path_regex="/healthz")),
    ("dotted", Condition(path_regex=r"/a\.b/.*")),
    ("alternation", Condition(path_regex=r"/x|/ab")),
    ("/v1 or /v2", Condition(path_regex=r"/v[12]/.*")),
)


@pytest.mark.parametrize("extra", [(), (("not GET", Condition(not_=Condition(method=b"GET"))),)])
@given(method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]),
       path=st.sampled_from(["/users/12", "/users/", "/users", "/users/x/y", "/health", "/healthz", "/",
                             "/users/12?q=1", "/a.b/c", "/ab", "/v1/x", "*"]))
def test_a_profile_finds_the_same_route_with_one_regex_as_in_order(
        extra: tuple[tuple[str, Condition], ...], method: bytes, path: str) -> None:
    from tether.core.routing.profile import Profile, ProfileRoute

    profile = Profile(tuple(ProfileRoute(name, cond) for name, cond in _PROFILE_ROUTES + extra))
    assert (profile._index is None) == bool(extra)  # a `not` condition cannot be indexed
    i = profile.route_index(method, path.encode())
    expected = profile.route_for(RequestInfo(method, path.encode(), "web:80"))
    assert (profile.routes[i] if i >= 0 else None) == (expected if expected.name else None)


def test_literal_segments() -> None:
    from tether.core.routing.profile import literal_segment

    assert literal_segment(r"/users/\d+") == "users"
    assert literal_segment("/echo") == "echo"
    assert literal_segment(r"/a\.b/x") == "a.b"
    assert literal_segment("/") == ""
    for open_ended in (r"/user(s)?/x", "/ab?/x", "/x|/y", "^/x", "(?i)/x", "/v[12]/x", "/ab*"):
        assert literal_segment(open_ended) is None, open_ended


def test_literal_paths() -> None:
    from tether.core.routing.profile import literal_path

    assert literal_path("/echo") == "/echo"
    assert literal_path(r"/v1\.0/x") == "/v1.0/x"
    for pattern in ("/echo/.*", "/a|/b", r"/users/\d+", "/x?"):
        assert literal_path(pattern) is None, pattern


def test_literal_routes_are_found_by_the_path_itself() -> None:
    from tether.core.routing.profile import Profile, ProfileRoute

    profile = Profile(tuple(ProfileRoute(n, Condition(path_regex=p)) for n, p in (
        ("health", "/health"), ("healthz", "/healthz"), ("health twice", "/health"), ("user", r"/users/\d+"),
        ("get health", "/health/get"))))
    assert profile._index is not None and "health" in profile._index.literal
    found = {path: profile.route_index(b"GET", path.encode()) for path in
             ("/health", "/healthz", "/healthy", "/users/1", "/health/get", "/health?x=1")}
    assert found == {"/health": 0, "/healthz": 1, "/healthy": -1, "/users/1": 3, "/health/get": 4,
                     "/health?x=1": 0}
