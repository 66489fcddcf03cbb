"""Resources to proxy-api messages, as pure functions of a World built from YAML (the seeds' included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.api.gen import destination_pb2 as dst
from tether.control.destination import translate as tr
from tether.control.destination.world import Context, LookupError_, World, resolve
from tether.core.resources import load_text

SEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"
S = tr.Settings()

BASE = """\
apiVersion: v1
kind: Namespace
metadata: {name: production}
---
apiVersion: v1
kind: Service
metadata: {name: api-service, namespace: production}
spec:
  clusterIP: 10.96.0.10
  selector: {app: api-service}
  ports: [{name: http, port: 8080, targetPort: web}]
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: production
  annotations: {config.linkerd.io/opaque-ports: "5432"}
spec:
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: api-1, namespace: production, labels: {app: api-service, version: stable}}
spec: {serviceAccount: api, addresses: [10.0.0.1], ports: [{name: web, port: 9090}]}
---
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: api-2, namespace: production, labels: {app: api-service, version: canary}}
spec: {serviceAccount: api, addresses: [10.0.0.2], ports: [{name: web, port: 9091}]}
---
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: db-1, namespace: production, labels: {app: db}}
spec: {serviceAccount: db, addresses: [10.0.0.3]}
"""


def world(*texts: str) -> World:
    w = World()
    for i, text in enumerate(texts):
        result = load_text(text, f"doc{i}")
        assert result.ok, [str(e) for e in result.errors]
        for item in result.loaded:
            r = item.resource
            w = w.replace(r.KIND, {**w.of(r.KIND), r.key: r})
    return w


def seed(name: str) -> str:
    return (SEEDS / name).read_text()


@pytest.mark.parametrize(
    ("authority", "ctx_ns"),
    [
        ("api-service.production.svc.cluster.local:8080", None),
        ("api-service.production.svc:8080", None),
        ("api-service.production:8080", None),
        ("api-service:8080", "production"),
        ("10.96.0.10:8080", None),
    ],
)
def test_names_resolve_like_cluster_dns(authority: str, ctx_ns: str | None) -> None:
    t = resolve(world(BASE), authority, Context(namespace=ctx_ns))
    assert t.service is not None and t.service.name == "api-service" and t.port == 8080


def test_unresolvable_names_say_why() -> None:
    w = world(BASE)
    with pytest.raises(LookupError_, match="no Service named by 'api-service'"):
        resolve(w, "api-service:8080", Context(namespace="other"))
    with pytest.raises(LookupError_, match="is not a cluster service name"):
        resolve(w, "api-service:8080", Context())
    with pytest.raises(LookupError_, match="port 'x' is not a number"):
        resolve(w, "a.b:x", Context())
    with pytest.raises(LookupError_, match=r"no Service or workload has address 10\.9\.9\.9"):
        resolve(w, "10.9.9.9:80", Context())


def test_endpoints_with_identity_hint_and_labels() -> None:
    w = world(BASE)
    es = tr.endpoints(w, resolve(w, "api-service.production:8080", Context()), S)
    assert sorted(es.addrs) == ["10.0.0.1:9090", "10.0.0.2:9091"]  # the named targetPort, per workload
    a = es.addrs["10.0.0.1:9090"]
    assert a.weight == 10000
    assert a.tls_identity.dns_like_identity.name == "api.production.serviceaccount.identity.linkerd.cluster.local"
    assert a.protocol_hint.WhichOneof("protocol") == "h2"
    assert a.metric_labels["pod"] == "api-1" and a.metric_labels["serviceaccount"] == "api"
    assert es.labels == {"namespace": "production", "service": "api-service"}
    db = tr.endpoints(w, resolve(w, "db.production:5432", Context()), S).addrs["10.0.0.3:5432"]
    assert db.protocol_hint.WhichOneof("protocol") == "opaque"
    assert db.protocol_hint.opaque_transport.inbound_port == 4143


@pytest.mark.parametrize(("version", "h2"), [
    ("0.1.0", False),  # tether's previous release: does not take l5d-orig-proto, so no HTTP/2 to it
    ("v0.1.9", False),
    ("0.2.0", True),
    ("0.10.1", True),
    ("stable-2.14.10", True),  # Linkerd's proxies all do
    ("edge-24.11.8", True),
])
def test_the_h2_hint_only_for_proxies_that_downgrade(version: str, h2: bool) -> None:
    old = BASE.replace("metadata: {name: api-1, namespace: production, labels: {app: api-service, version: stable}}",
                       "metadata: {name: api-1, namespace: production, labels: {app: api-service, version: stable},"
                       f" annotations: {{linkerd.io/proxy-version: '{version}'}}}}")
    w = world(old)
    es = tr.endpoints(w, resolve(w, "api-service.production:8080", Context()), S)
    a = es.addrs["10.0.0.1:9090"]
    assert a.protocol_hint.WhichOneof("protocol") == ("h2" if h2 else None)
    assert a.tls_identity.dns_like_identity.name  # still meshed: mTLS either way
    assert es.addrs["10.0.0.2:9091"].protocol_hint.WhichOneof("protocol") == "h2"  # no annotation


OPAQUE_POD = """
---
apiVersion: v1
kind: Service
metadata: {name: tcp, namespace: production}
spec:
  selector: {app: tcp}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata:
  name: tcp-1
  namespace: production
  labels: {app: tcp}
  annotations: {config.linkerd.io/opaque-ports: "8080"}
