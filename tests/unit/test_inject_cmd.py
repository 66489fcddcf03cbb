"""`tether inject` and `tether uninject` on files and stdin: YAML in, YAML out, a summary on stderr."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.cli.main import main

WORKLOADS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: prod}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations: {config.linkerd.io/skip-outbound-ports: "3306"}
    spec:
      containers: [{name: app, image: app:1}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  selector: {matchLabels: {app: db}}
  serviceName: db
  template:
    metadata: {labels: {app: db}}
    spec: {containers: [{name: db, image: db:1}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: agent}
  spec:
    selector: {matchLabels: {app: agent}}
    template:
      metadata: {labels: {app: agent}}
      spec: {containers: [{name: agent, image: agent:1}]}
- apiVersion: batch/v1
  kind: Job
  metadata: {name: once}
  spec:
    template:
      metadata: {annotations: {linkerd.io/inject: disabled}}
      spec: {restartPolicy: Never, containers: [{name: once, image: once:1}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 0 * * *"
  jobTemplate:
    spec:
      template:
        spec: {restartPolicy: Never, containers: [{name: n, image: n:1}]}
---
apiVersion: v1
kind: Pod
metadata: {name: solo}
spec: {containers: [{name: solo, image: solo:1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
"""
ANCHORS = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def templates(docs: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for obj in doc.get("items", [doc]):
            kind = obj["kind"]
            if kind == "CronJob":
                out[kind] = obj["spec"]["jobTemplate"]["spec"]["template"]
            elif kind == "Pod":
                out[kind] = obj
            elif kind != "Service":
                out[kind] = obj["spec"]["template"]
    return out


@pytest.fixture
def workloads(tmp_path: Path) -> Path:
    path = tmp_path / "app.yaml"
    path.write_text(WORKLOADS)
    return path


def test_inject_annotates_every_pod_template(capsys: pytest.CaptureFixture[str], workloads: Path) -> None:
    code, out, err = run(capsys, "inject", str(workloads), "--proxy-log-level", "debug")
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert len(docs) == 6 and docs[-1]["kind"] == "Service" and docs[2]["kind"] == "List"
    tpls = templates(docs)
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Pod"):
        anns = tpls[kind]["metadata"]["annotations"]
        assert anns["linkerd.io/inject"] == "enabled", kind
        assert anns["config.linkerd.io/proxy-log-level"] == "debug", kind
    assert tpls["Job"]["metadata"]["annotations"]["linkerd.io/inject"] == "disabled"
    assert tpls["Deployment"]["metadata"]["annotations"]["config.linkerd.io/skip-outbound-ports"] == "3306"
    lines = [line for line in err.splitlines() if line]
    assert lines == ['deployment "web" injected', 'statefulset "db" injected', 'daemonset "agent" injected',
                     'job "once" skipped (linkerd.io/inject: disabled)', 'cronjob "nightly" injected',
                     'pod "solo" injected']


def test_manual_inject_then_uninject_round_trips(capsys: pytest.CaptureFixture[str], workloads: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    anchors = tmp_path / "ca.crt"
    anchors.write_text(ANCHORS)
    code, out, err = run(capsys, "inject", "--manual", "--identity-trust-anchors-file", str(anchors), str(workloads))
    assert code == 0, err
    tpls = templates(list(yaml.safe_load_all(out)))
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Pod"):
        names = [c["name"] for c in tpls[kind]["spec"]["containers"]]
        assert "linkerd-proxy" in names, kind
        assert tpls[kind]["spec"]["initContainers"][0]["name"] == "linkerd-init"
    assert "linkerd-proxy" not in [c["name"] for c in tpls["Job"]["spec"]["containers"]]
    assert tpls["Deployment"]["metadata"]["labels"]["linkerd.io/proxy-deployment"] == "web"
    init = tpls["Deployment"]["spec"]["initContainers"][0]["args"]
    assert init[init.index("--outbound-ports-to-ignore") + 1] == "4567,4568,3306"
    # Injecting again changes nothing.
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    code, again, _ = run(capsys, "inject", "--manual", "--identity-trust-anchors-file", str(anchors), "-")
    assert code == 0 and list(yaml.safe_load_all(again)) == list(yaml.safe_load_all(out))
    monkeypatch.setattr("sys.stdin", io.StringIO(out))
    code, back, err = run(capsys, "uninject", "-")
    assert code == 0
    assert 'deployment "web" uninjected' in err
    original = templates(list(yaml.safe_load_all(WORKLOADS)))
    restored = templates(list(yaml.safe_load_all(back)))
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Pod"):
        assert restored[kind] == original[kind], kind


def test_bad_document_names_file_and_document(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(WORKLOADS.replace('skip-outbound-ports: "3306"', 'skip-outbound-ports: "127.0.0.1"'))
    code, out, err = run(capsys, "inject", str(bad))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"tether inject: {bad}: document 1 (Deployment web): annotation config.linkerd.io/skip-outbound-ports: "
        "'127.0.0.1' is not a port (1-65535) or a range like 5000-5010; loopback is never redirected, and IP "
        "ranges go in config.linkerd.io/skip-subnets"]


def test_manual_needs_trust_anchors(capsys: pytest.CaptureFixture[str], workloads: Path) -> None:
    code, out, err = run(capsys, "inject", "--manual", str(workloads))
    assert code == 2 and "--identity-trust-anchors-file" in err and out == ""


def test_invalid_yaml(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("kind: [\n")
    code, _, err = run(capsys, "inject", str(bad))
    assert code == 2 and f"{bad}: invalid YAML" in err


def test_proxy_await_waits_for_ready_and_gives_up(capsys: pytest.CaptureFixture[str]) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"ready": False, "asked": 0}
    asked_twice = threading.Event()

    class Admin(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["asked"] += 1
            if state["asked"] >= 2:
                asked_twice.set()
            code = 200 if state["ready"] else 503
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, _, err = run(capsys, "proxy-await", "--admin-port", str(port), "--timeout", "300ms")
        assert code == 1
        assert f"the proxy on 127.0.0.1:{port} was not ready within 0.3s (HTTP 503)" in err
        result: list[int] = []
        waiter = threading.Thread(target=lambda: result.append(
            main(["proxy-await", "--admin-port", str(port), "--timeout", "10s"])))
        state["asked"] = 0
        asked_twice.clear()
        waiter.start()
        assert asked_twice.wait(10)  # still waiting while the proxy answers 503
        assert waiter.is_alive()
        state["ready"] = True
        waiter.join(10)
        assert result == [0]
    finally:
        server.shutdown()


def test_manual_inject_of_a_malformed_template_names_it(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    anchors = tmp_path / "ca.crt"
    anchors.write_text(ANCHORS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: oops}\n")
    code, out, err = run(capsys, "inject", "--manual", "--identity-trust-anchors-file", str(anchors), str(bad))
    assert code == 2 and out == ""
    assert f"{bad}: document 1 (Pod p): the pod template's spec.containers is not a list of objects" in err
