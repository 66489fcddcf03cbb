"""Three destination replicas and a proxy under steady load: replicas die one by one, no request
fails; with none left, traffic keeps flowing on the last good answers, and the proxy says so."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.load import SteadyLoad
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

AUTHORITY = "web.demo.svc.cluster.local:8080"
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 8080}]
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[list[Proc], ProxyProc]]:
    res = tmp_path / "resources"
    res.mkdir()
    (res / "web.yaml").write_text(SERVICE)
    servers = [ThreadingHTTPServer((f"127.0.20.{i}", 8080), _Handler) for i in (1, 2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    reg = WorkloadRegistry(tmp_path / "state")
    for i in (1, 2):
        reg.register(Workload(f"web-{i}", "demo", "web", (f"127.0.20.{i}",), (WorkloadPort(8080),), {"app": "web"}))
    procs: list[Proc] = []
    addrs: list[str] = []
    proxy: ProxyProc | None = None
    try:
        for i in range(3):
            port, admin = free_port(), free_port()
            procs.append(Proc([sys.executable, "-m", "tether", "controller", "destination",
                               "--addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
                               "--resources-dir", str(res), "--state-dir", str(tmp_path / "state")],
                              tmp_path / f"dst-{i}.log"))
            addrs.append(f"127.0.0.1:{port}")
            wait_for(lambda a=admin: http_get(f"http://127.0.0.1:{a}/ready")[0] == 200, 20, what=f"replica {i}")
        proxy = ProxyProc(tmp_path, destination_addrs=",".join(addrs),
                          destination_context='{"ns":"demo"}').wait_ready()
        yield procs, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for p in procs:
            p.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


def stale(proxy: ProxyProc) -> float:
    for line in proxy.metrics().splitlines():
        if line.startswith("tether_destination_stale "):
            return float(line.split()[1])
    raise AssertionError("tether_destination_stale not in /metrics")


def test_replicas_die_one_by_one_under_load_and_no_request_fails(replicas) -> None:  # type: ignore[no-untyped-def]
    procs, proxy = replicas
    with SteadyLoad("127.0.0.1", proxy.outbound_port, AUTHORITY, interval=0.002) as load:
        wait_for(lambda: load.ok >= 100, 30, what="traffic flowing")
        for p in procs:
            p.signal(signal.SIGKILL)  # no goodbye: streams just break
            p.wait(10)
            before = load.ok
            wait_for(lambda b=before: load.ok >= b + 200, 30, what="traffic after a replica died")
        # No replica left: the last good endpoints stay in force, and the proxy says they are stale.
        wait_for(lambda: stale(proxy) >= 1, 20, what="stale reported")
        before = load.ok
        wait_for(lambda: load.ok >= before + 300, 30, what="traffic with the control plane down")
    assert set(load.outcomes) == {"200"}, load.outcomes
    print(f"{load.total} requests while 3 of 3 replicas were killed: {dict(load.outcomes)}")