spec: {serviceAccount: tcp, addresses: [10.0.0.9], ports: [{port: 8080}]}
"""


@pytest.mark.parametrize(("version", "legacy"), [
    (None, False), ("0.2.0", False), ("stable-2.14.10", False), ("0.1.0", True), ("v0.1.9", True),
])
def test_a_port_opaque_on_the_pod_alone_gets_the_opaque_transport_hint(version: str | None, legacy: bool) -> None:
    """As Linkerd's destination does per pod: its proxy is then dialled at its inbound port with a
    transport header; a tether proxy before 0.2.0 is marked as reading the JSON form of it."""
    text = OPAQUE_POD
    if version is not None:
        text = text.replace('annotations: {config.linkerd.io/opaque-ports: "8080"}',
                            'annotations: {config.linkerd.io/opaque-ports: "8080", '
                            f'linkerd.io/proxy-version: "{version}"}}')
    w = world(BASE + text)
    a = tr.endpoints(w, resolve(w, "tcp.production:80", Context()), S).addrs["10.0.0.9:8080"]
    assert a.protocol_hint.opaque_transport.inbound_port == 4143
    assert a.protocol_hint.opaque_transport.tether_legacy_transport_header is legacy
    # A port the pod does not list stays as it was: no opaque transport.
    other = tr.endpoints(w, resolve(w, "api-service.production:8080", Context()), S).addrs["10.0.0.1:9090"]
    assert not other.protocol_hint.HasField("opaque_transport")


def test_endpoint_updates_are_diffs() -> None:
    w = world(BASE)
    t = resolve(w, "api-service.production:8080", Context())
    first = tr.endpoints(w, t, S)
    (add,) = tr.endpoint_updates(None, first)
    assert len(add.add.addrs) == 2 and add.add.metric_labels["service"] == "api-service"
    w2 = w.replace("Workload", {k: v for k, v in w.of("Workload").items() if k[1] != "api-2"})
    second = tr.endpoints(w2, t, S)
    (remove,) = tr.endpoint_updates(first, second)
    assert [tr.format_tcp_address(a) for a in remove.remove.addrs] == ["10.0.0.2:9091"]
    assert tr.endpoint_updates(second, second) == []
    empty = tr.EndpointSet({}, {}, exists=True)
    assert tr.endpoint_updates(second, empty) == [dst.Update(no_endpoints=dst.NoEndpoints(exists=True))]


def test_seed_profile_routes_classes_retries_timeouts() -> None:
    w = world(BASE, seed("004-serviceprofile.yaml"))
    p = tr.profile(w, "api-service.production.svc.cluster.local:8080", Context(), S)
    assert p.fully_qualified_name == "api-service.production.svc.cluster.local"
    assert [r.metrics_labels["route"] for r in p.routes] == ["GET /api/users", "POST /api/users", "GET /api/users/:id"]
    get, post, by_id = p.routes
    assert [m.WhichOneof("match") for m in get.condition.all.matches] == ["path", "method"]
    assert get.condition.all.matches[0].path.regex == "/api/users"
    assert get.is_retryable and get.tether_max_retries == 3 and get.tether_retry_timeout.seconds == 1
    assert get.timeout.seconds == 5
    assert get.response_classes[0].is_failure and get.response_classes[0].condition.status.min == 500
    assert not post.is_retryable and post.timeout.seconds == 10
    assert by_id.condition.all.matches[0].path.regex == r"/api/users/\d+"
    assert abs(p.retry_budget.retry_ratio - 0.2) < 1e-6 and p.retry_budget.min_retries_per_second == 10
    assert p.retry_budget.ttl.seconds == 10
    assert p.profile_ref.resource.kind == "ServiceProfile"


def test_seed_trafficsplit_becomes_dst_overrides() -> None:
    w = world(BASE, seed("004-trafficsplit-services.yaml"))
    p = tr.profile(w, "api-service.production:8080", Context(), S)
    assert [(d.authority, d.weight) for d in p.dst_overrides] == [
        ("api-service-stable.production.svc.cluster.local:8080", 90000),
        ("api-service-canary.production.svc.cluster.local:8080", 10000),
    ]
    assert p.dst_overrides[0].backend_ref.resource.name == "api-service-stable"


def test_unknown_authority_gets_an_empty_profile() -> None:
    assert tr.profile(world(BASE), "example.com:80", Context(), S) == dst.DestinationProfile()


PAYMENTS = """\
apiVersion: v1
kind: Service
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {app: payments-api}
  ports: [{port: 8080}]
