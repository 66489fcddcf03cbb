"""An EgressNetwork with trafficPolicy Deny refuses opaque TCP to the addresses it covers, in pods
with real interception: the client pod's proxy asks the control plane about the original
destination and closes the connection before any byte leaves; removing the EgressNetwork lets the
next connection through."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing import netns
from tether.testing.procs import Proc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)

from test_transparent import _TCP_ECHO, metric_lines, start_pod_proxy  # noqa: E402

EGRESS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: outside, namespace: default}
spec:
  networks: [{cidr: IP/32}]
  trafficPolicy: Deny
"""


@pytest.fixture
def network() -> Iterator[netns.PodNetwork]:
    net = netns.PodNetwork()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def pods(tmp_path: Path, network: netns.PodNetwork) -> Iterator[tuple[netns.Pod, netns.Pod, Path, list[Proc]]]:
    net = network
    procs: list[Proc] = []
    res = tmp_path / "resources"
    res.mkdir()
    try:
        control, client, outside = net.add_pod("control"), net.add_pod("client"), net.add_pod("outside")
        procs.append(Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", "0.0.0.0:8086",
                           "--admin-addr", "127.0.0.1:9996", "--resources-dir", str(res),
                           "--state-dir", str(tmp_path / "state")], tmp_path / "dst.log", netns=control.ns))
        wait_for(lambda: control.exec("curl", "-sf", "http://127.0.0.1:9996/ready", check=False).returncode == 0,
                 20, what="destination ready")
        procs.append(start_pod_proxy(client, tmp_path, "--destination-addrs", f"{control.ip}:8086",
                                     "--destination-context", '{"ns":"default"}'))
        procs.append(Proc([sys.executable, "-c", _TCP_ECHO], tmp_path / "tcp.log", netns=outside.ns))
        wait_for(lambda: client.exec("curl", "-sf", "http://127.0.0.1:4191/ready", check=False).returncode == 0,
                 20, what="client proxy ready")
        yield client, outside, res, procs
    finally:
        for p in procs:
            p.stop(5)


def _talk(client: netns.Pod, ip: str) -> str:
    script = (f"import socket; c = socket.create_connection(('{ip}', 9300), timeout=5); c.settimeout(5)\n"
              "try:\n    print(c.recv(100).decode().strip() or 'closed')\n"
              "except OSError as e:\n    print(type(e).__name__)")
    return client.exec(sys.executable, "-c", script).stdout.strip()


def test_a_denying_egress_network_refuses_opaque_connections(pods) -> None:  # type: ignore[no-untyped-def]
    client, outside, res, _ = pods
    wait_for(lambda: _talk(client, outside.ip) == "banner", 10, what="the outside server through the proxy")
    (res / "egress.yaml").write_text(EGRESS.replace("IP", outside.ip))
    # The client proxy watches the address's policy: the next connections are refused.
    wait_for(lambda: _talk(client, outside.ip) in ("closed", "ConnectionResetError"), 10,
             what="the EgressNetwork's Deny in force")
    errors = [ln for ln in metric_lines(client, "outbound_tcp_errors_total") if 'error="forbidden"' in ln]
    assert errors and f'target_addr="{outside.ip}:9300"' in errors[0], errors
    (res / "egress.yaml").unlink()
    wait_for(lambda: _talk(client, outside.ip) == "banner", 10, what="traffic allowed again")


_HTTP_NAMED = """\
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        body = ("outside saw " + self.headers.get("Host", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

EGRESS_BY_NAME = EGRESS + """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: allowed-api, namespace: default}
spec:
  parentRefs: [{name: outside, kind: EgressNetwork, group: policy.linkerd.io, port: 8080}]
  hostnames: [api.example.com]
  rules:
    - backendRefs: [{name: outside, kind: EgressNetwork, group: policy.linkerd.io}]
"""


def _curl(client: netns.Pod, name: str, ip: str) -> tuple[str, str]:
    r = client.exec("curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5",
                    "--resolve", f"{name}:8080:{ip}", f"http://{name}:8080/", check=False)
    body, _, code = r.stdout.rpartition("\n")
    return code, body


def test_an_egress_route_lets_out_the_hostnames_it_names(pods) -> None:  # type: ignore[no-untyped-def]
    """Egress by name with real interception: the application resolves two names to one outside
    address; the HTTPRoute attached to the denying EgressNetwork names one of them (its Host
    header), so only that one gets out."""
    client, outside, res, procs = pods
    procs.append(Proc([sys.executable, "-c", _HTTP_NAMED], res.parent / "named.log", netns=outside.ns))
    wait_for(lambda: _curl(client, "api.example.com", outside.ip)[0] == "200", 10, what="the outside HTTP server")
    (res / "egress.yaml").write_text(EGRESS_BY_NAME.replace("IP", outside.ip))
    wait_for(lambda: _curl(client, "other.example.com", outside.ip)[0] == "403", 10,
             what="the EgressNetwork's Deny in force for other names")
    assert _curl(client, "api.example.com", outside.ip) == ("200", "outside saw api.example.com:8080")
    lines = metric_lines(client, "outbound_http_route_request_statuses_total")
    allowed = [ln for ln in lines if 'route_name="allowed-api"' in ln and 'hostname="api.example.com"' in ln]
    denied = [ln for ln in lines if 'route_name="http-egress-deny"' in ln and 'hostname="other.example.com"' in ln]
    assert allowed and denied, lines


_TCP_NAMED = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9300)); s.listen()
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode() + b"\\n"); c.close()
"""

