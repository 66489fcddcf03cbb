"""viz on a live local mesh: the seeds' PromQL and alert expressions, `viz stat/routes/edges/top/check`
against what a real client sent, and Prometheus supervised with the mesh.

One mesh for the module (the seeds' namespace, ``production``): ``api-service`` is the demo's books
application with every ``GET /books`` failing (``--failure-rate 1``), ``/authors`` answering 200 and
any other path 404 (a success: not a 5xx); ``frontend`` is a client that sends, at a fixed rate,
``/authors, /authors, /books, /nothing`` in turn and writes what it got. So 3 of 4 responses
succeed, and the client's own counts are the truth the numbers are held to. Prometheus scrapes
every second (``viz install --scrape-interval 1s``); every wait polls its API with a deadline.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.testing import netns
from tether.viz.promapi import Prometheus, Sample

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)
if not Path("/usr/bin/prometheus").exists():
    pytest.skip("Debian's prometheus is not installed (scripts/setup installs it)", allow_module_level=True)

TETHER = [sys.executable, "-m", "tether"]
NS = "production"
RPS = 8.0  # the client's rate
SUCCESS = 0.75  # 3 of its 4 requests succeed
WINDOW = "30s"
# Prometheus's increase() over a window extrapolates from the samples it holds: with 1 s scrapes
# and 30 s windows the counts land within a few percent; these bounds are the stated tolerance.
RATE_TOLERANCE = 0.15
SUCCESS_TOLERANCE = 0.05

MANIFESTS = f"""
apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: v1
kind: Service
metadata:
  name: api-service
  namespace: {NS}
spec:
  selector:
    app: api-service
  ports:
  - port: 8080
    targetPort: 8080
---
apiVersion: linkerd.io/v1alpha2
kind: ServiceProfile
metadata:
  name: api-service.{NS}.svc.cluster.local
  namespace: {NS}
spec:
  routes:
  - name: GET /books
    condition:
      method: GET
      pathRegex: /books
  - name: GET /authors
    condition:
      method: GET
      pathRegex: /authors
