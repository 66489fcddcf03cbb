"""OutboundPolicy messages read into the proxy's route model, and the rule-level layers alone."""

from __future__ import annotations

import asyncio

import pytest

from tether.api.gen import grpc_route_pb2, http_route_pb2, meta_pb2, outbound_lite, outbound_pb2
from tether.core.routing.http_match import RequestInfo, select_rule
from tether.core.routing.policy import ClientPolicy, FailureInjector, Filters, HeaderModifier, Meta, Redirect
from tether.proxy.http.body import BytesBody
from tether.proxy.http.message import Request, Response
from tether.proxy.layers.policy_routes import ApplyFilters, Measure, PolicyRouteMetrics
from tether.proxy.policy import PolicyError
from tether.proxy.policy import client_policy_of as _client_policy_of


def client_policy_of(p: outbound_pb2.OutboundPolicy, port: int = 0) -> ClientPolicy:
    """The policy as the proxy reads it: the control plane's bytes decoded by protolite."""
    return _client_policy_of(outbound_lite.OutboundPolicy.FromString(p.SerializeToString()), port)

out = outbound_pb2


def _backend(name: str, weight: int) -> out.HttpRoute.WeightedRouteBackend:
    b = out.Backend(metadata=meta_pb2.Metadata(resource=meta_pb2.Resource(kind="Service", name=name, port=80)),
                    balancer=out.Backend.BalanceP2c(discovery=out.Backend.EndpointDiscovery(
                        dst=out.Backend.EndpointDiscovery.DestinationGet(path=f"{name}.ns.svc.cluster.local:80"))))
    return out.HttpRoute.WeightedRouteBackend(backend=out.HttpRoute.RouteBackend(backend=b), weight=weight)


def _http_policy(*rules: out.HttpRoute.Rule) -> out.OutboundPolicy:
    route = out.HttpRoute(metadata=meta_pb2.Metadata(resource=meta_pb2.Resource(
        group="gateway.networking.k8s.io", kind="HTTPRoute", name="web", namespace="ns")), rules=list(rules))
    p = out.OutboundPolicy(metadata=meta_pb2.Metadata(resource=meta_pb2.Resource(
        kind="Service", name="web", namespace="ns", port=80)))
    p.protocol.detect.http1.routes.append(route)
    return p


def _rule(path: str, kind: str = "prefix", **extra: object) -> out.HttpRoute.Rule:
    m = http_route_pb2.HttpRouteMatch(path=http_route_pb2.PathMatch(**{kind: path}))
    return out.HttpRoute.Rule(matches=[m], backends=out.HttpRoute.Distribution(
        random_available=out.HttpRoute.Distribution.RandomAvailable(backends=[_backend("web", 90),
                                                                              _backend("canary", 10)])), **extra)


def test_rules_backends_timeouts_and_retries_are_read() -> None:
    retry = out.HttpRoute.Retry(max_retries=2, conditions=out.HttpRoute.Retry.Conditions(
        status_ranges=[out.HttpRoute.Retry.Conditions.StatusRange(start=500, end=599)]))
    timeouts = http_route_pb2.Timeouts()
    timeouts.request.FromMilliseconds(1500)
    policy = client_policy_of(_http_policy(_rule("/api", retry=retry, timeouts=timeouts), _rule("/api/v2", "exact")))
    assert policy.parent == Meta("", "Service", "ns", "web", "", 80)
    assert policy.protocol == "http"
    rule = select_rule(policy.routes, RequestInfo(b"GET", b"/api/users", "web:80"))
    assert rule is not None
    r = rule[0]
    assert r.route.kind == "HTTPRoute" and r.route.name == "web"
    assert [(b.authority, b.weight) for b in r.backends] == [("web.ns.svc.cluster.local:80", 90),
                                                            ("canary.ns.svc.cluster.local:80", 10)]
    assert r.request_timeout == 1.5
    assert r.retry is not None and r.retry.limit == 2 and r.retry.retries_status(503)
    assert not r.retry.retries_status(404)
    exact = select_rule(policy.routes, RequestInfo(b"GET", b"/api/v2", "web:80"))
    assert exact is not None and exact[0].retry is None  # the exact match is more specific