VIP = "198.18.0.200"  # on the pods' link, owned by no one: only the proxy can answer for it

BANNER_SERVICE = f"""\
apiVersion: v1
kind: Service
metadata: {{name: banner, namespace: default}}
spec:
  clusterIP: {VIP}
  selector: {{app: banner}}
  ports: [{{port: 9300, targetPort: 9300}}]
"""


@pytest.fixture
def banners(pods, network: netns.PodNetwork, tmp_path: Path) -> list[netns.Pod]:  # type: ignore[no-untyped-def]
    """Two unmeshed TCP servers behind the Service ``banner`` (virtual IP ``VIP``), each saying its name."""
    from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry

    _, _, res, procs = pods
    reg = WorkloadRegistry(tmp_path / "state")
    servers = []
    for name in ("banner-a", "banner-b"):
        pod = network.add_pod(name)
        procs.append(Proc([sys.executable, "-c", _TCP_NAMED, name], tmp_path / f"{name}.log", netns=pod.ns))
        reg.register(Workload(name, "default", "default", (pod.ip,), (WorkloadPort(9300),), {"app": "banner"}))
        servers.append(pod)
    (res / "banner.yaml").write_text(BANNER_SERVICE)
    return servers


def _banner(client: netns.Pod, ip: str) -> str:
    script = (f"import socket; c = socket.create_connection(('{ip}', 9300), timeout=5); c.settimeout(5)\n"
              "try:\n    print(c.recv(100).decode().strip() or 'closed')\n"
              "except OSError as e:\n    print(type(e).__name__)")
    return client.exec(sys.executable, "-c", script, check=False).stdout.strip() or "refused"


def _banners(client: netns.Pod, ip: str, n: int) -> dict[str, int]:
    script = (
        "import socket, collections\n"
        "seen = collections.Counter()\n"
        f"for _ in range({n}):\n"
        "    try:\n"
        f"        c = socket.create_connection(('{ip}', 9300), timeout=5); c.settimeout(5)\n"
        "        seen[c.recv(100).decode().strip() or 'closed'] += 1; c.close()\n"
        "    except OSError as e:\n"
        "        seen[type(e).__name__] += 1\n"
        "print(dict(seen))")
    import ast
    return dict(ast.literal_eval(client.exec(sys.executable, "-c", script).stdout.strip()))


def test_opaque_tcp_to_a_service_virtual_ip_is_balanced_over_its_endpoints(pods, banners) -> None:  # type: ignore[no-untyped-def]
    """A connection to a Service's virtual IP (which nothing answers) is sent by the client's proxy to
    one of the Service's endpoints; 40 connections reach both."""
    client = pods[0]
    wait_for(lambda: _banner(client, VIP).startswith("banner-"), 10, what="the Service's virtual IP answered")
    seen = _banners(client, VIP, 40)
    assert set(seen) == {"banner-a", "banner-b"}, seen
    assert min(seen.values()) >= 5, seen  # uniform: P(a side < 5 of 40) is below 1e-6


EGRESS_TCP_ROUTE = EGRESS + """---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: outside-tcp, namespace: default}
spec:
  parentRefs: [{name: outside, kind: EgressNetwork, group: policy.linkerd.io, port: 9300}]
  rules:
    - backendRefs: [BACKEND]
"""


def test_a_tcp_route_on_an_egress_network_decides_where_its_connections_go(pods, banners) -> None:  # type: ignore[no-untyped-def]
    """Under a denying EgressNetwork, a TCPRoute attached to it decides instead of the Deny: its
    backend the EgressNetwork itself lets connections out; its backend a Service keeps them
    inside the mesh (the outside address is never reached); removing it brings the Deny back."""
    client, outside, res, _ = pods
    wait_for(lambda: _banner(client, outside.ip) == "banner", 10, what="the outside server")
    (res / "egress.yaml").write_text(EGRESS.replace("IP", outside.ip))
    refused = ("closed", "ConnectionResetError")
    wait_for(lambda: _banner(client, outside.ip) in refused, 10, what="the Deny in force")
    itself = "{name: outside, kind: EgressNetwork, group: policy.linkerd.io}"
    (res / "egress.yaml").write_text(EGRESS_TCP_ROUTE.replace("IP", outside.ip).replace("BACKEND", itself))
    wait_for(lambda: _banner(client, outside.ip) == "banner", 10, what="the TCPRoute letting it out")
    service = "{name: banner, port: 9300}"
    (res / "egress.yaml").write_text(EGRESS_TCP_ROUTE.replace("IP", outside.ip).replace("BACKEND", service))
    wait_for(lambda: _banner(client, outside.ip).startswith("banner-"), 10, what="the route to the Service")
    assert set(_banners(client, outside.ip, 20)) <= {"banner-a", "banner-b"}
    (res / "egress.yaml").write_text(EGRESS.replace("IP", outside.ip))
    wait_for(lambda: _banner(client, outside.ip) in refused, 10, what="the Deny back")
