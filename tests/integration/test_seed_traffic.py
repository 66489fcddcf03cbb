"""The seeds' ServiceProfile and TrafficSplit, applied as they are, through a real destination
controller and a real proxy: per-route metrics with the seeds' route names, and a 90/10 split
measured over 10,000 requests."""

from __future__ import annotations

import http.client
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

SEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"
APEX = "api-service.production.svc.cluster.local:8080"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: api-service, namespace: production}
spec:
  selector: {app: api-service}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api-service-stable, namespace: production}
spec:
  selector: {app: api-service, track: stable}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: api-service-canary, namespace: production}
spec:
  selector: {app: api-service, track: canary}
  ports: [{name: http, port: 8080, targetPort: 8080}]
"""


class Named(ThreadingHTTPServer):
    def __init__(self, addr: tuple[str, int], name: str) -> None:
        self.name = name
        super().__init__(addr, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms Nagle/delayed-ACK stall
    server: Named

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ProxyProc]:
    res = tmp_path / "resources"
    res.mkdir()
    (res / "services.yaml").write_text(SERVICES)
    shutil.copy(SEEDS / "004-serviceprofile.yaml", res / "profile.yaml")
    # The seed's first TrafficSplit (api-rollout: stable 90, canary 10), as written.
    rollout = (SEEDS / "004-trafficsplit-services.yaml").read_text().split("\n---")[0]
    (res / "split.yaml").write_text(rollout + "\n")
    servers = [Named(("127.0.10.1", 8080), "stable"), Named(("127.0.10.2", 8080), "canary")]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    reg = WorkloadRegistry(tmp_path / "state")
    for i, (name, track) in enumerate((("api-stable-1", "stable"), ("api-canary-1", "canary"))):
        reg.register(Workload(name, "production", "api", (f"127.0.10.{i + 1}",), (WorkloadPort(8080),),
                              {"app": "api-service", "track": track}))
    port, admin = free_port(), free_port()
    dst = Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", f"127.0.0.1:{port}",
                "--admin-addr", f"127.0.0.1:{admin}", "--resources-dir", str(res),
                "--state-dir", str(tmp_path / "state")], tmp_path / "dst.log")
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 20, what="destination ready")
        proxy = ProxyProc(tmp_path, destination_addrs=f"127.0.0.1:{port}",
                          destination_context='{"ns":"production"}').wait_ready()
        try:
            yield proxy
        finally:
            proxy.stop()
    finally:
        dst.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


def test_the_seed_split_and_routes_through_the_real_control_plane(mesh: ProxyProc) -> None:
    c = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=10)
    got: dict[str, int] = {}
    for i in range(10_000):
        c.request("GET", f"/api/users/{i}", headers={"Host": APEX})
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, (r.status, body, r.getheader("l5d-proxy-error"))
        got[body] = got.get(body, 0) + 1
    c.close()
    share = got.get("canary", 0) / 10_000
    print(f"10,000 requests: {got} (canary {share:.2%})")
    assert 0.08 <= share <= 0.12  # the seed's 90/10, within 2 points
    text = mesh.metrics()
    lines = [ln for ln in text.splitlines() if ln.startswith("route_request_total{")]
    assert any('rt_route="GET /api/users/:id"' in ln and ln.endswith(" 10000") for ln in lines), lines


def test_the_proxy_tool_shows_the_profile_it_applies(mesh: ProxyProc) -> None:
    # Sanity of the same control plane from the CLI's side is the controller's own test; here the
    # proxy answers a route it has no profile entry for with the default route.
    c = http.client.HTTPConnection("127.0.0.1", mesh.outbound_port, timeout=10)
    c.request("GET", "/healthz", headers={"Host": APEX})
    assert c.getresponse().status == 200
    c.close()
    text = mesh.metrics()
    assert any(ln.startswith("route_request_total{") and 'rt_route=""' in ln for ln in text.splitlines())
