"""HTTPRoute and GRPCRoute rules through a real destination controller and a real proxy.

The seed's canary HTTPRoute (003, ``payments-api-canary``, 90/10 over two Services) applied as it
is; our own routes for retries (``retry.linkerd.io/*`` annotations), request timeouts, header
filters, unmatched requests, a weight change on a live connection, and a GRPCRoute with a timeout
and a retry on UNAVAILABLE through grpcio. Every figure is read from the proxy's
``outbound_http_route_*`` / ``outbound_grpc_route_*`` metrics as an operator would.
"""

from __future__ import annotations

import http.client
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

SEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"
PAYMENTS = "payments-api.payments.svc.cluster.local:8080"
ORDERS = "orders.payments.svc.cluster.local:8080"
GREETER = "greeter.payments.svc.cluster.local:50051"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {app: payments-api}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: payments-api-stable, namespace: payments}
spec:
  selector: {app: payments-api, track: stable}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: payments-api-canary, namespace: payments}
spec:
  selector: {app: payments-api, track: canary}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: payments}
spec:
  selector: {app: orders}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: payments}
spec:
  selector: {app: greeter}
  ports: [{name: grpc, port: 50051, targetPort: 50051}]
"""

ORDER_ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: orders-flaky
  namespace: payments
  annotations:
    retry.linkerd.io/http: "5xx"
    retry.linkerd.io/limit: "3"
spec:
  parentRefs: [{name: orders, kind: Service, group: core, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /flaky}}]
      backendRefs: [{name: orders, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orders-slow, namespace: payments}
spec:
  parentRefs: [{name: orders, kind: Service, group: core, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      timeouts: {request: 300ms}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: slow}]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            add: [{name: x-served-by-route, value: orders-slow}]
      backendRefs: [{name: orders, port: 8080}]
    - matches: [{path: {type: Exact, value: /echo}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: echo}]
      backendRefs: [{name: orders, port: 8080}]
"""

GREETER_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: greeter
  namespace: payments
  annotations:
    retry.linkerd.io/grpc: unavailable
    retry.linkerd.io/limit: "3"
    timeout.linkerd.io/request: 500ms
spec:
  parentRefs: [{name: greeter, kind: Service, group: core, port: 50051}]
  rules:
    - matches: [{method: {service: test.Greeter}}]
      backendRefs: [{name: greeter, port: 50051}]