---
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: payments-api-1, namespace: payments, labels: {app: payments-api}}
spec: {serviceAccount: payments, addresses: [10.0.1.1], ports: [{port: 8080}]}
"""


def test_seed_httproute_canary_weights_and_timeouts() -> None:
    route = seed("003-httproute-canary.yaml") + "      timeouts:\n        request: 10s\n        backendRequest: 5s\n"
    w = world(PAYMENTS, route)
    pol = tr.outbound_policy(w, "payments-api.payments.svc.cluster.local:8080", None, Context(), S)
    assert pol.protocol.WhichOneof("kind") == "detect"
    (r,) = pol.protocol.detect.http1.routes
    assert r.metadata.resource.kind == "HTTPRoute" and r.metadata.resource.name == "payments-api-canary"
    (rule,) = r.rules
    assert rule.matches[0].path.prefix == "/"
    backends = rule.backends.random_available.backends
    assert [(b.backend.backend.balancer.discovery.dst.path, b.weight) for b in backends] == [
        ("payments-api-stable.payments.svc.cluster.local:8080", 90),
        ("payments-api-canary.payments.svc.cluster.local:8080", 10),
    ]
    assert rule.timeouts.request.seconds == 10
    assert backends[0].backend.requestTimeout.seconds == 5
    assert backends[0].backend.backend.queue.capacity == 100


def test_outbound_default_route_with_retry_and_timeout_annotations_and_accrual() -> None:
    svc = PAYMENTS.replace(
        "metadata: {name: payments-api, namespace: payments}",
        "metadata:\n  name: payments-api\n  namespace: payments\n  annotations:\n"
        '    retry.linkerd.io/http: "5xx"\n    retry.linkerd.io/limit: "2"\n    timeout.linkerd.io/request: 3s\n'
        "    balancer.linkerd.io/failure-accrual: consecutive\n"
        '    balancer.linkerd.io/failure-accrual-consecutive-max-failures: "5"',
    )
    pol = tr.outbound_policy(world(svc), "payments-api.payments:8080", None, Context(), S)
    h1 = pol.protocol.detect.http1
    (r,) = h1.routes
    assert r.metadata.default == "http"
    rule = r.rules[0]
    assert rule.retry.max_retries == 2
    assert [(x.start, x.end) for x in rule.retry.conditions.status_ranges] == [(500, 599)]
    assert rule.retry.max_request_bytes == 65536
    assert rule.timeouts.request.seconds == 3
    assert rule.backends.first_available.backends[0].backend.balancer.discovery.dst.path == (
        "payments-api.payments.svc.cluster.local:8080"
    )
    assert h1.failure_accrual.consecutive_failures.max_failures == 5
    assert h1.failure_accrual.consecutive_failures.backoff.max_backoff.seconds == 60


def test_grpc_route_makes_a_grpc_policy() -> None:
    route = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: greeter
  namespace: payments
  annotations: {retry.linkerd.io/grpc: unavailable, timeout.linkerd.io/request: 2s}
spec:
  parentRefs: [{name: payments-api, kind: Service, group: core, port: 8080}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
"""
    pol = tr.outbound_policy(world(PAYMENTS, route), "payments-api.payments:8080", None, Context(), S)
    (r,) = pol.protocol.grpc.routes
    rule = r.rules[0]
    assert rule.matches[0].rpc.service == "helloworld.Greeter" and rule.matches[0].rpc.method == "SayHello"
    assert rule.retry.conditions.unavailable and not rule.retry.conditions.internal
    assert rule.timeouts.request.seconds == 2


