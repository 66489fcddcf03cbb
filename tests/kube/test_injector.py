"""`tether controller injector` called by the real API server: Deployments created with kubectl get
pods (kube-controller-manager makes them, kwok schedules them) whose spec carries what each annotation
asked for; invalid resources are refused with the field named; the failure policy and the namespace
label decide what happens when the injector is down or not wanted.

The injector runs as a host process; the webhook configurations are the chart's, with a url
clientConfig pointing at it (https://127.0.0.1:PORT) and its CA bundle.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether import __version__
from tether.testing.kubecluster import KubeAPIError, KubeCluster, wait_until
from tether.testing.kubeinjector import MUTATING, Injector, running_injector

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tether-control-plane"
IMAGE = "registry.invalid/tether/test:1.0"  # never pulled: kwok only pretends to run containers


@pytest.fixture(scope="module")
def injector(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Injector]:
    d = tmp_path_factory.mktemp("injector")
    # The values the chart's injector Deployment reads: the ConfigMap linkerd-config `tether install` makes.
    rendered = subprocess.run([sys.executable, "-m", "tether", "install"], capture_output=True, text=True,
                              timeout=120, check=True).stdout
    config = next(o for o in yaml.safe_load_all(rendered) if o and o["metadata"]["name"] == "linkerd-config")
    crds = subprocess.run([sys.executable, "-m", "tether", "install", "--crds"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, timeout=120)
    with running_injector(kube_cluster, d, config["data"]["values"], "Ignore", probe_pod=_pod) as inj:
        yield inj


def _pod(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": IMAGE}], **spec}}


def _deployment(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}, "annotations": annotations},
                                  "spec": {"containers": [{"name": "app", "image": IMAGE,
                                                           "ports": [{"containerPort": 8080}]}]}}}}


def _pods(cluster: KubeCluster, ns: str, app: str, count: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        items = cluster.api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"app={app}")["items"]
        scheduled = [p for p in items if p["spec"].get("nodeName")]
        return scheduled if len(scheduled) >= count else None

    return wait_until(found, timeout=90, what=f"{count} scheduled pods of {app} in {ns}")


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    for c in (*spec.get("initContainers", ()), *spec["containers"]):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name} in {[c['name'] for c in spec['containers']]}")


def _env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c["env"]}


def _args(c: dict[str, Any]) -> dict[str, str]:
    return dict(zip(c["args"][0::2], c["args"][1::2], strict=True))


def test_deployment_pods_carry_every_annotation(kube_cluster: KubeCluster, injector: Injector,
                                                tmp_path: Path) -> None:
    ns = "t-inj-annotations"
    kube_cluster.create_namespace(ns)
    annotations = {
        "linkerd.io/inject": "enabled",
        "config.linkerd.io/skip-inbound-ports": "8080,8443",
        "config.linkerd.io/skip-outbound-ports": "3306",
        "config.linkerd.io/opaque-ports": "3306,6379",
        "config.linkerd.io/proxy-cpu-limit": "1",
        "config.linkerd.io/proxy-cpu-request": "100m",
        "config.linkerd.io/proxy-memory-limit": "250Mi",
        "config.linkerd.io/proxy-memory-request": "20Mi",
        "config.linkerd.io/proxy-log-level": "warn,linkerd=info",
        "config.linkerd.io/proxy-outbound-connect-timeout": "5000ms",
        "config.linkerd.io/default-inbound-policy": "all-authenticated",
        "config.linkerd.io/skip-subnets": "10.20.0.0/16",
    }
    manifest = tmp_path / "web.yaml"
    manifest.write_text(yaml.safe_dump(_deployment("web", annotations)))
    kube_cluster.kubectl("apply", "-n", ns, "-f", str(manifest))
    pods = _pods(kube_cluster, ns, "web", 2)
    for pod in pods:
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["linkerd-init"]
        assert [c["name"] for c in pod["spec"]["containers"]] == ["linkerd-proxy", "app"]
        init = _args(_container(pod, "linkerd-init"))
        assert init["--inbound-ports-to-ignore"] == "4190,4191,4567,4568,8080,8443"
        assert init["--outbound-ports-to-ignore"] == "4567,4568,3306"
        assert init["--subnets-to-ignore"] == "10.20.0.0/16"
        proxy = _container(pod, "linkerd-proxy")
        assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "20Mi"},
                                      "limits": {"cpu": "1", "memory": "250Mi"}}
        env = _env(proxy)
        assert env["TETHER_PROXY_OPAQUE_PORTS"] == "3306,6379"
        assert env["TETHER_PROXY_LOG_LEVEL"] == "warn,linkerd=info"
        assert env["TETHER_PROXY_OUTBOUND_CONNECT_TIMEOUT"] == "5000ms"
        assert env["TETHER_PROXY_DEFAULT_INBOUND_POLICY"] == "all-authenticated"
        assert proxy["lifecycle"]["postStart"]["exec"]["command"][:2] == ["tether", "proxy-await"]
        token = next(v for v in pod["spec"]["volumes"] if v["name"] == "linkerd-identity-token")
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "identity.l5d.io"
        labels = pod["metadata"]["labels"]
        assert labels["linkerd.io/proxy-deployment"] == "web"
        assert labels["linkerd.io/control-plane-ns"] == "linkerd" and labels["linkerd.io/workload-ns"] == ns
        assert pod["metadata"]["annotations"]["linkerd.io/proxy-version"] == __version__
        assert pod["metadata"]["annotations"]["tether.io/trust-anchors"].startswith("-----BEGIN CERTIFICATE")


def test_namespace_annotation_and_native_sidecar(kube_cluster: KubeCluster, injector: Injector) -> None:
    ns = "t-inj-namespace"
    kube_cluster.create_namespace(ns)
    kube_cluster.kubectl("annotate", "namespace", ns, "linkerd.io/inject=enabled",
                         "config.linkerd.io/proxy-log-level=debug")
    kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("plain"))
    kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("native", {
        "config.alpha.linkerd.io/proxy-enable-native-sidecar": "true"}))
    kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("optout", {"linkerd.io/inject": "disabled"}))
    plain = _pods(kube_cluster, ns, "plain", 1)[0]
    assert _env(_container(plain, "linkerd-proxy"))["TETHER_PROXY_LOG_LEVEL"] == "debug"
    native = _pods(kube_cluster, ns, "native", 1)[0]
    sidecar = native["spec"]["initContainers"][1]
    assert sidecar["name"] == "linkerd-proxy" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/ready"
    assert [c["name"] for c in native["spec"]["containers"]] == ["app"]
    optout = _pods(kube_cluster, ns, "optout", 1)[0]
    assert [c["name"] for c in optout["spec"]["containers"]] == ["app"]
    assert "initContainers" not in optout["spec"]


def test_bad_annotation_refuses_the_pod_naming_it(kube_cluster: KubeCluster, injector: Injector) -> None:
    ns = "t-inj-refused"
    kube_cluster.create_namespace(ns)
    with pytest.raises(KubeAPIError) as e:
        kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("bad", {
            "linkerd.io/inject": "enabled", "config.linkerd.io/skip-outbound-ports": "127.0.0.1"}))
    assert e.value.status == 400
    assert ("annotation config.linkerd.io/skip-outbound-ports: '127.0.0.1' is not a port (1-65535) or a range "
            "like 5000-5010; loopback is never redirected, and IP ranges go in config.linkerd.io/skip-subnets"
            ) in e.value.body


def test_invalid_server_is_refused_with_the_field_named(kube_cluster: KubeCluster, injector: Injector,
                                                        tmp_path: Path) -> None:
    ns = "t-inj-validate"
    kube_cluster.create_namespace(ns)
    server: dict[str, Any] = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
              "metadata": {"name": "web", "namespace": ns},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 70000, "proxyProtocol": "HTTP/1"}}
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(server))
    r = subprocess.run([str(kube_cluster.binary("kubectl")), "apply", "-f", str(path)], capture_output=True,
                       text=True, timeout=60, env=kube_cluster.env())
    assert r.returncode != 0
    # `tether apply` says the same about the same document.
    local = subprocess.run([sys.executable, "-m", "tether", "apply", "--dry-run", "-f", str(path),
                            "--resources-dir", str(tmp_path / "store")], capture_output=True, text=True, timeout=60)
    expected = re.search(r"\(Server [^)]*\): (spec\.port: .*)$", local.stderr, re.MULTILINE)
    assert expected is not None, local.stderr
    assert "admission webhook" in r.stderr and expected.group(1) in r.stderr, r.stderr
    server["spec"]["port"] = 8080
    path.write_text(yaml.safe_dump(server))
    kube_cluster.kubectl("apply", "-f", str(path))


def test_disabled_namespace_is_never_sent(kube_cluster: KubeCluster, injector: Injector) -> None:
    ns = "t-inj-disabled"
    kube_cluster.create_namespace(ns, labels={"config.linkerd.io/admission-webhooks": "disabled"})
    before = injector.requests()
    kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("skipped", {"linkerd.io/inject": "enabled"}))
    pod = _pods(kube_cluster, ns, "skipped", 1)[0]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    # A pod elsewhere is sent: the counter moves for it, not for the labelled namespace.
    kube_cluster.api.create("/api/v1/namespaces/t-inj-probe/pods", _pod("counted", {"linkerd.io/inject": "enabled"}))
    assert injector.requests() == before + 1


def test_failure_policy_with_the_injector_down(kube_cluster: KubeCluster, injector: Injector) -> None:
    ns = "t-inj-down"
    kube_cluster.create_namespace(ns)
    injector.stop()
    try:
        # Ignore (the default): the pod is created, without the proxy.
        kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("ignored", {"linkerd.io/inject": "enabled"}))
        pod = _pods(kube_cluster, ns, "ignored", 1)[0]
        assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
        # Fail (values-ha.yaml): refused while no injector answers.
        kube_cluster.kubectl("patch", "mutatingwebhookconfiguration", MUTATING, "--type=json", "-p",
                             json.dumps([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]))

        def refused() -> str | None:
            try:
                kube_cluster.api.request("POST", f"/api/v1/namespaces/{ns}/pods",
                                         _pod("failed", {"linkerd.io/inject": "enabled"}), query={"dryRun": "All"})
            except KubeAPIError as e:
                return e.body
            return None

        body = wait_until(refused, timeout=60, what="pod creation refused with failurePolicy Fail")
        assert "linkerd-proxy-injector.linkerd.io" in body and "failed calling webhook" in body
    finally:
        kube_cluster.kubectl("patch", "mutatingwebhookconfiguration", MUTATING, "--type=json", "-p",
                             json.dumps([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]))
        injector.start()


def test_admission_latency_figure(kube_cluster: KubeCluster, injector: Injector) -> None:
    """N pod creations through the API server, injected and not: the injector's share of the latency."""
    n = 100
    results: dict[str, list[float]] = {}
    for label, ns, labels in (("injected", "t-inj-latency", None),
                              ("not sent", "t-inj-latency-off", {"config.linkerd.io/admission-webhooks": "disabled"})):
        kube_cluster.create_namespace(ns, labels=labels)
        times = []
        for i in range(n):
            started = time.perf_counter()
            kube_cluster.api.request("POST", f"/api/v1/namespaces/{ns}/pods",
                                     _pod(f"p{i}", {"linkerd.io/inject": "enabled"}), query={"dryRun": "All"})
            times.append((time.perf_counter() - started) * 1000)
        results[label] = sorted(times)
    served = re.search(r'admission_duration_seconds_sum\{webhook="inject"\} ([0-9.]+)', injector.metrics())
    count = re.search(r'admission_duration_seconds_count\{webhook="inject"\} (\d+)', injector.metrics())
    assert served and count
    for label, times in results.items():
        p50, p99 = statistics.median(times), times[int(0.99 * len(times)) - 1]
        print(f"\nadmission {label}: n={n} pod creations (dry run) p50 {p50:.1f} ms p99 {p99:.1f} ms")
    print(f"injector handling: mean {float(served.group(1)) / int(count.group(1)) * 1000:.2f} ms over "
          f"{count.group(1)} reviews")
    assert results["injected"][int(0.99 * n) - 1] < 5000  # within the webhook timeout