"""


class Backend(ThreadingHTTPServer):
    """Answers with its name; /flaky fails 1 call in 3; /slow takes 2 s; /echo returns x-route."""

    def __init__(self, addr: tuple[str, int], name: str) -> None:
        self.name = name
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: Backend

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        kind = "/" + path.split("/")[1]
        with self.server.lock:
            n = self.server.calls[kind] = self.server.calls.get(kind, 0) + 1
        status, body = 200, self.server.name.encode()
        if path.startswith("/flaky") and n % 3 == 0:
            status, body = 503, b"flaky"
        elif path.startswith("/slow"):
            time.sleep(2)
        elif path == "/echo":
            body = (self.headers.get("x-route") or "").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _ident(b: bytes) -> bytes:
    return b


class Greeter:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def flaky(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n % 3 == 0:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "every third call")
        return b"hi " + req

    def slow(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        time.sleep(2)
        return req


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.res = tmp / "resources"
        self.res.mkdir()
        (self.res / "services.yaml").write_text(SERVICES)
        shutil.copy(SEEDS / "003-httproute-canary.yaml", self.res / "canary.yaml")
        (self.res / "orders.yaml").write_text(ORDER_ROUTES)
        (self.res / "greeter.yaml").write_text(GREETER_ROUTE)
        self.http = [Backend(("127.0.11.1", 8080), "stable"), Backend(("127.0.11.2", 8080), "canary"),
                     Backend(("127.0.11.3", 8080), "orders")]
        for s in self.http:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.greeter = Greeter()
        handler = grpc.method_handlers_generic_handler("test.Greeter", {
            "Flaky": grpc.unary_unary_rpc_method_handler(self.greeter.flaky, _ident, _ident),
            "Slow": grpc.unary_unary_rpc_method_handler(self.greeter.slow, _ident, _ident),
        })
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.grpc_server.add_generic_rpc_handlers((handler,))
        self.grpc_server.add_insecure_port("127.0.11.4:50051")
        self.grpc_server.start()
        reg = WorkloadRegistry(tmp / "state")
        for name, ip, port, labels in (
            ("payments-stable-1", "127.0.11.1", 8080, {"app": "payments-api", "track": "stable"}),
            ("payments-canary-1", "127.0.11.2", 8080, {"app": "payments-api", "track": "canary"}),
            ("orders-1", "127.0.11.3", 8080, {"app": "orders"}),
            ("greeter-1", "127.0.11.4", 50051, {"app": "greeter"}),
        ):
            reg.register(Workload(name, "payments", "default", (ip,), (WorkloadPort(port),), labels))
        port, admin = free_port(), free_port()
        self.dst = Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", f"127.0.0.1:{port}",
                         "--admin-addr", f"127.0.0.1:{admin}", "--resources-dir", str(self.res),
                         "--state-dir", str(tmp / "state"), "--allow-l5d-request-headers"], tmp / "dst.log")
        self.proxy: ProxyProc | None = None
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 20, what="destination ready")
        self.proxy = ProxyProc(tmp, destination_addrs=f"127.0.0.1:{port}",
                               destination_context='{"ns":"payments"}').wait_ready()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.dst.stop()
        self.grpc_server.stop(0)
        for s in self.http:
            s.shutdown()
            s.server_close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _get(c: http.client.HTTPConnection, host: str, path: str,
         headers: dict[str, str] | None = None) -> tuple[int, str, http.client.HTTPResponse]:
    c.request("GET", path, headers={"Host": host, **(headers or {})})
    r = c.getresponse()
    return r.status, r.read().decode(), r


def test_the_seed_canary_route_splits_90_10_and_follows_a_weight_change(mesh: Mesh) -> None:
    assert mesh.proxy is not None
    c = http.client.HTTPConnection("127.0.0.1", mesh.proxy.outbound_port, timeout=10)
    got: dict[str, int] = {}
    for i in range(2000):
        status, body, r = _get(c, PAYMENTS, f"/charge/{i}")
        assert status == 200, (status, body, r.getheader("l5d-proxy-error"))
        got[body] = got.get(body, 0) + 1
    share = got.get("canary", 0) / 2000
    print(f"2,000 requests: {got} (canary {share:.2%})")
    assert 0.07 <= share <= 0.13  # 90/10 within 3 points at this count
    text = mesh.proxy.metrics()
    route = {"parent_name": "payments-api", "parent_kind": "Service", "parent_port": "8080",
             "route_name": "payments-api-canary", "route_kind": "HTTPRoute"}
    assert _metric(text, "outbound_http_route_request_statuses_total", http_status="200", **route) == 2000
    assert _metric(text, "outbound_http_route_request_duration_seconds_count", **route) == 2000
    stable = _metric(text, "outbound_http_route_backend_requests_total", backend_name="payments-api-stable", **route)
    canary = _metric(text, "outbound_http_route_backend_requests_total", backend_name="payments-api-canary", **route)
    assert (stable, canary) == (got["stable"], got.get("canary", 0))

    # Edit the route to 50/50: the same client connection sees it within a second or so.
    canary_file = mesh.res / "canary.yaml"
    canary_file.write_text(canary_file.read_text().replace("weight: 90", "weight: 50").replace("weight: 10",
                                                                                              "weight: 50"))
    changed_at = time.monotonic()

    def balanced() -> bool:
        seen = {"stable": 0, "canary": 0}
        for i in range(200):
            seen[_get(c, PAYMENTS, f"/after/{i}")[1]] += 1
        return 0.35 <= seen["canary"] / 200 <= 0.65

    wait_for(balanced, 10, interval=0.05, what="the 50/50 weights in force")
    print(f"50/50 observed {time.monotonic() - changed_at:.2f}s after the edit")
    c.close()


def test_route_retries_timeouts_filters_and_no_route(mesh: Mesh) -> None:
    assert mesh.proxy is not None
    c = http.client.HTTPConnection("127.0.0.1", mesh.proxy.outbound_port, timeout=10)
    fails = 0
    for i in range(300):
        status, _, _ = _get(c, ORDERS, f"/flaky/{i}")
        fails += status != 200
    assert fails == 0  # 1 call in 3 fails; limit 3 retries hides every failure
    assert mesh.http[2].calls  # the orders backend served them
    text = mesh.proxy.metrics()
    flaky = {"route_name": "orders-flaky", "parent_name": "orders"}
    retries = _metric(text, "outbound_http_route_retry_requests_total", **flaky)
    assert 100 <= retries <= 200, retries  # about half of 300 first tries fail (every 3rd call)
    assert _metric(text, "outbound_http_route_retry_successes_total", **flaky) == retries
    assert _metric(text, "outbound_http_route_request_statuses_total", http_status="200", **flaky) == 300
    assert _metric(text, "outbound_http_route_backend_requests_total", **flaky) == 300 + retries

    # The request timeout: 504 with the reason, counted as REQUEST_TIMEOUT; filters applied.
    started = time.monotonic()
    status, body, r = _get(c, ORDERS, "/slow")
    assert status == 504, body
    assert time.monotonic() - started < 1.5
    assert "timeout" in (r.getheader("l5d-proxy-error") or "")
    text = mesh.proxy.metrics()
    assert _metric(text, "outbound_http_route_request_statuses_total", route_name="orders-slow",
                   error="REQUEST_TIMEOUT") == 1
    status, body, r = _get(c, ORDERS, "/echo")
    assert (status, body) == (200, "echo")  # the rule's RequestHeaderModifier set x-route

    # The controller allows l5d-* request headers: a client turns the route's retries off for its
    # own requests, and every third call's 503 reaches it.
    statuses = [_get(c, ORDERS, f"/flaky/no-retry-{i}", {"l5d-retry-limit": "0"})[0] for i in range(30)]
    assert statuses.count(503) == 10 and statuses.count(200) == 20

    # No rule matches: 404 with the reason, and the backend never sees it.
    calls_before = sum(mesh.http[2].calls.values())
    status, body, r = _get(c, ORDERS, "/nothing-routes-here")
    assert status == 404
    assert "no route" in (r.getheader("l5d-proxy-error") or "")
    assert sum(mesh.http[2].calls.values()) == calls_before
    c.close()


def test_grpc_route_retries_unavailable_and_times_out(mesh: Mesh) -> None:
    assert mesh.proxy is not None
    with grpc.insecure_channel(f"127.0.0.1:{mesh.proxy.outbound_port}",
                               options=[("grpc.default_authority", GREETER)]) as ch:
        flaky = ch.unary_unary("/test.Greeter/Flaky", request_serializer=_ident, response_deserializer=_ident)
        for i in range(60):
            assert flaky(b"%d" % i, timeout=5) == b"hi %d" % i  # every third UNAVAILABLE is retried
        slow = ch.unary_unary("/test.Greeter/Slow", request_serializer=_ident, response_deserializer=_ident)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            slow(b"x", timeout=5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5  # the route's 500 ms, not the client's 5 s
    calls = mesh.greeter.calls
    assert calls - calls // 3 == 60  # every third call failed and was sent again
    text = mesh.proxy.metrics()
    route = {"route_name": "greeter", "route_kind": "GRPCRoute", "parent_name": "greeter"}
    assert _metric(text, "outbound_grpc_route_request_statuses_total", grpc_status="OK", **route) == 60
    assert _metric(text, "outbound_grpc_route_retry_requests_total", **route) == calls // 3
    assert _metric(text, "outbound_grpc_route_request_statuses_total", error="REQUEST_TIMEOUT", **route) == 1
    assert re.search(r'outbound_grpc_route_backend_requests_total\{[^}]*backend_name="greeter"', text)


EGRESS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: outside, namespace: payments}
spec:
  networks: [{cidr: 127.0.12.0/24}]
  trafficPolicy: POLICY
"""