def test_outbound_for_unknown_target_is_an_error() -> None:
    with pytest.raises(LookupError_):
        tr.outbound_policy(world(PAYMENTS), "nope.payments:80", None, Context(), S)


def test_seed_authorization_inbound_server() -> None:
    w = world(PAYMENTS, seed("003-authorization.yaml"))
    srv = tr.inbound_server(w, '{"ns": "payments", "pod": "payments-api-1"}', 8080, S)
    assert srv.protocol.WhichOneof("kind") == "http2"
    assert srv.labels == {"group": "policy.linkerd.io", "kind": "server", "name": "payments-api"}
    (authz,) = srv.authorizations
    ids = authz.authentication.meshTLS.identities.identities
    assert [i.name for i in ids] == ["checkout.payments.serviceaccount.identity.linkerd.cluster.local"]
    assert authz.metadata.resource.name == "payments-api-allow-checkout"
    assert tr.inbound_server(w, "payments:payments-api-1", 8080, S) == srv  # Linkerd's older "ns:pod" form


def test_inbound_default_policy_and_server_without_authorization_denies() -> None:
    w = world(PAYMENTS)
    srv = tr.inbound_server(w, "payments:payments-api-1", 8080, S)
    assert srv.labels["kind"] == "default" and srv.labels["name"] == "all-unauthenticated"
    assert srv.protocol.WhichOneof("kind") == "detect"
    (authz,) = srv.authorizations
    assert authz.authentication.WhichOneof("permit") == "unauthenticated"
    server_only = seed("003-authorization.yaml").split("---")[0]
    denied = tr.inbound_server(world(PAYMENTS, server_only), "payments:payments-api-1", 8080, S)
    assert list(denied.authorizations) == []
    with pytest.raises(LookupError_, match="no workload payments/ghost"):
        tr.inbound_server(w, "payments:ghost", 8080, S)


EGRESS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: internet, namespace: payments}
spec:
  trafficPolicy: Deny
  networks: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
"""


def test_address_outside_the_mesh_is_forwarded_or_denied_by_egress_network() -> None:
    client = Context(namespace="payments")
    pol = tr.outbound_policy(world(PAYMENTS), None, "93.184.216.34:443", client, S)
    assert pol.metadata.default == "egress-fallback"
    (route,) = pol.protocol.detect.http1.routes
    (rb,) = route.rules[0].backends.first_available.backends
    assert tr.format_tcp_address(rb.backend.forward.addr) == "93.184.216.34:443"
    assert list(route.rules[0].filters) == []
    denied = tr.outbound_policy(world(PAYMENTS, EGRESS), None, "93.184.216.34:443", client, S)
    assert denied.metadata.resource.kind == "EgressNetwork" and denied.metadata.resource.name == "internet"
    (catch_all,) = denied.protocol.detect.http1.routes
    assert catch_all.metadata.default == "http-egress-deny"  # Linkerd's route name
    (rule,) = catch_all.rules
    assert rule.filters[0].failure_injector.status == 403
    why = rule.filters[0].failure_injector.message
    assert "93.184.216.34:443 is not allowed by EgressNetwork payments/internet" in why
    opaque = denied.protocol.detect.opaque.routes[0]
    assert opaque.metadata.default == "tcp-egress-deny"
    assert opaque.rules[0].filters[0].WhichOneof("kind") == "forbidden"
    # An excepted network is not under the EgressNetwork.
    inside = tr.outbound_policy(world(PAYMENTS, EGRESS), None, "10.200.0.1:80", client, S)
    assert inside.metadata.default == "egress-fallback"


GLOBAL_EGRESS = """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: everywhere, namespace: linkerd-egress}
spec:
  trafficPolicy: Allow
