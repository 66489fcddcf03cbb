"""The destination service on Kubernetes at 1,000 pods: time to ready, memory, endpoint-update latency.

    .venv/bin/python bench/kube_destination.py [--pods 1000] [--nodes 5]

Starts a test-bed cluster (etcd, kube-apiserver, controllers, scheduler, kwok with --nodes simulated
nodes), the mesh's CRDs, and one `tether controller destination --platform kubernetes`. Then:

* time to ready: process start to its /ready answering 200 (the first list of every resource included);
* a Deployment behind a Service scaled 0 -> N: the time from `kubectl scale` until the EndpointSlices
  list N ready endpoints (Kubernetes's part: scheduler, kwok, EndpointSlice controller) and until a
  Destination.Get stream shows N (the whole path); the difference is the destination service's share;
* one more pod (N -> N+1), the same two times, five times over, for the latency of a single update;
* the destination process's RSS (VmRSS) idle and at N pods.

Every wait is bounded; the cluster and the process are stopped at the end. Figures print as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.testing.kubecluster import KubeCluster, wait_until  # noqa: E402
from tether.testing.kubeplatform import (  # noqa: E402
    EndpointWatch,
    KubeDestinationProc,
    apply_crds,
    kubectl_apply,
)

IMAGE = "registry.invalid/tether/bench:1.0"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slice_ready(cluster: KubeCluster, ns: str) -> int:
    slices = cluster.api.get(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                             labelSelector="kubernetes.io/service-name=web")["items"]
    return sum(1 for s in slices for ep in s.get("endpoints") or [] if (ep.get("conditions") or {}).get("ready"))


def scale_and_time(cluster: KubeCluster, ns: str, watch: EndpointWatch, n: int, timeout: float) -> dict[str, float]:
    began = time.monotonic()
    cluster.kubectl("scale", "-n", ns, "deployment/web", f"--replicas={n}")
    slices_at: float | None = None
    stream_at: float | None = None
    deadline = began + timeout
    while time.monotonic() < deadline and (slices_at is None or stream_at is None):
        if stream_at is None and len(watch.current()) == n:
            # The stream's own record of when it reached n (the poll below may lag it).
            stream_at = next((t for t, addrs in watch.changes if len(addrs) == n and t >= began), time.monotonic())
        if slices_at is None and slice_ready(cluster, ns) == n:
            slices_at = time.monotonic()
        time.sleep(0.01)
    if slices_at is None or stream_at is None:
        raise TimeoutError(f"scale to {n}: slices at {slices_at}, stream at {stream_at} after {timeout}s")
    return {"slices_s": round(slices_at - began, 3), "stream_s": round(stream_at - began, 3),
            "stream_after_slices_s": round(stream_at - slices_at, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=5, help="kwok nodes (each hands out 254 pod IPs)")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound of each scale")
    args = ap.parse_args()
    out: dict[str, Any] = {"pods": args.pods, "nodes": args.nodes}
    with tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp, KubeCluster(nodes=args.nodes) as cluster:
        out["cluster_start_s"] = cluster.start_seconds
        apply_crds(cluster)
        ns = "bench"
        cluster.create_namespace(ns)
        kubectl_apply(cluster, ns,
                      {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                       "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80,
                                                                       "targetPort": 8080}]}},
                      {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                       "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                                "template": {"metadata": {"labels": {"app": "web"}},
                                             "spec": {"containers": [{"name": "app", "image": IMAGE,
                                                                      "ports": [{"containerPort": 8080}]}]}}}})
        began = time.monotonic()
        dest = KubeDestinationProc(Path(tmp), cluster, "linkerd", "--log-level", "warn")
        try:
            dest.wait_ready(timeout=120)
            out["destination_ready_s"] = round(time.monotonic() - began, 3)
            out["rss_idle_mib"] = round(rss_mib(dest.pid), 1)
            watch = EndpointWatch(dest.addr, f"web.{ns}.svc.cluster.local:80", json.dumps({"ns": ns}))
            try:
                out["scale_0_to_n"] = scale_and_time(cluster, ns, watch, args.pods, args.timeout)
                out["rss_at_n_mib"] = round(rss_mib(dest.pid), 1)
                singles = [scale_and_time(cluster, ns, watch, args.pods + i, 120) for i in range(1, 6)]
                out["one_more_pod"] = {
                    k: {"median": round(statistics.median(s[k] for s in singles), 3),
                        "max": round(max(s[k] for s in singles), 3)}
                    for k in ("slices_s", "stream_s", "stream_after_slices_s")
                }
            finally:
                watch.close()
            out["rss_end_mib"] = round(rss_mib(dest.pid), 1)
            wait_until(lambda: dest.popen.poll() is None, timeout=1, what="destination alive")
        finally:
            dest.stop()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