def test_grpc_matches_become_path_matches_and_codes_are_read() -> None:
    rule = out.GrpcRoute.Rule(
        matches=[grpc_route_pb2.GrpcRouteMatch(rpc=grpc_route_pb2.GrpcRpcMatch(service="pkg.Svc"))],
        retry=out.GrpcRoute.Retry(max_retries=1, conditions=out.GrpcRoute.Retry.Conditions(unavailable=True)))
    p = out.OutboundPolicy(metadata=meta_pb2.Metadata(default="grpc"))
    p.protocol.grpc.routes.append(out.GrpcRoute(metadata=meta_pb2.Metadata(default="grpc"), rules=[rule]))
    policy = client_policy_of(p)
    assert policy.grpc
    hit = select_rule(policy.routes, RequestInfo(b"POST", b"/pkg.Svc/Get", "svc:50051"))
    assert hit is not None and hit[0].retry is not None
    assert hit[0].retry.grpc_codes == frozenset({14})
    assert select_rule(policy.routes, RequestInfo(b"POST", b"/pkg.Other/Get", "svc:50051")) is None


def test_an_invalid_regex_is_refused_with_the_route_named() -> None:
    with pytest.raises(PolicyError, match="web"):
        client_policy_of(_http_policy(_rule("/api/(", "regex")))


def test_header_and_query_matches_are_read_and_one_without_a_value_is_refused() -> None:
    rule = _rule("/api")
    m = rule.matches[0]
    m.headers.append(http_route_pb2.HeaderMatch(name="x-canary", exact=b"yes"))
    m.query_params.append(http_route_pb2.QueryParamMatch(name="v", regex="^2"))
    policy = client_policy_of(_http_policy(rule))
    assert select_rule(policy.routes, RequestInfo(b"GET", b"/api?v=2", "web:80", [(b"x-canary", b"yes")]))
    assert select_rule(policy.routes, RequestInfo(b"GET", b"/api?v=2", "web:80", [(b"x-canary", b"no")])) is None
    assert select_rule(policy.routes, RequestInfo(b"GET", b"/api?v=1", "web:80", [(b"x-canary", b"yes")])) is None
    m.headers.append(http_route_pb2.HeaderMatch(name="x-empty"))
    with pytest.raises(PolicyError, match=r"x-empty.*no value"):
        client_policy_of(_http_policy(rule))


def test_header_modifier_and_redirect() -> None:
    mod = HeaderModifier(add=((b"x-a", b"1"),), set=((b"x-b", b"2"),), remove=(b"x-c",))
    assert mod.apply([(b"x-b", b"old"), (b"x-c", b"gone"), (b"host", b"h")]) == [
        (b"host", b"h"), (b"x-b", b"2"), (b"x-a", b"1")]
    r = Redirect(status=301, host="new.example", prefix="/v2")
    assert r.location("http", "old.example:8080", "/v1/users", "/v1") == "http://new.example/v2/users"
    assert Redirect(port=8443, scheme="https").location("http", "h:80", "/x", None) == "https://h:8443/x"


def _call(svc: object, req: Request) -> Response:
    return asyncio.run(svc(req))  # type: ignore[operator]


async def _ok(req: Request) -> Response:
    return Response(200, [(b"x-seen", req.header(b"x-route") or b"")], BytesBody(b"ok"))


def test_an_injected_failure_answers_without_calling_the_backend() -> None:
    calls = []

    async def backend(req: Request) -> Response:
        calls.append(req)
        return await _ok(req)

    svc = ApplyFilters(backend, Filters(failure=FailureInjector(503, "chaos")), grpc=False)
    rsp = _call(svc, Request(b"GET", b"/", b"web"))
    assert rsp.status == 503 and rsp.header(b"l5d-proxy-error") == b"chaos"
    grpc_svc = ApplyFilters(backend, Filters(failure=FailureInjector(14, "chaos")), grpc=True)
    rsp = _call(grpc_svc, Request(b"POST", b"/a/b", b"web", headers=[(b"content-type", b"application/grpc")],
                                  version="2"))
    assert rsp.header(b"grpc-status") == b"14"
    assert calls == []