"""


def test_an_egress_network_applies_to_its_own_namespace_else_the_global_one() -> None:
    addr = "93.184.216.34:443"
    w = world(PAYMENTS, EGRESS, GLOBAL_EGRESS)
    # A client in payments sees payments' EgressNetwork, not the global one.
    own = tr.outbound_policy(w, None, addr, Context(namespace="payments"), S)
    assert (own.metadata.resource.namespace, own.metadata.resource.name) == ("payments", "internet")
    # A client elsewhere sees the global egress namespace's, whose default networks leave out
    # the cluster's networks.
    other = tr.outbound_policy(w, None, addr, Context(namespace="shop"), S)
    assert (other.metadata.resource.namespace, other.metadata.resource.name) == ("linkerd-egress", "everywhere")
    assert other.protocol.detect.http1.routes[0].metadata.default == "http-egress-allow"
    inside = tr.outbound_policy(w, None, "10.9.9.9:80", Context(namespace="shop"), S)
    assert inside.metadata.default == "egress-fallback"
    # Only payments' EgressNetworks count for its clients, even one that does not cover the address.
    assert tr.outbound_policy(w, None, "10.9.9.9:80", Context(namespace="payments"), S).metadata.default == (
        "egress-fallback")
    # The global namespace is a setting.
    moved = tr.Settings(global_egress_ns="egress")
    assert tr.outbound_policy(w, None, addr, Context(namespace="shop"), moved).metadata.default == "egress-fallback"


def test_the_most_specific_egress_network_wins_then_the_oldest() -> None:
    nets = """apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: b-wide, namespace: payments, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {trafficPolicy: Allow, networks: [{cidr: 93.184.0.0/16}]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: c-narrow-new, namespace: payments, creationTimestamp: "2026-03-01T00:00:00Z"}
