"""Access logs and tracing on the local mesh, set by annotations as on Kubernetes.

`config.linkerd.io/access-log: apache|json` makes a pod's proxy log each inbound request in its log;
`config.linkerd.io/trace-collector` sends its spans to a real OpenTelemetry Collector on the host.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
from test_local_mesh import HTTP_APP, TETHER, Mesh
from test_tracing import Collector

from tether.testing import netns
from tether.testing.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Collector]]:
    tmp = tmp_path_factory.mktemp("obs")
    m = Mesh(tmp / "state")
    col: Collector | None = None
    try:
        m.up()
        col = Collector(tmp, host="0.0.0.0")
        gateway = m.settings()["pod_cidr"].rsplit(".", 1)[0] + ".1"
        m.tether("run", "apache", "--port", "8080", "--annotation", "config.linkerd.io/access-log=apache",
                 "--annotation", f"config.linkerd.io/trace-collector={gateway}:{col.grpc_port}",
                 "--", *HTTP_APP)
        m.tether("run", "jsonlog", "--port", "8080", "--annotation", "config.linkerd.io/access-log=json",
                 "--", *HTTP_APP)
        m.tether("run", "client", "--", "sleep", "3600")
        for name in ("apache", "jsonlog"):
            m.apply(f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
                    f"spec: {{selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n")
            wait_for(lambda n=name: m.exec("client-0", "curl", "-sf", f"http://{n}/", check=False).returncode == 0,
                     20, what=f"{name} reachable")
        yield m, col
    finally:
        if col is not None:
            col.proc.stop()
        if (m.state / "mesh.json").exists():
            subprocess.run([*TETHER, "down", "--state-dir", str(m.state)], capture_output=True, timeout=120)


def _proxy_log(m: Mesh, pod: str) -> str:
    return (m.state / "logs" / "default" / pod / "proxy.log").read_text()


def test_apache_access_log_lines(mesh: tuple[Mesh, Collector]) -> None:
    m, _ = mesh
    client_ip = m.pods("client")[0]["ip"]
    m.exec("client-0", "curl", "-s", "-o", "/dev/null", "http://apache/missing-page?q=1")
    client_id = re.escape("client.default.serviceaccount.identity.linkerd.cluster.local")
    pat = re.compile(rf'^{re.escape(client_ip)}:\d+ {client_id} - '
                     r'\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z\] "GET /missing-page\?q=1 HTTP/1\.1" 404$', re.M)
    wait_for(lambda: pat.search(_proxy_log(m, "apache-0")), 10, what="the access log line")


def test_json_access_log_lines(mesh: tuple[Mesh, Collector]) -> None:
    m, _ = mesh
    m.exec("client-0", "curl", "-s", "-o", "/dev/null", "-H", "x-request-id: req-42", "http://jsonlog/")

    def line() -> dict[str, object] | None:
        for ln in _proxy_log(m, "jsonlog-0").splitlines():
            if ln.startswith("{") and '"trace_id":"req-42"' in ln:
                return dict(json.loads(ln))
        return None

    doc = wait_for(line, 10, what="the JSON access log line")
    assert isinstance(doc, dict)
    assert doc["method"] == "GET" and doc["uri"] == "/" and doc["status"] == 200 and doc["version"] == "HTTP/1.1"
    assert doc["client.id"] == "client.default.serviceaccount.identity.linkerd.cluster.local"
    assert doc["host"] == "jsonlog" and str(doc["user_agent"]).startswith("curl/")
    assert int(str(doc["response_bytes"])) > 0 and int(str(doc["total_ns"])) > 0


def test_trace_collector_annotation_sends_spans(mesh: tuple[Mesh, Collector]) -> None:
    m, col = mesh
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    m.exec("client-0", "curl", "-s", "-o", "/dev/null", "-H", f"traceparent: 00-{trace}-00f067aa0ba902b7-01",
           "http://apache/traced")
    wait_for(lambda: [s for s in col.spans() if s["traceId"] == trace], 15, what="the pod's span in the collector")
    span = next(s for s in col.spans() if s["traceId"] == trace)
    assert span["kind"] == 2 and span["parentSpanId"] == "00f067aa0ba902b7"
    assert span["resource"]["k8s.pod.name"] == "apache-0" and span["resource"]["k8s.namespace.name"] == "default"
