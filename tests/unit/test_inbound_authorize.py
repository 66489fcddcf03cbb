"""The proxy's inbound policy: inbound.Server messages (as the controller translates real YAML) to the
port's policy, and the authorization layer over a fake inner service."""

from __future__ import annotations

import asyncio

import pytest

from tether.api.gen import inbound_lite
from tether.api.gen import inbound_pb2 as inb
from tether.control.destination import translate as tr
from tether.control.destination.world import World
from tether.core.policy.authz import PolicyError
from tether.core.resources import load_text
from tether.proxy.http.message import Connection, Request
from tether.proxy.inbound.authorize import Authorizer, HttpAuthorize, looks_like_http
from tether.proxy.inbound.policy import PortPolicy, default_port_policy
from tether.proxy.inbound.policy_source import StaticPolicy
from tether.proxy.inbound.policy_wire import port_policy as _port_policy
from tether.testing.fakes import FakeClock, FakeService


def port_policy(msg: inb.Server, permit_localhost: bool = True) -> PortPolicy:
    """The port's policy as the proxy reads it: the control plane's bytes decoded by protolite."""
    return _port_policy(inbound_lite.Server.FromString(msg.SerializeToString()), permit_localhost)

S = tr.Settings(cluster_networks=("10.0.0.0/8",))
CLIENT = "client.shop.serviceaccount.identity.linkerd.cluster.local"
OTHER = "other.shop.serviceaccount.identity.linkerd.cluster.local"
TARGET = ("127.0.0.1", 8080)

BASE = """\
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, addresses: [10.0.0.5], ports: [{name: http, port: 8080}]}
"""

LOCKED = """\
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web, namespace: shop}
spec: {podSelector: {matchLabels: {app: web}}, port: http, proxyProtocol: HTTP/1}
---
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: admin, namespace: shop}
spec:
  parentRefs: [{name: web, kind: Server, group: policy.linkerd.io}]
  rules: [{matches: [{path: {type: PathPrefix, value: /admin}, method: GET}]}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: shop-clients, namespace: shop}
spec: {identities: ["*.shop.serviceaccount.identity.linkerd.cluster.local"]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: client-only, namespace: shop}
spec: {identityRefs: [{kind: ServiceAccount, name: client}]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: admin-from-client, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: HTTPRoute, name: admin}
  requiredAuthenticationRefs: [{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: client-only}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: web-rl, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web}
  total: {requestsPerSecond: 3}
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


def policy_of(*texts: str, port: int = 8080) -> PortPolicy:
    return port_policy(tr.inbound_server(world(BASE, *texts), '{"ns":"shop","pod":"web-1"}', port, S),
                       permit_localhost=False)


def request(path: str = "/", method: bytes = b"GET", peer: str = "10.1.1.1", grpc: bool = False) -> Request:
    headers = [(b"content-type", b"application/grpc")] if grpc else []
    return Request(method, path.encode(), b"web.shop:8080", headers=headers, version="2" if grpc else "1.1",
                   conn=Connection("inbound", (peer, 40000), TARGET))


def decide(policy: PortPolicy, req: Request, client_id: str | None, authorizer: Authorizer | None = None
           ) -> tuple[int, str] | None:
    a = authorizer or Authorizer(StaticPolicy("deny", (), False))
    err = a.check_request(policy, req, TARGET, client_id is not None, client_id)
    return None if err is None else (err.status, err.reason)


def test_route_authorization_from_the_controllers_translation() -> None:
    p = policy_of(LOCKED)
    assert (p.protocol, p.server.kind, p.server.name, p.needs_http) == ("http1", "server", "web", True)
    assert decide(p, request("/admin/users"), CLIENT) is None
    assert decide(p, request("/admin/users"), OTHER) == (403, "unauthorized request on route")
    assert decide(p, request("/admin/users"), None) == (403, "unauthorized request on route")
    # The only route is /admin: anything else has no route (Server accessPolicy deny has no default route).
    assert decide(p, request("/"), CLIENT) == (404, "no route found for request")
    assert decide(p, request("/admin", method=b"POST"), CLIENT) == (404, "no route found for request")


def test_server_level_authorizations_apply_to_every_route() -> None:
    server_wide = """\
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: shop-wide, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web}
  requiredAuthenticationRefs: [{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: shop-clients}]