def test_an_egress_network_denies_then_allows_traffic_to_outside_addresses(mesh: Mesh) -> None:
    assert mesh.proxy is not None
    outside = Backend(("127.0.12.1", 8080), "outside")
    threading.Thread(target=outside.serve_forever, daemon=True).start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", mesh.proxy.outbound_port, timeout=10)
        host = "127.0.12.1:8080"
        assert _get(c, host, "/")[:2] == (200, "outside")  # no EgressNetwork: forwarded as addressed
        (mesh.res / "egress.yaml").write_text(EGRESS.replace("POLICY", "Deny"))
        seen: list[tuple[int, str | None]] = []

        def denied() -> bool:
            status, _, r = _get(c, host, "/")
            seen.append((status, r.getheader("l5d-proxy-error")))
            return status == 403

        wait_for(denied, 10, interval=0.05, what="the EgressNetwork's Deny in force")
        assert "EgressNetwork payments/outside" in (seen[-1][1] or ""), seen[-1]
        served = sum(outside.calls.values())
        assert _get(c, host, "/again")[0] == 403
        assert sum(outside.calls.values()) == served  # a denied request never leaves the proxy

        (mesh.res / "egress.yaml").write_text(EGRESS.replace("POLICY", "Allow"))
        wait_for(lambda: _get(c, host, "/")[0] == 200, 10, interval=0.05, what="the EgressNetwork's Allow")
        c.close()
        text = mesh.proxy.metrics()
        egress = {"parent_kind": "EgressNetwork", "parent_name": "outside", "hostname": "127.0.12.1"}
        assert _metric(text, "outbound_http_route_request_statuses_total", http_status="403", **egress) >= 2
        assert _metric(text, "outbound_http_route_request_statuses_total", http_status="200", **egress) >= 1
    finally:
        outside.shutdown()
        outside.server_close()