"""

RETRIES = MANIFESTS.replace("      pathRegex: /books\n", "      pathRegex: /books\n    isRetryable: true\n")

CLIENT = """
import json, os, sys, time, urllib.request, urllib.error
out, rps = sys.argv[1], float(sys.argv[2])
paths = ["/authors", "/authors", "/books", "/nothing"]
counts = {"start": time.time(), "byPath": {}, "ok": 0, "failed": 0, "sent": 0, "history": []}
n = 0
last = 0.0
next_at = time.monotonic()
while True:
    path = paths[n % len(paths)]
    n += 1
    try:
        with urllib.request.urlopen("http://api-service:8080" + path, timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception:
        status = 0
    counts["sent"] += 1
    counts["ok" if 0 < status < 500 else "failed"] += 1
    counts["byPath"].setdefault(path, {}).setdefault(str(status), 0)
    counts["byPath"][path][str(status)] += 1
    counts["now"] = time.time()
    if counts["now"] - last >= 1.0:  # once a second: (time, sent, ok), the last two minutes
        last = counts["now"]
        counts["history"] = (counts["history"] + [[last, counts["sent"], counts["ok"]]])[-120:]
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(counts, f)
    os.replace(tmp, out)
    next_at += 1.0 / rps
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


class VizMesh:
    def __init__(self, state: Path, work: Path) -> None:
        from test_local_mesh import Mesh

        self.mesh = Mesh(state)
        self.state = state
        self.work = work
        self.prom: Prometheus | None = None

    def tether(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.mesh.tether(*args, check=check, timeout=timeout)

    def viz(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tether("viz", *args, check=check)

    def viz_json(self, *args: str) -> Any:
        return json.loads(self.viz(*args, "-o", "json").stdout)

    def client(self) -> dict[str, Any]:
        return dict(json.loads((self.work / "client.json").read_text()))

    def query(self, promql: str) -> list[Sample]:
        assert self.prom is not None
        return self.prom.query(promql)

    def wait_query(self, promql: str, cond: Any, timeout: float = 60, what: str = "") -> list[Sample]:
        deadline = time.monotonic() + timeout
        got: list[Sample] = []
        while time.monotonic() < deadline:
            got = self.query(promql)
            if cond(got):
                return got
            time.sleep(0.5)
        raise AssertionError(f"{what or promql}: not there within {timeout:g}s; last answer {got}")


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:g}s")


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VizMesh]:
    base = tmp_path_factory.mktemp("viz")
    work = base / "work"
    work.mkdir()
    os.chmod(base, 0o755)
    os.chmod(work, 0o777)
    (work / "client.py").write_text(CLIENT)
    m = VizMesh(base / "state", work)
    try:
        m.mesh.up()
        m.mesh.apply(MANIFESTS)
        m.tether("run", "-n", NS, "api-service", "--port", "8080", "--", sys.executable, "-m", "tether.demo",
                 "books", "--port", "8080", "--failure-rate", "1")
        out = m.viz("install", "--scrape-interval", "1s").stdout
        url = re.search(r"Prometheus ready at (http://127\.0\.0\.1:\d+)", out)
        assert url is not None, out
        m.prom = Prometheus(url.group(1))
        m.tether("run", "-n", NS, "frontend", "--", sys.executable, str(work / "client.py"),
                 str(work / "client.json"), str(RPS))
        yield m
    finally:
        if (m.state / "mesh.json").exists():
            subprocess.run([*TETHER, "down", "--state-dir", str(m.state)], capture_output=True, timeout=120)


def _traffic_for(vm: VizMesh, seconds: float) -> None:
    """Wait until the client has been sending for ``seconds`` and Prometheus holds that span."""
    wait_for(lambda: (vm.work / "client.json").exists() and vm.client()["now"] - vm.client()["start"] >= seconds,
             seconds + 60, f"{seconds:g}s of client traffic")
    vm.wait_query('sum(response_total{direction="inbound",deployment="api-service"})',
                  lambda r: bool(r) and r[0].value >= seconds * RPS * 0.8, 30, "the client's requests scraped")


def client_window(c: dict[str, Any], seconds: float = 30.0) -> tuple[float, float]:
    """The client's own request rate and success share over its last ``seconds``."""
    hist = c["history"]
    end = hist[-1]
    start = next((h for h in hist if h[0] >= end[0] - seconds), hist[0])
    sent, ok = end[1] - start[1], end[2] - start[2]
    return sent / (end[0] - start[0]), ok / sent


def _one(samples: list[Sample], **labels: str) -> Sample:
    found = [s for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"want one series with {labels}, got {[s.labels for s in found]} of {samples}"
    return found[0]


def _short(promql: str) -> str:
    return promql.replace("[5m]", f"[{WINDOW}]")


# --- 1. Prometheus, supervised with the mesh ------------------------------------------------------


def test_prometheus_scrapes_every_proxy_and_component_with_the_seeds_labels(vm: VizMesh) -> None:
    assert vm.prom is not None
    pods = {p["name"]: p for p in vm.mesh.pods()}
    # Every proxy and controller is a target, labelled as the seeds' queries need.
    def targets_up() -> list[dict[str, Any]] | None:
        ts = [t for t in vm.prom.targets() if t["labels"]["job"] in ("linkerd-proxy", "linkerd-controller")]  # type: ignore[union-attr]
        return ts if len(ts) == len(pods) + 2 and all(t["health"] == "up" for t in ts) else None

    ts = wait_for(targets_up, 30, "every proxy and controller scraped")
    proxies = {t["labels"]["pod"]: t["labels"] for t in ts if t["labels"]["job"] == "linkerd-proxy"}
    assert set(proxies) == set(pods)
    assert proxies["api-service-0"]["namespace"] == NS and proxies["api-service-0"]["deployment"] == "api-service"
    assert proxies["frontend-0"]["deployment"] == "frontend" and proxies["frontend-0"]["app"] == "frontend"
    comps = {t["labels"]["component"]: t["labels"] for t in ts if t["labels"]["job"] == "linkerd-controller"}
    assert set(comps) == {"identity", "destination"} and comps["identity"]["namespace"] == "linkerd"
    # Loopback only, 6 h retention, and a child of the supervisor.
    status = json.loads(vm.tether("status", "-o", "json").stdout)
    addon = next(a for a in status["addons"] if a["name"] == "prometheus")
    assert "--storage.tsdb.retention.time=6h" in addon["argv"]
    assert any(a.startswith("--web.listen-address=127.0.0.1:") for a in addon["argv"])
    # Scaling changes the targets: the supervisor keeps the discovery files in step.
    vm.tether("scale", "-n", NS, "api-service", "--replicas", "2")
    wait_for(lambda: {"api-service-0", "api-service-1"} <= {
        t["labels"].get("pod") for t in vm.prom.targets() if t["health"] == "up"}, 30,  # type: ignore[union-attr]
        "the new pod scraped")
    vm.tether("scale", "-n", NS, "api-service", "--replicas", "1")
    wait_for(lambda: "api-service-1" not in {t["labels"].get("pod") for t in vm.prom.targets()},  # type: ignore[union-attr]
             30, "the removed pod no longer a target")
    # Its series end at once (Prometheus marks them stale), so no alert sees a pod that is gone.
    vm.wait_query('up{pod="api-service-1"}', lambda r: r == [], 30, "the removed pod's series stale")


def test_a_killed_prometheus_is_restarted(vm: VizMesh) -> None:
    assert vm.prom is not None
    status = json.loads(vm.tether("status", "-o", "json").stdout)
    pid = next(a["pid"] for a in status["addons"] if a["name"] == "prometheus")
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        st = json.loads(vm.tether("status", "-o", "json").stdout)
        a = next(a for a in st["addons"] if a["name"] == "prometheus")
        return bool(a["pid"] and a["pid"] != pid and vm.prom.ready())  # type: ignore[union-attr]

    wait_for(restarted, 30, "Prometheus restarted by the supervisor")
    # `viz install` again with other flags: the running Prometheus reloads its configuration.
    def interval() -> str:
        with urllib.request.urlopen(f"{vm.prom.url}/api/v1/status/config", timeout=5) as r:  # type: ignore[union-attr]
            m = re.search(r"scrape_interval: (\S+)", json.loads(r.read())["data"]["yaml"])
        return m.group(1) if m else ""

    assert interval() == "1s"
    vm.viz("install", "--scrape-interval", "2s")
    assert interval() == "2s"
    vm.viz("install", "--scrape-interval", "1s")
    assert interval() == "1s"


# --- 2. the seeds' PromQL and alert expressions -----------------------------------------------


def test_a_snapshot_reads_every_query_at_prometheus_s_own_instant(vm: VizMesh) -> None:
    assert vm.prom is not None
    _traffic_for(vm, 5)
    snap = vm.prom.snapshot()
    assert snap.at is not None and abs(snap.at - time.time()) < 5  # Prometheus's clock, asked for
    total = 'sum(request_total{direction="inbound",deployment="api-service"})'
    at_instant = snap.query(total)
    assert at_instant and at_instant[0].value > 0
    # Scrapes land after the instant (Prometheus's now counts more); the snapshot still reads the same.
    vm.wait_query(total, lambda r: bool(r) and r[0].value > at_instant[0].value, 30, "a later scrape")
    assert snap.query(total) == at_instant
    assert snap.query("time()")[0].value == pytest.approx(snap.at)


def test_the_seeds_promql_returns_the_right_series(vm: VizMesh) -> None:
    _traffic_for(vm, 35)
    # 004 "Request rate": rate(request_total[5m]). With under 5 minutes of samples a 5m rate is an
    # underestimate, so the labels come from the seed's query and the value from the same query
    # over 30s.
    r = vm.query("rate(request_total[5m])")
    api_in = [s for s in r if s.labels.get("deployment") == "api-service" and s.labels.get("direction") == "inbound"]
    assert api_in and all(s.labels["namespace"] == NS and s.labels["pod"] == "api-service-0" for s in api_in)
    fe_out = [s for s in r if s.labels.get("deployment") == "frontend" and s.labels.get("direction") == "outbound"]
    assert fe_out and all(s.labels.get("dst_deployment") == "api-service" and s.labels.get("dst_namespace") == NS
                          and s.labels.get("dst_service") == "api-service" for s in fe_out)
    assert all(0 < s.value <= RPS * (1 + RATE_TOLERANCE) for s in api_in)
    # Against what the client sent over the same 30 s (under load it sends less than its nominal
    # rate), read again while a scrape that missed its deadline keeps the two apart (see agreeing).
    short_query = _short("sum(rate(request_total{direction=\"inbound\",deployment=\"api-service\"}[5m]))")
    deadline = time.monotonic() + 20
    while True:
        got, sent = vm.query(short_query)[0].value, client_window(vm.client())[0]
        if abs(got - sent) <= RATE_TOLERANCE * sent or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert got == pytest.approx(sent, rel=RATE_TOLERANCE)
    # "Success rate": every response_total in the mesh is api-service's (its own and frontend's view).
    sr = vm.query('sum(rate(response_total{classification="success"}[5m]))\n/\nsum(rate(response_total[5m]))')
    assert len(sr) == 1 and sr[0].labels == {} and sr[0].value == pytest.approx(SUCCESS, abs=SUCCESS_TOLERANCE)
    # "Latency (p95)": one series, in milliseconds, plausible for a loopback HTTP server.
    p95 = vm.query("histogram_quantile(0.95,\n  sum(rate(response_latency_ms_bucket[5m])) by (le)\n)")
    assert len(p95) == 1 and 0 < p95[0].value < 1000
    # "TCP connection count": per proxy, labelled; api-service holds frontend's connection(s).
    tcp = vm.query("tcp_open_connections")
    api_tcp = [s for s in tcp if s.labels.get("deployment") == "api-service" and s.labels["direction"] == "inbound"]
    assert api_tcp and sum(s.value for s in api_tcp) >= 1
    # "Proxy CPU usage" / "Proxy memory usage": one series per proxy (and per controller).
    pods = {p["name"] for p in vm.mesh.pods()}
    cpu = vm.query("process_cpu_seconds_total")
    assert {s.labels["pod"] for s in cpu if s.labels["job"] == "linkerd-proxy"} == pods
    assert all(s.value > 0 for s in cpu)
    rss = vm.query("process_resident_memory_bytes")
    assert {s.labels["pod"] for s in rss if s.labels["job"] == "linkerd-proxy"} == pods
    assert all(10 * 2 ** 20 < s.value < 2 * 2 ** 30 for s in rss if s.labels["job"] == "linkerd-proxy")
    # 003's alert table: request_total has no classification (a request's class is known only with
    # its response), so that selector is empty; the response_total one is not.
    assert vm.query('request_total{direction="inbound", classification="failure"}') == []
    assert vm.query('response_total{direction="inbound", classification="failure"}')
    assert vm.query('response_latency_ms_bucket{le="1000"}')


def test_the_seeds_alert_expressions_fire_as_meant(vm: VizMesh) -> None:
    _traffic_for(vm, 35)
    # LinkerdServiceLowSuccessRate, the seed's text: api-service at 75% fires. So does frontend:
    # the seed's rule lacks direction="inbound" and counts frontend's calls as its own answers.
    low = vm.query(_short('(\n  sum(rate(response_total{classification="success",namespace="production"}[5m])) '
                          'by (deployment)\n  /\n  sum(rate(response_total{namespace="production"}[5m])) '
                          'by (deployment)\n) < 0.99'))
    assert _one(low, deployment="api-service").value == pytest.approx(SUCCESS, abs=SUCCESS_TOLERANCE)
    assert {s.labels["deployment"] for s in low} == {"api-service", "frontend"}
    # tether's shipped version of the same rule counts inbound only: api-service alone.
    from tether.viz.alerts import prometheus_rule

    rules = {r["alert"]: r["expr"] for g in prometheus_rule("linkerd", NS)["spec"]["groups"] for r in g["rules"]}
    mine = vm.query(_short(rules["LinkerdServiceLowSuccessRate"]))
    assert [s.labels for s in mine] == [{"namespace": NS, "deployment": "api-service"}]
    # LinkerdServiceHighLatency: nothing is slow, so nothing; the quantile under it is per deployment.
    high = ('histogram_quantile(0.99,\n  sum(rate(response_latency_ms_bucket{namespace="production"}[5m])) '
            'by (le, deployment)\n)')
    assert vm.query(high + " > 1000") == []
    p99 = vm.query(_short(high))
    assert {s.labels["deployment"] for s in p99} == {"api-service", "frontend"}
    assert all(0 < s.value < 1000 for s in p99)
    # LinkerdCertificateExpiringSoon: the identity service exports the seed's metric (its issuer
    # certificate, a year for `tether up`'s own CA): not firing, the days left plausible.
    cert = "(linkerd_identity_cert_expiration_timestamp_seconds - time()) / 86400"
    assert vm.query(cert + " < 7") == []
    days = vm.query(cert)
    assert len(days) == 1 and days[0].labels["component"] == "identity" and 7 < days[0].value < 3700
    # LinkerdControlPlaneDown: silent while the control plane answers; fires once destination stops
    # answering its scrapes (SIGSTOP: the process is there but does not answer).
    down = 'up{namespace="linkerd",job="linkerd-controller"} == 0'
    assert vm.query(down) == []
    assert len(vm.query('up{namespace="linkerd",job="linkerd-controller"}')) == 2
    status = json.loads(vm.tether("status", "-o", "json").stdout)
    dest = next(c for c in status["components"] if c["kind"] == "destination")
    os.kill(dest["pid"], signal.SIGSTOP)
    try:
        fired = vm.wait_query(down, lambda r: bool(r), 30, "LinkerdControlPlaneDown firing")
        assert [s.labels["component"] for s in fired] == ["destination"]
        comp_down = vm.query(rules["TetherControlPlaneComponentDown"])
        assert [s.labels["component"] for s in comp_down] == ["destination"]
    finally:
        os.kill(dest["pid"], signal.SIGCONT)
    vm.wait_query(down, lambda r: r == [], 30, "LinkerdControlPlaneDown cleared")


def test_tethers_own_rules_evaluate_quietly_on_a_healthy_mesh(vm: VizMesh) -> None:
    from tether.viz.alerts import prometheus_rule

    for group in prometheus_rule("linkerd", NS)["spec"]["groups"]:
        for rule in group["rules"]:
            got = vm.query(_short(rule["expr"]))
            if rule["alert"] == "LinkerdServiceLowSuccessRate":
                assert [s.labels["deployment"] for s in got] == ["api-service"]
            else:
                assert got == [], (rule["alert"], got)
    # The local Prometheus loaded the same rules.
    assert vm.prom is not None
    loaded = {r["name"] for g in vm.prom.rules() for r in g["rules"]}
    assert {"LinkerdServiceLowSuccessRate", "TetherProxyNotReady", "TetherIssuerCertificateExpiringSoon"} <= loaded


# --- 3. the commands against what the client sent ----------------------------------------------


def _row(doc: dict[str, Any], name: str) -> dict[str, Any]:
    rows = [r for t in doc["statTables"] for r in t["podGroup"]["rows"] if r["resource"]["name"] == name]
    assert len(rows) == 1, doc
    return rows[0]


def agreeing(vm: VizMesh, read: Any, rate_share: float = 1.0, success: float | None = None,
             timeout: float = 30) -> dict[str, Any]:
    """A row whose RPS (and success rate) agree with the client's own counts over the last window.

    The row and the client's counts are read a moment apart by two processes on a shared machine;
    when they disagree (a scrape that missed its 1 s deadline under load), both are read again,
    until ``timeout``; then the last pair is asserted."""
    deadline = time.monotonic() + timeout
    while True:
        row = read()
        rps, ok = client_window(vm.client())
        want_rps, want_ok = rps * rate_share, ok if success is None else success
        good = row["rps"] is not None and abs(row["rps"] - want_rps) <= RATE_TOLERANCE * want_rps and (
            row["successRate"] is not None and abs(row["successRate"] - want_ok) <= SUCCESS_TOLERANCE)
        if good or time.monotonic() > deadline:
            assert row["rps"] == pytest.approx(want_rps, rel=RATE_TOLERANCE), row
            assert row["successRate"] == pytest.approx(want_ok, abs=SUCCESS_TOLERANCE), row
            return dict(row)
        time.sleep(1)


def test_stat_matches_what_the_client_sent(vm: VizMesh) -> None:
    _traffic_for(vm, 35)
    c0 = vm.client()
    # The client's own success share (exactly 3 of 4 by design).
    assert c0["ok"] / c0["sent"] == pytest.approx(SUCCESS, abs=0.01) and c0["failed"] > 0
    docs: list[dict[str, Any]] = []

    def api_row() -> dict[str, Any]:
        docs.append(vm.viz_json("stat", "deploy", "-n", NS, "-t", WINDOW))
        return _row(docs[-1], "api-service")

    api = agreeing(vm, api_row)
    doc = docs[-1]
    client_rps, _ = client_window(vm.client())
    assert api["meshedPodCount"] == 1 and api["runningPodCount"] == 1
    stats = api["stats"]
    count = stats["successCount"] + stats["failureCount"]
    assert count == pytest.approx(client_rps * 30, rel=RATE_TOLERANCE)
    assert 0 < stats["latencyMsP50"] <= stats["latencyMsP95"] <= stats["latencyMsP99"] < 1000
    assert api["tcpStats"]["openConnections"] >= 1
    # frontend answers nothing (it only calls): meshed, no inbound traffic.
    fe = _row(doc, "frontend")
    assert fe["meshedPodCount"] == 1 and fe["stats"] is None
    # The edge from frontend, counted by frontend's proxy: the same numbers, no retries.
    edge = agreeing(vm, lambda: _row(vm.viz_json("stat", "deploy/api-service", "-n", NS, "--from", "deploy/frontend",
                                                 "-t", WINDOW), "api-service"))
    assert edge["stats"]["actualRetries"] == 0
    agreeing(vm, lambda: _row(vm.viz_json("stat", "deploy/frontend", "-n", NS, "--to", "deploy/api-service", "-t",
                                          WINDOW), "frontend"))
    # The table: Linkerd's columns, the same numbers.
    table = vm.viz("stat", "deploy", "-n", NS, "-t", WINDOW).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99",
                                "TCP_CONN"]
    api_line = next(ln.split() for ln in lines if ln.startswith("api-service"))
    assert api_line[1] == "1/1" and float(api_line[2].rstrip("%")) == pytest.approx(75, abs=5)
    # Namespaces, pods, services and authorities.
    ns_row = agreeing(vm, lambda: _row(vm.viz_json("stat", "ns", "-A", "-t", WINDOW), NS))
    assert ns_row["meshedPodCount"] == 2
    agreeing(vm, lambda: _row(vm.viz_json("stat", "po", "-n", NS, "-t", WINDOW), "api-service-0"))
    agreeing(vm, lambda: _row(vm.viz_json("stat", "svc/api-service", "-n", NS, "-t", WINDOW), "api-service"))
    agreeing(vm, lambda: _row(vm.viz_json("stat", "authority", "-n", NS, "-t", WINDOW), "api-service:8080"))


def test_routes_edges_top_and_check(vm: VizMesh) -> None:
    _traffic_for(vm, 35)
    def route(name: str) -> Any:
        def read() -> dict[str, Any]:
            rows = {r["route"]: r for r in vm.viz_json("routes", "deploy/api-service", "-n", NS, "-t",
                                                       WINDOW)["routes"]}
            assert set(rows) == {"GET /authors", "GET /books", "[DEFAULT]"}
            return rows[name]
        return read

    agreeing(vm, route("GET /authors"), rate_share=1 / 2, success=1.0)
    agreeing(vm, route("GET /books"), rate_share=1 / 4, success=0.0)
    agreeing(vm, route("[DEFAULT]"), rate_share=1 / 4, success=1.0)  # 404 is not a failure
    table = vm.viz("routes", "deploy/frontend", "-n", NS, "--to", "svc/api-service", "-t", WINDOW).stdout
    assert table.splitlines()[0].split()[:4] == ["ROUTE", "SERVICE", "SUCCESS", "RPS"]
    assert re.search(r"^GET /books +api-service:8080 +0\.00% ", table, re.M), table
    edges = vm.viz_json("edges", "deploy", "-n", NS)["edges"]
    edge = next(e for e in edges if e["src"] == "frontend" and e["dst"] == "api-service")
    assert edge["secured"] is True
    assert edge["clientId"] == f"frontend.{NS}.serviceaccount.identity.linkerd.cluster.local"
    assert edge["serverId"] == f"api-service.{NS}.serviceaccount.identity.linkerd.cluster.local"
    top = vm.viz("top", "deploy/frontend", "-n", NS, "--once").stdout
    lines = top.splitlines()
    assert lines[1].split()[:3] == ["SOURCE", "DESTINATION", "ROUTE"]
    first = lines[2].split()
    assert first[0] == f"{NS}/frontend-0" and first[1] == "api-service:8080" and " ".join(first[2:4]) == "GET /authors"
    assert vm.viz("top", "deploy/frontend", "-n", NS, "--count", "2", "--interval", "0.2s").stdout.count("SOURCE") == 2
    check = vm.viz("check")
    assert "√ data is fresh" in check.stdout
    assert re.search(r"√ every one of the \d+ proxies accepts a tap", check.stdout), check.stdout
    assert "Status check results are √" in check.stdout


def test_every_dashboard_panel_query_runs_against_the_live_prometheus(vm: VizMesh) -> None:
    from tether.viz.grafana import render

    _traffic_for(vm, 35)
    values = {"$namespace": NS, "$deployment": "api-service", "$pod": "api-service-0", "$dst": "api-service:8080",
              "$__rate_interval": WINDOW}

    def fill(expr: str) -> str:
        for k, v in values.items():
            expr = expr.replace(k, v)
        return expr

    ran = 0
    for name, text in render().items():
        doc = json.loads(text)
        for var in doc["templating"]["list"]:
            if var["type"] == "query":
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"])
                assert m is not None, var
                got = vm.query(f"group by ({m.group(2)}) ({fill(m.group(1))})")
                assert {s.labels[m.group(2)] for s in got} >= {values[f"${var['name']}"]}, (name, var["name"], got)
        for panel in doc["panels"]:
            for t in panel["targets"]:
                got = vm.query(fill(t["expr"]))  # a query Prometheus refuses raises here
                ran += 1
                if "Empty until" not in panel.get("description", ""):
                    assert got, (name, panel["title"], t["expr"])
                    assert all(not math.isnan(s.value) for s in got), (name, panel["title"], got)
    assert ran >= 30


class Cdp:
    """Chromium's DevTools protocol over its websocket: commands, and the events seen meanwhile."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.n = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 15) -> dict[str, Any]:
        self.n += 1
        msg: dict[str, Any] = {"id": self.n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            got = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if got.get("id") == self.n:
                assert "error" not in got, got
                return dict(got["result"])
            self.events.append(got)

    def eval(self, expr: str, session: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(json.dumps(p["exceptionDetails"])[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Cdp]:
    exe = "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.skip("Debian's chromium is not installed (scripts/setup installs it)")
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'chromium'}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = ""
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while not url and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            url = m.group(1) if m else ""
        assert url, "chromium did not start its DevTools endpoint"
        from websockets.sync.client import connect

        with connect(url, max_size=None) as ws:
            yield Cdp(ws)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_web_dashboard_shows_the_clis_numbers_in_a_real_browser(vm: VizMesh, chromium: Cdp) -> None:
    _traffic_for(vm, 35)
    dash = subprocess.Popen([*TETHER, "viz", "dashboard", "--port", "0", "--state-dir", str(vm.state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dash.stdout is not None
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", dash.stdout.readline())
        assert m is not None
        target = chromium.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = chromium.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            chromium.call(f"{domain}.enable", {}, session)
        chromium.call("Page.navigate", {"url": m.group(1) + "#" + NS}, session)

        def state() -> dict[str, Any]:
            return dict(chromium.eval("JSON.parse(JSON.stringify(window.tetherState || {}))", session) or {})

        # It refreshes on its own: a second refresh comes without anything done to the page.
        wait_for(lambda: state().get("refreshes", 0) >= 2 and state().get("workloads"), 30, "two refreshes")
        assert state()["error"] is None and state()["namespace"] == NS
        cells = chromium.eval("[...document.querySelectorAll('#workloads tbody tr')]"
                              ".map(tr => [...tr.cells].map(c => c.textContent))", session)
        page = {row[0]: row for row in cells}
        cli = vm.viz_json("stat", "deploy", "-n", NS)
        for r in (r for t in cli["statTables"] for r in t["podGroup"]["rows"]):
            row = page[r["resource"]["name"]]
            assert row[1] == f"{r['meshedPodCount']}/{r['runningPodCount']}"
            if r["rps"] is None:
                assert row[2] == "-" and row[3] == "-"
            else:
                assert float(row[2].rstrip("%")) == pytest.approx(r["successRate"] * 100, abs=SUCCESS_TOLERANCE * 100)
                assert float(row[3].removesuffix("rps")) == pytest.approx(r["rps"], rel=RATE_TOLERANCE)
        # A workload's routes, after a click.
        chromium.eval("[...document.querySelectorAll('#workloads tbody tr')]"
                      ".find(tr => tr.cells[0].textContent === 'api-service').click()", session)
        wait_for(lambda: {r["route"] for r in state().get("routes", [])} >= {"GET /books", "GET /authors"}, 20,
                 "the routes of api-service")
        routes = chromium.eval("[...document.querySelectorAll('#routes tbody tr')].map(tr => tr.cells[0].textContent)",
                               session)
        assert "GET /books" in routes and "[DEFAULT]" in routes
        # The edges as a graph: both workloads, joined by a secured line.
        nodes = chromium.eval("[...document.querySelectorAll('#edges g.node')].map(g => g.dataset.name)", session)
        assert {f"{NS}/frontend", f"{NS}/api-service"} <= set(nodes)
        assert chromium.eval("document.querySelectorAll('#edges line.secured').length", session) >= 1
        # Live tap of the selected workload, started in the page: the client's requests appear as
        # rows (its paths, their statuses: /authors 200, /books 500, /nothing 404).
        wait_for(lambda: chromium.eval("document.getElementById('tap').dataset.tap", session) == "available", 10,
                 "live tap available")
        wait_for(lambda: chromium.eval("!document.getElementById('tap-start').disabled", session), 10,
                 "the tap button enabled for api-service")
        chromium.eval("document.getElementById('tap-start').click()", session)
        wait_for(lambda: int(chromium.eval("document.getElementById('tap').dataset.rows || '0'", session)) >= 6, 30,
                 "tap rows in the page")
        rows = chromium.eval("[...document.querySelectorAll('#tap-events tbody tr')]"
                             ".map(tr => [...tr.cells].map(c => c.textContent))", session)
        seen = {(r[1], r[3], r[4]) for r in rows}
        assert seen <= {("GET", "/authors", "200"), ("GET", "/books", "500"), ("GET", "/nothing", "404")}, seen
        assert ("GET", "/authors", "200") in seen and ("GET", "/books", "500") in seen, seen
        assert all(r[5].endswith("ms") for r in rows)
        chromium.eval("document.getElementById('tap-stop').click()", session)
        wait_for(lambda: "stopped" in chromium.eval("document.getElementById('tap-status').textContent", session),
                 10, "the tap stopped")
        assert chromium.errors() == []
    finally:
        dash.terminate()
        dash.wait(10)


def test_retries_show_as_actual_versus_effective(vm: VizMesh) -> None:
    vm.mesh.apply(RETRIES)
    applied = time.time()
    # Wait until a whole window has passed under the retrying profile.
    wait_for(lambda: vm.client()["now"] - applied >= 35, 90, "35s of traffic with retries")
    doc = vm.viz_json("stat", "deploy/api-service", "-n", NS, "--from", "deploy/frontend", "-t", WINDOW)
    row = _row(doc, "api-service")
    st = row["stats"]
    # Every GET /books fails, so each is retried: the proxy sent more than the client asked.
    assert st["actualRetries"] > 0
    assert st["actualFailureCount"] > st["failureCount"]
    assert row["actualRps"] > row["rps"] * 1.05
    # The seed's jq path works on this shape.
    assert [r["stats"]["actualRetries"] for t in doc["statTables"] for r in t["podGroup"]["rows"]] == [
        st["actualRetries"]]
    wide = vm.viz("stat", "deploy/api-service", "-n", NS, "--from", "deploy/frontend", "-t", WINDOW,
                  "-o", "wide").stdout
    assert "ACTUAL_SUCCESS" in wide.splitlines()[0] and "ACTUAL_RPS" in wide.splitlines()[0]
    assert not math.isnan(row["actualSuccessRate"]) and row["actualSuccessRate"] < row["successRate"] + 1e-9


def test_diagnostics_print_the_proxies_and_controllers_metrics(vm: VizMesh) -> None:
    out = vm.tether("diagnostics", "proxy-metrics", "-n", NS, "po/api-service-0").stdout
    assert out.startswith("#\n# POD api-service-0 (1 of 1)\n# CONTAINER linkerd-proxy\n#\n")
    assert re.search(r'^response_total\{direction="inbound",authority="api-service:8080".*classification="failure"',
                     out, re.M)
    # The seeds' spelling: `viz diagnostics proxy-metrics POD -n NS`; and a deployment's pods.
    seed = vm.tether("viz", "diagnostics", "proxy-metrics", "api-service-0", "-n", NS).stdout
    assert "# POD api-service-0" in seed and "process_resident_memory_bytes" in seed
    assert "# POD frontend-0 (1 of 1)" in vm.tether("diagnostics", "proxy-metrics", "-n", NS, "deploy/frontend").stdout
    cp = vm.tether("diagnostics", "controller-metrics").stdout
    assert "# POD identity-0 (1 of 2)\n# CONTAINER identity" in cp and "# POD destination-0 (2 of 2)" in cp
    assert "linkerd_identity_cert_expiration_timestamp_seconds" in cp and "destination_streams" in cp
    bad = vm.tether("diagnostics", "proxy-metrics", "-n", NS, "nope-0", check=False)
    assert bad.returncode == 1 and "no pod nope-0 in namespace production" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_uninstall_stops_prometheus_and_down_leaves_nothing(vm: VizMesh) -> None:
    status = json.loads(vm.tether("status", "-o", "json").stdout)
    pid = next(a["pid"] for a in status["addons"] if a["name"] == "prometheus")
    out = vm.viz("uninstall").stdout
    assert "stopped" in out
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    assert not (vm.state / "viz").exists()
    r = vm.viz("stat", "deploy", "-n", NS, check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "no Prometheus: run `tether viz install" in r.stderr
    # Installed again, then `tether down` stops it with the rest.
    vm.viz("install", "--scrape-interval", "1s")
    status = json.loads(vm.tether("status", "-o", "json").stdout)
    pid = next(a["pid"] for a in status["addons"] if a["name"] == "prometheus")
    vm.tether("down")
    assert not Path(f"/proc/{pid}").exists()
    assert not vm.state.exists()