"""
    p = policy_of(LOCKED + server_wide)
    assert decide(p, request("/admin/x"), OTHER) is None  # the route's own failed, the server's permits
    assert decide(p, request("/admin/x"), "x.elsewhere.serviceaccount.identity.linkerd.cluster.local") == (
        403, "unauthorized request on route")


def test_default_policies_as_served_and_as_static_agree() -> None:
    for name in ("all-unauthenticated", "all-authenticated", "cluster-authenticated", "cluster-unauthenticated",
                 "deny", "audit"):
        ns = f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations:\n" \
             f"    config.linkerd.io/default-inbound-policy: {name}\n"
        served = policy_of(ns)
        static = default_port_policy(name, S.cluster_networks, permit_localhost=False)
        assert served.server.name == static.server.name == name
        for peer in ("10.1.1.1", "192.0.2.1"):
            for ident in (CLIENT, None):
                assert decide(served, request(peer=peer), ident) == decide(static, request(peer=peer), ident), \
                    (name, peer, ident)


def test_grpc_route_matches_service_and_method() -> None:
    grpc = """\
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: grpc, namespace: shop}
spec: {podSelector: {matchLabels: {app: web}}, port: 8080, proxyProtocol: gRPC, accessPolicy: all-unauthenticated}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: hello, namespace: shop}
spec:
  parentRefs: [{name: grpc, kind: Server, group: policy.linkerd.io}]
  rules: [{matches: [{method: {service: helloworld.Greeter, method: SayHello}}]}]
