"""Resource models: the seeds' YAML loads as written; each kind of bad input gets a located message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.core.resources import KINDS, kind_named, load_text, parse_duration, parse_quantity
from tether.core.resources.profile import ServiceProfile
from tether.core.resources.route import HTTPRoute
from tether.core.resources.split import TrafficSplit

SEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"


def load(text: str, source: str = "f.yaml"):  # type: ignore[no-untyped-def]
    return load_text(text, source)


def one_error(text: str) -> str:
    result = load(text)
    assert not result.loaded, result.loaded
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    return str(result.errors[0])


@pytest.mark.parametrize("path", sorted(p.name for p in SEEDS.glob("*.yaml") if "ratelimit" not in p.name))
def test_every_seed_resource_loads(path: str) -> None:
    result = load_text((SEEDS / path).read_text(), path)
    assert result.errors == ()
    assert result.loaded


def test_seed_serviceprofile_fields_and_retries_notice() -> None:
    result = load_text((SEEDS / "004-serviceprofile.yaml").read_text(), "sp.yaml")
    (item,) = result.loaded
    sp = item.resource
    assert isinstance(sp, ServiceProfile)
    assert sp.name == "api-service.production.svc.cluster.local"
    routes = sp.spec.routes
    assert [r.name for r in routes] == ["GET /api/users", "POST /api/users", "GET /api/users/:id"]
    assert routes[0].retryable and routes[0].retries is not None and routes[0].retries.limit == 3
    assert not routes[1].retryable
    assert routes[2].condition.path_regex == r"/api/users/\d+"
    assert routes[0].response_classes[0].condition.status is not None
    assert routes[0].response_classes[0].is_failure
    # Both retried routes say what Linkerd would have done; the POST route says nothing.
    assert len(item.notices) == 2
    assert all("Linkerd rejects spec.routes[].retries" in n for n in item.notices)
    assert item.notices[0].startswith(
        "ServiceProfile production/api-service.production.svc.cluster.local: route 'GET /api/users'"
    )


def test_seed_v1beta3_authorization_is_accepted_with_a_notice() -> None:
    result = load_text((SEEDS / "003-authorization.yaml").read_text(), "authz.yaml")
    kinds = [i.resource.KIND for i in result.loaded]
    assert kinds == ["Server", "AuthorizationPolicy", "MeshTLSAuthentication"]
    notices = [n for i in result.loaded for n in i.notices]
    assert len(notices) == 2
    assert all("policy.linkerd.io/v1alpha1" in n and "deny-all" in n for n in notices)


def test_seed_gateway_httproute_with_core_group_parent() -> None:
    (item,) = load_text((SEEDS / "003-httproute-canary.yaml").read_text(), "r.yaml").loaded
    route = item.resource
    assert isinstance(route, HTTPRoute)
    assert route.spec.parent_refs[0].is_service
    assert [(b.name, b.weight) for b in route.spec.rules[0].backend_refs] == [
        ("payments-api-stable", 90),
        ("payments-api-canary", 10),
    ]


def test_seed_gateway_timeouts_are_applied_with_a_notice() -> None:
    text = (
        SEEDS / "003-httproute-canary.yaml"
    ).read_text() + "      timeouts:\n        request: 10s\n        backendRequest: 5s\n"
    (item,) = load_text(text, "r.yaml").loaded
    route = item.resource
    assert isinstance(route, HTTPRoute)
    assert route.spec.rules[0].timeouts is not None
    assert route.spec.rules[0].timeouts.backend_request == "5s"
    assert len(item.notices) == 1 and "Linkerd stores them" in item.notices[0]


def test_seed_trafficsplit_v1alpha2_notice() -> None:
    result = load_text((SEEDS / "004-trafficsplit-services.yaml").read_text(), "ts.yaml")
    split = result.loaded[0].resource
    assert isinstance(split, TrafficSplit)
    assert [(b.service, b.weight_value) for b in split.spec.backends] == [
        ("api-service-stable", 90.0),
        ("api-service-canary", 10.0),
    ]
    assert "linkerd-smi" in result.loaded[0].notices[0]


def test_seed_ratelimit_for_retries_is_refused_with_the_fix() -> None:
    msg = one_error((SEEDS / "003-ratelimit-for-retries.yaml").read_text())
    assert msg.startswith("f.yaml: document 1 (HTTPLocalRateLimitPolicy payments/payments-retry): spec: ")
    assert "spec.targetRef is required (a Server)" in msg
    assert "retry.linkerd.io/*" in msg


SP = """\
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: web.prod.svc.cluster.local
  namespace: prod
spec:
  routes:
  - name: ok
    condition: {method: GET, pathRegex: /ok}
  - name: bad
    condition:
      pathRegex: {REGEX}