spec: {trafficPolicy: Deny, networks: [{cidr: 93.184.216.0/24}]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: d-narrow-old, namespace: payments, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {trafficPolicy: Deny, networks: [{cidr: 93.184.216.0/24}]}
"""
    pol = tr.outbound_policy(world(PAYMENTS, nets), None, "93.184.216.34:443", Context(namespace="payments"), S)
    assert pol.metadata.resource.name == "d-narrow-old"
    pol = tr.outbound_policy(world(PAYMENTS, nets), None, "93.184.1.1:443", Context(namespace="payments"), S)
    assert pol.metadata.resource.name == "b-wide"


EGRESS_ROUTES = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-allowed, namespace: payments}
spec:
  parentRefs: [{name: internet, kind: EgressNetwork, group: policy.linkerd.io}]
  hostnames: [api.example.com]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs: [{name: internet, kind: EgressNetwork, group: policy.linkerd.io}]
    - matches: [{path: {type: PathPrefix, value: /internal}}]
      backendRefs: [{name: payments-api, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /elsewhere}}]
      backendRefs: [{name: other, kind: EgressNetwork, group: policy.linkerd.io}]
"""


def test_routes_attached_to_an_egress_network_decide_before_its_traffic_policy() -> None:
    pol = tr.outbound_policy(world(PAYMENTS, EGRESS, EGRESS_ROUTES), None, "93.184.216.34:443",
                             Context(namespace="payments"), S)
    routed, catch_all = pol.protocol.detect.http1.routes
    assert routed.metadata.resource.name == "api-allowed" and routed.hosts[0].exact == "api.example.com"
    assert catch_all.metadata.default == "http-egress-deny"
    to_self, to_service, to_other = (r.backends.random_available.backends[0].backend for r in routed.rules)
    # The EgressNetwork itself as the backend: forwarded to the original destination.
    assert tr.format_tcp_address(to_self.backend.forward.addr) == "93.184.216.34:443"
    assert to_self.backend.metadata.resource.kind == "EgressNetwork"
    # A Service as the backend: egress traffic sent into the mesh instead.
    assert to_service.backend.balancer.discovery.dst.path == "payments-api.payments.svc.cluster.local:8080"
    # Another EgressNetwork: an invalid backend that answers 500 saying why.
    assert to_other.backend.WhichOneof("kind") is None
    assert to_other.filters[0].failure_injector.status == 500
    assert "needs that EgressNetwork as its parent" in to_other.filters[0].failure_injector.message
    # A Service's routes never take an EgressNetwork backend.
    svc_route = EGRESS_ROUTES.replace("{name: internet, kind: EgressNetwork, group: policy.linkerd.io}]\n  host",
                                      "{name: payments-api, kind: Service, port: 8080}]\n  host")
    svc = tr.outbound_policy(world(PAYMENTS, EGRESS, svc_route), "payments-api.payments.svc.cluster.local:8080",
                             None, Context(namespace="payments"), S)
    first = svc.protocol.detect.http1.routes[0].rules[0].backends.random_available.backends[0]
    assert "EgressNetwork parents only" in first.backend.filters[0].failure_injector.message


def test_workload_address_is_forwarded_with_its_identity() -> None:
    pol = tr.outbound_policy(world(PAYMENTS), None, "10.0.1.1:8080", Context(), S)
    assert pol.metadata.resource.kind == "Workload"
    fwd = pol.protocol.detect.http1.routes[0].rules[0].backends.first_available.backends[0].backend.forward
    assert fwd.tls_identity.dns_like_identity.name == "payments.payments.serviceaccount.identity.linkerd.cluster.local"


def test_inbound_routes_on_a_server_with_their_authorizations() -> None:
    server = """\
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: grpc, namespace: payments}
spec: {podSelector: {matchLabels: {app: payments-api}}, port: 8080, proxyProtocol: gRPC}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: say-hello, namespace: payments}
spec:
  parentRefs: [{name: grpc, kind: Server, group: policy.linkerd.io}]
  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: hello-from-anyone, namespace: payments}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: GRPCRoute, name: say-hello}
  requiredAuthenticationRefs: [{group: policy.linkerd.io, kind: NetworkAuthentication, name: all}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: all, namespace: payments}
spec:
  networks: [{cidr: 0.0.0.0/0}]
"""
    srv = tr.inbound_server(world(PAYMENTS, server), "payments:payments-api-1", 8080, S)
    (route,) = srv.protocol.grpc.routes
    assert route.metadata.resource.name == "say-hello"
    assert route.rules[0].matches[0].rpc.method == "SayHello"
    (authz,) = route.authorizations
    assert authz.authentication.WhichOneof("permit") == "unauthenticated"
    assert list(srv.authorizations) == []  # the Server itself authorizes nobody


def _messages(msg: object, type_name: str) -> list[object]:
    """Every message of ``type_name`` (a protobuf full name) inside ``msg``."""
    found: list[object] = []
    stack = [msg]
    while stack:
        m = stack.pop()
        if m.DESCRIPTOR.full_name == type_name:  # type: ignore[attr-defined]
            found.append(m)
        for fd, value in m.ListFields():  # type: ignore[attr-defined]
            if fd.message_type is None:
                continue
            stack.extend(value if fd.is_repeated else [value])
    return found


def test_every_outbound_backend_has_its_queue_and_every_resource_its_group() -> None:
    # What Linkerd's proxy refuses a whole policy for ("missing queue", "group must not be empty"):
    # forwarded addresses, balanced Services, routes with a backend that can only fail, egress denials.
    canary = seed("003-httproute-canary.yaml")
    bad_ref = canary.replace("- name: payments-api-canary\n          port",
                             "- name: payments-api-canary\n          kind: Pod\n          port")
    assert bad_ref != canary
    client = Context(namespace="payments")
    policies = [
        tr.outbound_policy(world(PAYMENTS), None, "93.184.216.34:443", client, S),
        tr.outbound_policy(world(PAYMENTS, EGRESS), None, "93.184.216.34:443", client, S),
        tr.outbound_policy(world(PAYMENTS, seed("003-httproute-canary.yaml")),
                           "payments-api.payments.svc.cluster.local:8080", None, Context(), S),
        tr.outbound_policy(world(PAYMENTS, bad_ref), "payments-api.payments.svc.cluster.local:8080", None,
                           Context(), S),
    ]
    backends = [b for p in policies for b in _messages(p, "io.linkerd.proxy.outbound.Backend")]
    assert len(backends) >= 8
    assert all(b.HasField("queue") and b.queue.capacity > 0 for b in backends)  # type: ignore[attr-defined]
    resources = [r for p in policies for r in _messages(p, "io.linkerd.proxy.meta.Resource")]
    assert resources and all(r.group for r in resources), resources  # type: ignore[attr-defined]
    assert any(r.group == "core" and r.kind == "Service" for r in resources)  # type: ignore[attr-defined]