EGRESS_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: outside-api, namespace: payments}
spec:
  parentRefs: [{name: outside, kind: EgressNetwork, group: policy.linkerd.io, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      backendRefs: [{name: outside, kind: EgressNetwork, group: policy.linkerd.io}]
    - matches: [{path: {type: PathPrefix, value: /echo}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: kept-inside}]
      backendRefs: [{name: orders, port: 8080}]
"""


def test_routes_on_an_egress_network_pass_what_they_name_and_its_deny_stops_the_rest(mesh: Mesh) -> None:
    """Routed egress: under a Deny EgressNetwork, an HTTPRoute attached to it lets /v1 out to the
    original destination and sends /echo to a Service inside the mesh instead; anything else gets
    the EgressNetwork's 403 without leaving the proxy."""
    assert mesh.proxy is not None
    outside = Backend(("127.0.12.1", 8080), "outside")
    threading.Thread(target=outside.serve_forever, daemon=True).start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", mesh.proxy.outbound_port, timeout=10)
        host = "127.0.12.1:8080"
        (mesh.res / "egress.yaml").write_text(EGRESS.replace("POLICY", "Deny"))
        wait_for(lambda: _get(c, host, "/v1/things")[0] == 403, 10, interval=0.05, what="the Deny in force")
        (mesh.res / "egress.yaml").write_text(EGRESS.replace("POLICY", "Deny") + "---\n" + EGRESS_ROUTE)
        wait_for(lambda: _get(c, host, "/v1/things")[:2] == (200, "outside"), 10, interval=0.05,
                 what="the EgressNetwork's route in force")
        status, body, r = _get(c, host, "/elsewhere")
        assert status == 403, (status, body)
        assert "EgressNetwork payments/outside" in (r.getheader("l5d-proxy-error") or "")
        assert outside.calls.get("/elsewhere", 0) == 0  # denied in the proxy
        # The route's second rule: the request goes to the orders Service, with its header set.
        assert _get(c, host, "/echo")[:2] == (200, "kept-inside")
        assert outside.calls.get("/echo", 0) == 0
        assert outside.calls.get("/v1", 0) >= 1
        # Without the route, the Deny covers /v1 too.
        (mesh.res / "egress.yaml").write_text(EGRESS.replace("POLICY", "Deny"))
        wait_for(lambda: _get(c, host, "/v1/things")[0] == 403, 10, interval=0.05, what="the route removed")
        c.close()
        text = mesh.proxy.metrics()
        routed = {"parent_kind": "EgressNetwork", "route_name": "outside-api", "route_kind": "HTTPRoute"}
        assert _metric(text, "outbound_http_route_request_statuses_total", http_status="200", **routed) >= 2
        deny = {"parent_kind": "EgressNetwork", "route_name": "http-egress-deny"}
        assert _metric(text, "outbound_http_route_request_statuses_total", http_status="403", **deny) >= 2
    finally:
        outside.shutdown()
        outside.server_close()
