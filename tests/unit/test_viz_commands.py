"""viz's layers without a mesh: the Prometheus configs (checked by promtool), the queries, the stat
arithmetic over a scripted Prometheus, the web API's refusals, and the commands' one-line errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether.viz import promconfig
from tether.viz import queries as q
from tether.viz.promapi import Sample
from tether.viz.stat import MetricsApi, Resource, StatError, window_seconds

PROMTOOL = shutil.which("promtool")


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60)


# --- configs ----------------------------------------------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package)")
def test_local_and_kubernetes_configs_pass_promtool(tmp_path: Path) -> None:
    from tether.viz.alerts import prometheus_rule

    rules = tmp_path / "rules.yml"
    rules.write_text(promconfig.dump({"groups": prometheus_rule()["spec"]["groups"]}))
    local = tmp_path / "local.yml"
    local.write_text(promconfig.dump(promconfig.local_config(tmp_path / "scrape", "1s", [str(rules)],
                                                             self_addr="127.0.0.1:9090")))
    r = subprocess.run([str(PROMTOOL), "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Debian builds Prometheus without Kubernetes discovery (promtool refuses kubernetes_sd_configs),
    # so the Kubernetes jobs are checked here with the same config minus their discovery block.
    kube = tmp_path / "kube.yml"
    jobs = [{k: v for k, v in j.items() if k != "kubernetes_sd_configs"} for j in promconfig.kubernetes_jobs()]
    kube.write_text(promconfig.dump({"scrape_configs": jobs}))
    r = subprocess.run([str(PROMTOOL), "check", "config", str(kube)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_jobs_are_the_seeds_with_the_missing_labels() -> None:
    jobs = {j["job_name"]: j for j in promconfig.kubernetes_jobs("linkerd")}
    assert set(jobs) == {"linkerd-controller", "linkerd-service-mirror", "linkerd-proxy"}
    ctl = jobs["linkerd-controller"]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"} in ctl
    proxy = jobs["linkerd-proxy"]["relabel_configs"]
    assert proxy[0]["regex"] == "^linkerd-proxy;linkerd-admin;linkerd$"
    assert proxy[-1] == {"action": "labelmap", "regex": "__tmp_pod_label_(.+)"}
    mirror = jobs["linkerd-service-mirror"]["relabel_configs"][0]
    assert mirror["source_labels"][0] == "__meta_kubernetes_pod_label_component"


def test_scrape_config_prints_kubernetes_jobs_without_a_mesh(tmp_path: Path) -> None:
    r = tether("viz", "scrape-config", "--state-dir", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert [j["job_name"] for j in doc["scrape_configs"]] == ["linkerd-controller", "linkerd-service-mirror",
                                                              "linkerd-proxy"]
    r = tether("viz", "scrape-config", "--platform", "local", "--state-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "no local mesh" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- queries ------------------------------------------------------------------------------------------


def test_selectors_and_queries_render_as_promql() -> None:
    sel = q.Selector.of({"namespace": "prod", "deployment": 'we"b'}, {"dst": "a|b"})
    assert sel.render() == '{deployment="we\\"b",namespace="prod",dst=~"a|b"}'
    assert q.responses(sel, "1m", ["namespace", "deployment"]) == (
        'sum(increase(response_total{deployment="we\\"b",namespace="prod",dst=~"a|b"}[1m])) '
        "by (namespace, deployment, classification)")
    assert q.latency(0.5, q.Selector.of({"direction": "inbound"}), "30s", ["pod"], "route_") == (
        'histogram_quantile(0.5, sum(irate(route_response_latency_ms_bucket{direction="inbound"}[30s])) by (le, pod))')
    rx = q.authority_regex("books", "demo")
    for a in ("books", "books:8080", "books.demo:8080", "books.demo.svc.cluster.local:8080"):
        assert re.fullmatch(rx, a), a
    for a in ("books.other:8080", "bookstore:8080", "books.demo.svc.example.org:80"):
        assert not re.fullmatch(rx, a), a


# --- stat over a scripted Prometheus ---------------------------------------------------------------


class ScriptedPrometheus:
    """Answers by the first rule whose pattern the query contains; records the queries."""

    def __init__(self, rules: list[tuple[str, list[Sample]]], at: float | None = None,
                 seen: list[str] | None = None, times: list[float | None] | None = None) -> None:
        self.rules = rules
        self.at = at
        self.seen: list[str] = [] if seen is None else seen
        self.times: list[float | None] = [] if times is None else times  # the instant of each query

    def snapshot(self) -> ScriptedPrometheus:
        return ScriptedPrometheus(self.rules, 1000.0 + len(self.seen), self.seen, self.times)

    def query(self, promql: str, time: float | None = None) -> list[Sample]:
        self.seen.append(promql)
        self.times.append(time if time is not None else self.at)
        for pattern, samples in self.rules:
            if re.search(pattern, promql):
                return samples
        return []


def S(value: float, **labels: str) -> Sample:
    return Sample(labels, value)


def test_stat_from_computes_effective_actual_and_retries() -> None:
    edge = {"dst_namespace": "prod", "dst_deployment": "api", "authority": "api:8080"}
    prom = ScriptedPrometheus([
        (r"^sum\(increase\(response_total\{", [S(60, **edge, classification="success"),
                                               S(20, **edge, classification="failure")]),
        (r"route_actual_response_total", [S(60, dst="api:8080", classification="success"),
                                          S(50, dst="api:8080", classification="failure")]),
        (r"histogram_quantile\(0.5,", [S(3.0, dst_namespace="prod", dst_deployment="api")]),
    ])
    rows = MetricsApi(prom).stat(Resource("deployment", "api", "prod"), "1m",  # type: ignore[arg-type]
                                 from_=Resource("deployment", "web", "prod"))
    assert len(rows) == 1
    r = rows[0]
    assert r["resource"] == {"namespace": "prod", "type": "deployment", "name": "api"}
    assert r["successRate"] == 0.75 and r["rps"] == pytest.approx(80 / 60)
    assert r["stats"]["actualRetries"] == 30  # 110 tries for 80 requests
    assert r["stats"]["actualFailureCount"] == 50 and r["actualRps"] == pytest.approx(110 / 60)
    assert r["stats"]["latencyMsP50"] == 3.0 and r["stats"]["latencyMsP95"] is None
    assert r["tcpStats"] is None  # an edge has no connection count of its own
    # The edge is selected by the client's labels and the destination's dst_* labels.
    first = prom.seen[0]
    for m in ('direction="outbound"', 'namespace="prod"', 'deployment="web"', 'dst_deployment="api"',
              'dst_namespace="prod"'):
        assert m in first
    assert 'dst=~"api:8080"' in next(s for s in prom.seen if "route_actual_" in s)


def test_each_command_reads_one_instant() -> None:
    # A retry count is the difference of two queries; were they evaluated a scrape apart, the
    # requests of that scrape would show as retries. Every query of one command names one instant.
    edge = {"dst_namespace": "prod", "dst_deployment": "api", "authority": "api:8080"}
    prom = ScriptedPrometheus([(r"response_total", [S(60, **edge, classification="success")])])
    api = MetricsApi(prom)  # type: ignore[arg-type]
    api.stat(Resource("deployment", "api", "prod"), "1m", from_=Resource("deployment", "web", "prod"))
    first = set(prom.times)
    assert len(prom.times) > 3 and len(first) == 1 and None not in first
    api.stat(Resource("deployment", "api", "prod"), "1m", from_=Resource("deployment", "web", "prod"))
    assert len(set(prom.times)) == 2  # the next command, the next instant
    for run in (lambda: api.routes(Resource("deployment", "api", "prod")), lambda: api.edges("prod"),
                lambda: api.top(Resource("deployment", "api", "prod"))):
        n = len(prom.times)
        run()
        assert len(set(prom.times[n:])) == 1 and None not in prom.times[n:]


def test_stat_lists_idle_meshed_workloads_with_no_numbers() -> None:
    prom = ScriptedPrometheus([(r"response_total", [S(30, namespace="prod", deployment="api",
                                                          classification="success")])])
    rows = MetricsApi(prom).stat(Resource("deployment", "", "prod"), "30s",  # type: ignore[arg-type]
                                 pods={("prod", "api"): (2, 2), ("prod", "worker"): (1, 1), ("other", "x"): (1, 1)})
    assert [r["resource"]["name"] for r in rows] == ["api", "worker"]
    assert rows[0]["rps"] == 1.0 and rows[0]["meshedPodCount"] == 2
    assert rows[1]["stats"] is None and rows[1]["rps"] is None and rows[1]["meshedPodCount"] == 1


@pytest.mark.parametrize(("text", "message"), [
    ("foo/x", "unknown resource type 'foo'"),
])
def test_resource_errors_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(StatError, match=f"--to: {message}"):
        Resource.parse(text, "default", "--to")


def test_window_errors() -> None:
    assert window_seconds("90s") == 90 and window_seconds("2m") == 120
    for bad in ("1 m", "0s", "500ms", "abc"):
        with pytest.raises(StatError, match="--time-window"):
            window_seconds(bad)


def test_edges_join_client_identities() -> None:
    prom = ScriptedPrometheus([
        (r'direction="outbound"', [S(10, namespace="prod", deployment="web", serviceaccount="web",
                                     dst_namespace="prod", dst_deployment="api", tls="true",
                                     server_id="api.prod.serviceaccount.identity.linkerd.cluster.local"),
                                   S(5, namespace="prod", deployment="web", serviceaccount="web",
                                     dst_namespace="prod", dst_deployment="legacy", tls="no_identity",
                                     no_tls_reason="not_provided_by_service_discovery")]),
        (r'direction="inbound"', [S(10, namespace="prod", deployment="api",
                                    client_id="web.prod.serviceaccount.identity.linkerd.cluster.local")]),
    ])
    edges = MetricsApi(prom).edges("prod")  # type: ignore[arg-type]
    assert [(e["src"], e["dst"], e["secured"]) for e in edges] == [("web", "api", True), ("web", "legacy", False)]
    assert edges[0]["clientId"] == "web.prod.serviceaccount.identity.linkerd.cluster.local"
    assert edges[1]["msg"] == "not_provided_by_service_discovery"


# --- the web API ----------------------------------------------------------------------------------


def test_web_api_refuses_bad_parameters() -> None:
    from tether.viz.web import Api, BadRequest

    api = Api(MetricsApi(ScriptedPrometheus([])), lambda rtype: None)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="missing parameter namespace"):
        api.answer("/api/workloads", {})
    with pytest.raises(BadRequest, match="not a DNS label"):
        api.answer("/api/edges", {"namespace": ["Bad_NS"]})
    with pytest.raises(BadRequest, match="--time-window"):
        api.answer("/api/namespaces", {"window": ["soon"]})
    assert api.answer("/api/nothing", {}) is None
    assert api.answer("/api/tap", {})["available"] is False
    for qs, says in (({"resource": ["deploy"], "namespace": ["ns"]}, "parameter resource"),
                     ({"resource": ["deploy/web"]}, "missing parameter namespace"),
                     ({"resource": ["deploy/web"], "namespace": ["ns"], "seconds": ["0"]}, "parameter seconds"),
                     ({"resource": ["deploy/web"], "namespace": ["ns"], "max": ["5000"]}, "parameter max"),
                     ({"resource": ["deploy/web"], "namespace": ["ns"], "path": ["x"]}, "parameter path")):
        with pytest.raises(BadRequest, match=says):
            api.tap_params(qs)
    assert api.tap_params({"resource": ["deploy/web"], "namespace": ["ns"]}) == ("deploy/web", "ns", None, 30.0, 200)
    assert api.answer("/api/edges", {"namespace": ["prod"]}) == {"window": "1m", "edges": []}


# --- the commands' errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["viz", "stat", "deploy", "--prometheus-url", "ftp://x"], 2, "--prometheus-url: 'ftp://x' is not an http(s) URL"),
    (["viz", "stat", "widgets", "--prometheus-url", "http://127.0.0.1:9"], 2, "unknown resource type 'widgets'"),
    (["viz", "stat", "deploy", "-t", "soon", "--prometheus-url", "http://127.0.0.1:9"], 2, "--time-window"),
    (["viz", "stat", "deploy", "--prometheus-url", "http://127.0.0.1:9"], 1, "cannot reach Prometheus at"),
    (["viz", "routes", "ns/x", "--prometheus-url", "http://127.0.0.1:9"], 2, "is not one deployment, pod or service"),
    (["viz", "edges", "po", "--prometheus-url", "http://127.0.0.1:9"], 2, "edges are between deployments"),
    (["viz", "top", "ns/x", "--prometheus-url", "http://127.0.0.1:9"], 2, "is not one deployment or pod"),
    (["viz", "install", "--scrape-interval", "fast"], 2, "--scrape-interval: 'fast'"),
])
def test_bad_arguments_are_one_line(args: list[str], code: int, needle: str, tmp_path: Path) -> None:
    r = tether(*args, "--state-dir", str(tmp_path)) if args[1] in ("install",) else tether(*args)
    assert r.returncode == code, r.stdout + r.stderr
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_install_without_a_mesh_says_so(tmp_path: Path) -> None:
    r = tether("viz", "install", "--state-dir", str(tmp_path / "nomesh"))
    assert r.returncode == 1 and "no local mesh in" in r.stderr and "tether up" in r.stderr


def test_check_without_prometheus_fails_with_a_hint() -> None:
    r = tether("viz", "check", "--prometheus-url", "http://127.0.0.1:9")
    assert r.returncode == 1
    assert "× Prometheus is reachable and ready at http://127.0.0.1:9" in r.stdout  # noqa: RUF001
    assert "tether viz install" in r.stdout




def test_dashboard_on_a_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = tether("viz", "dashboard", "--port", str(port), "--prometheus-url", "http://127.0.0.1:9")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--address/--port)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_podmonitors_add_the_labels_the_alerts_group_by() -> None:
    r = tether("viz", "scrape-config", "--podmonitor", "-L", "linkerd")
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(r.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("PodMonitor", "linkerd-controller"),
                                                                  ("PodMonitor", "linkerd-proxy")]
    proxy = docs[1]["spec"]
    assert proxy["selector"] == {"matchLabels": {"linkerd.io/control-plane-ns": "linkerd"}}  # seed 003's
    ep = proxy["podMetricsEndpoints"][0]
    assert ep["port"] == "linkerd-admin" and ep["path"] == "/metrics"
    # linkerd.io/proxy-deployment -> deployment; the pod's own labels kept.
    assert {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_linkerd_io_proxy_(.+)"} in ep["relabelings"]
    assert ep["relabelings"][-1] == {"action": "labelmap", "regex": "__tmp_pod_label_(.+)"}
    # In the operator's spelling (camelCase), not the scrape config's.
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_linkerd_io_proxy_job"], "action": "replace",
            "targetLabel": "k8s_job"} in ep["relabelings"]
    assert "&id" not in r.stdout  # no YAML aliases
    ctl = docs[0]["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"action": "replace", "targetLabel": "job", "replacement": "linkerd-controller"} in ctl
    bad = tether("viz", "scrape-config", "--podmonitor", "--platform", "local")
    assert bad.returncode == 2 and "--podmonitor" in bad.stderr


def test_install_set_uses_an_external_prometheus_as_linkerds_chart_does(tmp_path: Path) -> None:
    import json

    state = tmp_path / "state"
    state.mkdir()
    (state / "mesh.json").write_text(json.dumps({"mesh_id": "abcd", "bridge": "tb0", "pod_cidr": "10.9.0.0/24",
                                                 "service_cidr": "10.9.1.0/24"}))
    r = tether("viz", "install", "--state-dir", str(state),
               "--set", "prometheusUrl=http://127.0.0.1:9,prometheus.enabled=false")
    assert r.returncode == 0, r.stderr
    assert "viz uses the Prometheus at http://127.0.0.1:9 (none started here)" in r.stdout
    assert not (state / "addons" / "prometheus.json").exists()
    # The viz commands now ask that Prometheus.
    r = tether("viz", "stat", "deploy", "--state-dir", str(state))
    assert r.returncode == 1 and "cannot reach Prometheus at http://127.0.0.1:9" in r.stderr
    for bad, needle in (("prometheus.enabled=false", "needs prometheusUrl=URL"),
                        ("prometheus.replicas=2", "unknown value 'prometheus.replicas'"),
                        ("prometheusUrl=x,prometheus.enabled=false", "is not an http(s) URL"),
                        ("prometheus.enabled=no", "is not true or false")):
        r = tether("viz", "install", "--state-dir", str(state), "--set", bad)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)


def test_the_tap_check_fails_plainly_without_a_running_mesh(tmp_path: Path) -> None:
    from tether.viz.checks import tap_results

    (result,) = tap_results(str(tmp_path / "no-mesh"))
    assert result["status"] == "fail" and result["description"] == "every proxy accepts a tap"
    assert result["hint"]  # says why, in one line
    assert "\n" not in result["hint"]