"""
    p = policy_of(grpc)
    assert decide(p, request("/helloworld.Greeter/SayHello", b"POST", grpc=True), None) is None
    assert decide(p, request("/helloworld.Greeter/SayBye", b"POST", grpc=True), None) == (
        404, "no route found for request")


def test_a_message_the_proxy_cannot_apply_is_refused() -> None:
    with pytest.raises(PolicyError, match="no proxy protocol"):
        port_policy(inb.Server())
    bad = inb.Server(protocol=inb.ProxyProtocol(opaque=inb.ProxyProtocol.Opaque()),
                     authorizations=[inb.Authz(authentication=inb.Authn())])
    with pytest.raises(PolicyError, match="no authentication"):
        port_policy(bad)


def test_layer_answers_denials_for_http_and_grpc_and_rate_limits_with_429() -> None:
    async def run() -> None:
        clock = FakeClock()
        policy = policy_of(LOCKED)

        class Source(StaticPolicy):
            def __init__(self) -> None:
                self.policy = policy

        a = Authorizer(Source(), clock=clock)
        inner = FakeService()
        layer = HttpAuthorize(inner, a, TARGET, True, CLIENT)
        other = HttpAuthorize(inner, a, TARGET, True, OTHER)
        denied = await other(request("/admin/x"))
        assert denied.status == 403 and denied.header(b"l5d-proxy-error") == b"unauthorized request on route"
        g = await other(request("/admin/x", grpc=True))
        assert (g.status, g.header(b"grpc-status")) == (200, b"7")  # PERMISSION_DENIED, trailers-only
        statuses = [(await layer(request("/admin/x"))).status for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]  # total 3 rps: a one-second burst of 3
        clock.t += 1 / 3
        assert (await layer(request("/admin/x"))).status == 200
        limited = await layer(request("/admin/x", grpc=True))
        assert limited.header(b"grpc-status") == b"8"  # RESOURCE_EXHAUSTED
        assert inner.calls == 4  # nothing denied or limited reached the application
        text = "\n".join(a.lines())
        assert 'inbound_http_local_ratelimit_total{target_addr="127.0.0.1:8080"' in text
        assert 'ratelimit_group="policy.linkerd.io",ratelimit_kind="httplocalratelimitpolicy",' \
               'ratelimit_name="web-rl",ratelimit_scope="total"' in text
        assert ('inbound_http_authz_deny_total{target_addr="127.0.0.1:8080",target_ip="127.0.0.1",'
                'target_port="8080",srv_group="policy.linkerd.io",srv_kind="server",srv_name="web",'
                'srv_port="8080",route_group="policy.linkerd.io",route_kind="httproute",route_name="admin",'
                f'tls="true",client_id="{OTHER}"}} 2') in text
        assert 'authz_group="policy.linkerd.io",authz_kind="authorizationpolicy",authz_name="admin-from-client"' \
            in text

    asyncio.run(run())


def test_tcp_connections_are_authorized_by_the_server() -> None:
    a = Authorizer(StaticPolicy("deny", (), False))
    p = default_port_policy("cluster-authenticated", ("10.0.0.0/8",), permit_localhost=False)
    assert a.check_tcp(p, TARGET, "10.2.3.4", True, CLIENT) is not None
    assert a.check_tcp(p, TARGET, "10.2.3.4", False, None) is None
    assert a.check_tcp(p, TARGET, "192.0.2.1", True, CLIENT) is None
    assert a.check_tcp(None, TARGET, "10.2.3.4", True, CLIENT) is None  # no policy: denied
    text = "\n".join(a.lines())
    assert 'inbound_tcp_authz_deny_total{target_addr="127.0.0.1:8080",target_ip="127.0.0.1",target_port="8080",' \
           'srv_group="",srv_kind="default",srv_name="cluster-authenticated",srv_port="8080",tls="disabled"} 1' in text
    assert 'srv_group="",srv_kind="",srv_name="",srv_port="8080"' in text


def test_what_looks_like_http_on_a_port_that_needs_it() -> None:
    # Any upper-case token could be a method some application parser accepts: refused, never opaque.
    for head in (b"GET\x00/ HTTP/1.1", b"POST", b"\r\nDELETE\t", b"PUT\x7f", b"SSH-2.0-OpenSSH"):
        assert looks_like_http(head), head
    for head in (b"\x00\x01binary", b"\x16\x03\x01", b"hello world", b"GE"):
        assert not looks_like_http(head), head


PROBED = """\
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  serviceAccount: web
  addresses: [10.0.0.5]
  ports: [{name: http, port: 8080}]
  probes: [{port: http, path: /healthz}, {port: 8080, path: /ready}, {port: 9999, path: /other}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {config.linkerd.io/default-inbound-policy: deny}
"""


def test_probe_paths_stay_authorized_on_a_locked_down_workload() -> None:
    w = World()
    result = load_text(PROBED, "probed")
    assert result.ok, [str(e) for e in result.errors]
    for item in result.loaded:
        w = w.replace(item.resource.KIND, {**w.of(item.resource.KIND), item.resource.key: item.resource})
    probe_nets = tr.Settings(probe_networks=("10.0.0.0/8",))
    p = port_policy(tr.inbound_server(w, '{"ns":"shop","pod":"web-1"}', 8080, probe_nets), permit_localhost=False)
    assert p.server.name == "deny" and not p.needs_http  # default routes only widen
    assert decide(p, request("/healthz", peer="10.9.9.9"), None) is None  # the kubelet, from the probe networks
    assert decide(p, request("/ready", peer="10.9.9.9"), None) is None
    assert decide(p, request("/healthz", peer="192.0.2.7"), None) == (403, "unauthorized request on route")
    assert decide(p, request("/healthz", method=b"POST", peer="10.9.9.9"), None) == (
        403, "unauthorized request on route")  # the probe route is GET only; the default route denies
    assert decide(p, request("/other", peer="10.9.9.9"), None) == (403, "unauthorized request on route")
    m = Authorizer(StaticPolicy("deny", (), False))
    m.check_request(p, request("/healthz", peer="10.9.9.9"), TARGET, False, None)
    assert 'route_group="",route_kind="default",route_name="probe",authz_group="",authz_kind="default",' \
           'authz_name="probe"' in "\n".join(m.lines())


def test_require_identity_ports_admit_only_mesh_identities() -> None:
    ns = """\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {config.linkerd.io/proxy-require-identity-inbound-ports: "8080,9000-9001"}
"""
    p = policy_of(ns)
    assert p.server.name == "all-authenticated"
    assert decide(p, request(), None) == (403, "unauthorized request on route")
    assert decide(p, request(), CLIENT) is None
    assert policy_of(ns, port=7000).server.name == "all-unauthenticated"
