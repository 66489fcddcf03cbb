"""Time from `tether install` to a working control plane on the test-bed cluster.

    .venv/bin/python bench/kube_install.py [--rounds 3]

Starts a test-bed cluster (etcd, kube-apiserver, controllers, scheduler, kwok), then for each round
installs into a fresh namespace, the seeds' way, and times each step:

* ``tether install --crds | kubectl apply`` (first round only: CRDs are cluster-wide);
* ``tether install -L NS | kubectl apply``: every object of the control plane written;
* ``kubectl rollout status`` of the three Deployments (kwok pretends to run their pods: this is the
  API server, scheduler and controllers' share);
* the control plane's processes, started on this host against the API server as their pods would
  be: identity and destination with the rendered Deployments' own arguments (`chart_controller`:
  identity serving TLS, the destination certified by it with a projected token before it is ready,
  plaintext refused as a fresh install renders it), each on a loopback address of its own for the
  round that stands for its Service; the injector with the webhook configuration pointed at it:
  process start to /ready for each, started together;
* the first workload: ``kubectl apply`` of a Deployment in a namespace annotated for injection to
  its pod stored with the proxy (the API server calling the injector);
* ``tether check --platform kubernetes -L NS`` of linkerd-existence and linkerd-identity passing (the
  webhook categories look for the chart's webhook configurations, which the bench replaces).

The total is install to the first injected pod. The kwok pods mean image pulls and container starts
are not in these figures: on a real cluster add the image pull and the proxy's own start (measured
by bench/identity.py and the proxy benchmarks). Figures print as a table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.testing.kubecluster import KubeCluster, wait_until  # noqa: E402
from tether.testing.kubeinjector import running_injector  # noqa: E402
from tether.testing.kubeplatform import chart_controller, kubectl_apply  # noqa: E402

IMAGE = "registry.invalid/tether/bench:1.0"


def tether(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=300,
                          check=True, env={**os.environ, **(env or {})}).stdout


def probe_pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": IMAGE}]}}


def one_round(cluster: KubeCluster, tmp: Path, index: int) -> dict[str, float]:
    cp, app = f"inst-{index}-{os.getpid()}", f"inst-app-{index}-{os.getpid()}"
    out: dict[str, float] = {}
    t0 = time.monotonic()
    if index == 0:
        crds = tether("install", "--crds")
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, timeout=300)
        out["crds_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    manifests = tether("install", "-L", cp)
    out["render_s"] = time.monotonic() - t1
    docs = [d for d in yaml.safe_load_all(manifests) if d]
    # The chart's webhook configurations call the injector's Service, which kwok cannot serve; the
    # injector below registers the same configuration pointed at its host process instead.
    applied = [d for d in docs if not d["kind"].endswith("WebhookConfiguration")]
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(applied), timeout=300)
    out["apply_s"] = time.monotonic() - t1
    for deployment in ("linkerd-identity", "linkerd-destination", "linkerd-proxy-injector"):
        cluster.kubectl("rollout", "status", "-n", cp, f"deployment/{deployment}", "--timeout=120s", timeout=150)
    out["rollout_s"] = time.monotonic() - t1
    t2 = time.monotonic()
    # Each Service's port on a loopback address of this round (the chart's ports: the destination dials
    # identity at linkerd-identity.<ns>.svc.cluster.local:8080).
    host = f"127.0.0.{20 + index}"
    services = {f"{name}.{cp}.svc.cluster.local": host for name in ("linkerd-identity", "linkerd-dst",
                                                                     "linkerd-policy")}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    identity = chart_controller(tmp, cluster, deployments["linkerd-identity"], host=host, port=8080,
                                services=services)
    destination = chart_controller(tmp, cluster, deployments["linkerd-destination"], host=host, port=8086,
                                   services=services)
    try:
        identity.wait_ready(timeout=120)
        out["identity_ready_s"] = time.monotonic() - t2
        destination.wait_ready(timeout=120)
        out["destination_ready_s"] = time.monotonic() - t2
        config = next(d for d in docs if d["metadata"].get("name") == "linkerd-config")
        inj_dir = tmp / f"injector-{index}"
        inj_dir.mkdir()
        with running_injector(cluster, inj_dir, config["data"]["values"], "Ignore", probe_pod=probe_pod,
                              controller_namespace=cp):
            out["injector_ready_s"] = time.monotonic() - t2
            t3 = time.monotonic()
            cluster.create_namespace(app)
            cluster.kubectl("annotate", "namespace", app, "linkerd.io/inject=enabled")
            kubectl_apply(cluster, app, {
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {"containers": [{"name": "app", "image": IMAGE}]}}}})

            def injected() -> bool:
                pods = cluster.api.get(f"/api/v1/namespaces/{app}/pods", labelSelector="app=web")["items"]
                return any(c["name"] == "linkerd-proxy" for p in pods for c in p["spec"]["containers"])

            wait_until(injected, timeout=60, what="the first injected pod")
            out["first_injected_pod_s"] = time.monotonic() - t3
            out["total_install_to_first_injected_pod_s"] = time.monotonic() - t1
            t4 = time.monotonic()
            check = subprocess.run(
                # The categories this layout can pass: the webhook ones look for the chart's webhook
                # configurations and TLS Secrets, which the bench replaces with ones pointed at the host.
                [sys.executable, "-m", "tether", "check", "--platform", "kubernetes", "-L", cp, "-o", "json",
                 "--category", "linkerd-existence", "--category", "linkerd-identity", "--category",
                 "control-plane-tls"],
                capture_output=True, text=True, timeout=300,
                env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})
            out["check_s"] = time.monotonic() - t4
            result = json.loads(check.stdout) if check.stdout.strip().startswith("{") else {}
            failed = [c["description"] for cat in result.get("categories", []) for c in cat.get("checks", [])
                      if c.get("result") == "error"]
            out["check_errors"] = float(len(failed))
            if failed:
                print(f"round {index}: check errors: {failed}", file=sys.stderr)
    finally:
        identity.stop()
        destination.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="kube-install-") as tmp, KubeCluster() as cluster:
        for i in range(args.rounds):
            rows.append(one_round(cluster, Path(tmp), i))
    load = os.getloadavg()[0]
    keys = [k for k in rows[-1] if k != "check_errors"]
    print(f"install to ready on the test-bed cluster; {args.rounds} round(s); load average {load:.1f}; "
          f"2 cores")
    print(f"{'step':42} {'median s':>9} {'max s':>9}")
    for k in ["crds_s", *keys]:
        vals = [r[k] for r in rows if k in r]
        if vals:
            print(f"{k:42} {statistics.median(vals):9.2f} {max(vals):9.2f}")
    print(f"check errors per round: {[int(r.get('check_errors', -1)) for r in rows]}")
    print(json.dumps({"rounds": rows, "load": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