def test_measure_counts_statuses_and_errors() -> None:
    metrics = PolicyRouteMetrics()
    series = metrics.request("http", 'parent_name="web"')
    assert _call(Measure(_ok, series, grpc=False), Request(b"GET", b"/", b"web")).status == 200

    async def boom(req: Request) -> Response:
        from tether.proxy.errors import ResponseTimeoutError
        raise ResponseTimeoutError("response timeout after 1s")

    with pytest.raises(Exception, match="timeout"):
        _call(Measure(boom, series, grpc=False), Request(b"GET", b"/", b"web"))
    assert series.statuses == {(200, ""): 1, (None, "REQUEST_TIMEOUT"): 1}
    text = "".join(metrics.lines())
    assert 'outbound_http_route_request_statuses_total{parent_name="web",http_status="200",error=""} 1' in text
    assert 'outbound_http_route_request_duration_seconds_count{parent_name="web"} 2' in text


def test_l5d_request_headers_amend_a_rule_and_bad_values_are_ignored() -> None:
    policy = client_policy_of(_http_policy(_rule("/")))
    hit = select_rule(policy.routes, RequestInfo(b"GET", b"/x", "web:80"))
    assert hit is not None
    rule = hit[0]
    amended = rule.with_request_headers({b"l5d-retry-limit": b"2", b"l5d-retry-http": b"5xx,429",
                                         b"l5d-timeout": b"250ms", b"l5d-retry-timeout": b"nonsense"}, grpc=False)
    assert amended.retry is not None and amended.retry.limit == 2
    assert amended.retry.retries_status(429) and amended.retry.retries_status(502)
    assert amended.retry.per_try_timeout is None  # "nonsense" is not a duration: ignored
    assert amended.request_timeout == 0.25
    assert rule.retry is None and rule.request_timeout is None  # the rule itself is unchanged
    grpc = rule.with_request_headers({b"l5d-retry-grpc": b"unavailable"}, grpc=True)
    assert grpc.retry is not None and grpc.retry.grpc_codes == frozenset({14})


def test_a_denying_forward_policy_is_forbidden_for_opaque_and_applies_to_http() -> None:
    from tether.api.gen import opaque_route_pb2

    p = _http_policy(_rule("/"))
    p.metadata.CopyFrom(meta_pb2.Metadata(resource=meta_pb2.Resource(
        group="policy.linkerd.io", kind="EgressNetwork", name="outside", namespace="ns", port=443)))
    p.protocol.detect.opaque.routes.append(out.OpaqueRoute(rules=[out.OpaqueRoute.Rule(
        filters=[out.OpaqueRoute.Filter(forbidden=opaque_route_pb2.Forbidden())])]))
    policy = client_policy_of(p)
    assert policy.forbidden == "traffic forbidden by EgressNetwork ns/outside"
    assert policy.applies
    default = out.OutboundPolicy(metadata=meta_pb2.Metadata(default="egress-fallback"))
    default.protocol.detect.http1.routes.append(out.HttpRoute(rules=[_rule("/")]))
    assert not client_policy_of(default).applies  # a forwarding default leaves the plain path alone
    assert client_policy_of(default).forbidden is None


def test_an_invalid_backend_is_read_as_its_failure_and_a_bare_one_is_refused() -> None:
    """Linkerd's controller encodes a backendRef it cannot serve as a backend without a kind whose
    failure filter answers 500: the rule keeps its other backends."""
    bad = out.HttpRoute.RouteBackend(
        backend=out.Backend(metadata=meta_pb2.Metadata(resource=meta_pb2.Resource(kind="EgressNetwork", name="x"))),
        filters=[out.HttpRoute.Filter(failure_injector=http_route_pb2.HttpFailureInjector(
            status=500, message="EgressNetwork backends attach to EgressNetwork parents only"))])
    rule = out.HttpRoute.Rule(
        matches=[http_route_pb2.HttpRouteMatch(path=http_route_pb2.PathMatch(prefix="/"))],
        backends=out.HttpRoute.Distribution(random_available=out.HttpRoute.Distribution.RandomAvailable(
            backends=[_backend("web", 90), out.HttpRoute.WeightedRouteBackend(backend=bad, weight=10)])))
    policy = client_policy_of(_http_policy(rule))
    (good, invalid) = policy.routes[0].rules[0].value.backends
    assert good.authority == "web.ns.svc.cluster.local:80"
    assert invalid.authority is None and invalid.forward is None and invalid.weight == 10
    assert invalid.filters.failure is not None and invalid.filters.failure.status == 500
    assert "parents only" in invalid.filters.failure.message
    # Without a failure filter there is nothing to answer with: the policy is refused.
    del rule.backends.random_available.backends[1].backend.filters[:]
    with pytest.raises(PolicyError, match="no forward address and no balancer"):
        client_policy_of(_http_policy(rule))