"""


def test_invalid_regex_names_document_kind_and_field() -> None:
    result = load("kind: Namespace\napiVersion: v1\nmetadata: {name: a}\n---\n" + SP.replace("{REGEX}", "'/a('"))
    assert [i.resource.KIND for i in result.loaded] == ["Namespace"]
    (err,) = result.errors
    assert str(err).startswith(
        "f.yaml: document 2 (ServiceProfile prod/web.prod.svc.cluster.local): "
        "spec.routes[1].condition.pathRegex: invalid regular expression '/a(': missing )"
    )


def test_unknown_field_is_refused() -> None:
    text = SP.replace("{REGEX}", "/b").replace("  - name: ok\n", "  - name: ok\n    isRetriable: true\n")
    assert one_error(text).endswith("spec.routes[0].isRetriable: unknown field")


def test_unknown_top_level_field() -> None:
    text = SP.replace("{REGEX}", "/b") + "extra: 1\n"
    assert one_error(text).endswith("(ServiceProfile prod/web.prod.svc.cluster.local): extra: unknown field")


def test_missing_required_field() -> None:
    text = SP.replace("{REGEX}", "/b").replace("  - name: bad\n", "  -\n")
    assert one_error(text).endswith("spec.routes[1].name: required field is missing")


def test_bad_duration() -> None:
    text = SP.replace("{REGEX}", "/b").replace("  - name: ok\n", "  - name: ok\n    timeout: 5 seconds\n")
    msg = one_error(text)
    assert "spec.routes[0].timeout: invalid duration '5 seconds'" in msg


def test_empty_condition() -> None:
    text = SP.replace("    condition:\n      pathRegex: {REGEX}\n", "    condition: {}\n")
    assert one_error(text).endswith(
        "spec.routes[1].condition: a condition needs at least one of pathRegex, method, all, any, not"
    )


def test_status_range_inverted() -> None:
    text = (
        SP.replace("{REGEX}", "/b")
        + "    responseClasses:\n    - condition: {status: {min: 599, max: 500}}\n      isFailure: true\n"
    )
    assert one_error(text).endswith(
        "spec.routes[1].responseClasses[0].condition.status: status range 599-500: min is greater than max"
    )


def test_retries_contradicting_is_retryable() -> None:
    text = SP.replace("{REGEX}", "/b") + "    isRetryable: false\n    retries: {limit: 2}\n"
    assert one_error(text).endswith(
        "spec.routes[1]: retries: contradicts isRetryable: false (remove one; Linkerd's field is isRetryable)"
    )


def test_unserved_api_version() -> None:
    msg = one_error(SP.replace("linkerd.io/v1alpha2", "linkerd.io/v1alpha1").replace("{REGEX}", "/b"))
    assert msg.endswith(
        "apiVersion: 'linkerd.io/v1alpha1' is not served for ServiceProfile (served: linkerd.io/v1alpha2)"
    )


def test_unknown_kind() -> None:
    msg = one_error("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    assert msg.startswith(
        "f.yaml: document 1 (Deployment default/web): kind: 'Deployment' (apps/v1) is not a kind tether reads"
    )


def test_invalid_yaml_gives_line() -> None:
    msg = one_error("kind: Service\nmetadata: [a\n")
    assert msg.startswith("f.yaml: invalid YAML: line ")


def test_not_a_mapping() -> None:
    assert (
        one_error("- a\n- b\n")
        == "f.yaml: document 1: not an object (a mapping with apiVersion, kind, metadata); got list"
    )


def test_bad_name() -> None:
    msg = one_error("apiVersion: v1\nkind: Service\nmetadata: {name: Web_1}\n")
    assert msg.endswith("metadata.name: 'Web_1' is not a valid name (lowercase a-z, 0-9, '-', '.', at most 253)")


def test_cluster_scoped_with_namespace() -> None:
    msg = one_error("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, namespace: b}\n")
    assert msg.endswith("metadata.namespace: Namespace is cluster-scoped: remove the namespace")


def test_service_port_out_of_range_and_target_port_name() -> None:
    msg = one_error("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 70000}]\n")
    assert msg.endswith("spec.ports[0].port: port 70000 is out of range 1-65535")
    ok = load(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n"
        "  ports: [{port: 80, targetPort: http, appProtocol: kubernetes.io/h2c}]\n"
    )
    assert ok.ok


def test_server_needs_exactly_one_selector() -> None:
    text = (
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: s, namespace: n}\n"
        "spec: {port: 8080, podSelector: {matchLabels: {a: b}}, externalWorkloadSelector: {matchLabels: {a: b}}}\n"
    )
    assert one_error(text).endswith("spec: exactly one of podSelector and externalWorkloadSelector is required")


def test_server_bad_proxy_protocol() -> None:
    text = (
        "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: s, namespace: n}\n"
        "spec: {port: 8080, podSelector: {}, proxyProtocol: HTTP/3}\n"
    )
    assert "spec.proxyProtocol: Input should be 'unknown', 'HTTP/1', 'HTTP/2', 'gRPC', 'opaque' or 'TLS'" in one_error(
        text
    )


def test_network_authentication_bad_cidr() -> None:
    text = (
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\nmetadata: {name: a, namespace: n}\n"
        "spec:\n  networks:\n  - cidr: 10.0.0.0/33\n"
    )
    assert one_error(text).endswith(
        "spec.networks[0].cidr: invalid CIDR '10.0.0.0/33': want an address/prefix such as 10.0.0.0/8"
    )


def test_trafficsplit_v1alpha2_weight_must_be_integer_and_nonzero() -> None:
    base = (
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {name: t}\n"
        "spec:\n  service: a\n  backends:\n"
    )
    assert one_error(base + "  - {service: b, weight: 500m}\n").endswith(
        "spec.backends[0].weight: v1alpha2 weights are integers, got '500m'"
    )
    assert one_error(base + "  - {service: b, weight: 0}\n").endswith(
        "spec.backends: the weights add up to 0, so no backend would get traffic"
    )
    v1 = base.replace("v1alpha2", "v1alpha1") + "  - {service: b, weight: 500m}\n  - {service: c, weight: 1}\n"
    split = load(v1).loaded[0].resource
    assert isinstance(split, TrafficSplit)
    assert [b.weight_value for b in split.spec.backends] == [0.5, 1.0]


def test_httproute_regex_path_and_filter_checks() -> None:
    base = (
        "apiVersion: policy.linkerd.io/v1beta3\nkind: HTTPRoute\nmetadata: {name: r, namespace: n}\n"
        "spec:\n  parentRefs: [{name: web, kind: Service, group: core, port: 80}]\n  rules:\n"
    )
    bad_re = base + "  - matches: [{path: {type: RegularExpression, value: '/x['}}]\n"
    assert "spec.rules[0].matches[0].path: invalid regular expression '/x['" in one_error(bad_re)
    no_slash = base + "  - matches: [{path: {type: Exact, value: x}}]\n"
    assert one_error(no_slash).endswith("spec.rules[0].matches[0].path: path 'x' must start with '/'")
    no_body = base + "  - filters: [{type: RequestHeaderModifier}]\n"
    assert one_error(no_body).endswith(
        "spec.rules[0].filters[0]: type RequestHeaderModifier needs the requestHeaderModifier field"
    )


def test_authorization_policy_bad_target_kind() -> None:
    text = (
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: n}\n"
        "spec: {targetRef: {kind: Pod, name: x}, requiredAuthenticationRefs: []}\n"
    )
    assert one_error(text).endswith("spec: targetRef.kind 'Pod': want Server, HTTPRoute, GRPCRoute or Namespace")


def test_duplicate_object_in_one_file() -> None:
    doc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
    result = load(doc + "---\n" + doc)
    assert [str(e) for e in result.errors] == [
        "f.yaml: document 2 (Service default/web): metadata.name: same Service as document 1"
    ]


def test_kind_names_and_helpers() -> None:
    assert kind_named("sp").KIND == "ServiceProfile"
    assert kind_named("serviceprofiles").KIND == "ServiceProfile"
    assert kind_named("HTTPRoute").KIND == "HTTPRoute"
    with pytest.raises(ValueError, match="unknown kind 'bogus'"):
        kind_named("bogus")
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_quantity("500m") == 0.5
    assert len(KINDS) == 16


def test_round_trip_dump() -> None:
    (item,) = load_text((SEEDS / "004-serviceprofile.yaml").read_text(), "sp.yaml").loaded
    again = load_text(__import__("yaml").safe_dump(item.resource.dump()), "again.yaml")
    assert again.ok and again.loaded[0].resource == item.resource


def test_a_control_character_in_the_yaml_is_a_one_line_error() -> None:
    # Found by the resources fuzz target: PyYAML's reader error spans two lines.
    result = load_text("kind: Service\x00\n", "bad.yaml")
    (err,) = result.errors
    assert str(err).startswith("bad.yaml: invalid YAML: unacceptable character #x0000")
    assert "\n" not in str(err)


def test_a_kind_spanning_lines_is_shown_escaped_on_one_line() -> None:
    # Found by the resources fuzz target: a plain scalar may continue on the next line.
    result = load_text("apiVersion: v1\nkind: List\n\n  namite:e\n", "bad.yaml")
    (err,) = result.errors
    assert "\n" not in str(err)
    assert "(List\\nnamite:e)" in str(err)


def test_a_response_header_modifier_on_a_server_route_is_said_not_applied() -> None:
    text = """\
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{name: web-http, kind: Server, group: policy.linkerd.io}]
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-a, value: b}]}
"""
    (item,) = load_text(text, "route.yaml").loaded
    assert any("ResponseHeaderModifier is not applied on a Server's routes" in n for n in item.notices)
    (svc_item,) = load_text(text.replace("kind: Server, group: policy.linkerd.io", "kind: Service"), "r.yaml").loaded
    assert not svc_item.notices
