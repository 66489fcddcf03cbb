"""The destination service on Kubernetes at 1,000 pods: time to ready, memory, endpoint-update latency.

    .venv/bin/python bench/kube_destination.py [--pods 1000] [--nodes 5]

Starts a test-bed cluster (etcd, kube-apiserver, controllers, scheduler, kwok with --nodes simulated
nodes), the mesh's CRDs, and one `tether controller destination --platform kubernetes`. Then:

* time to ready: process start to /ready answering 200, for the identity service (issuer Secret and
  trust-roots ConfigMap read) and the destination service (the first list of every resource included);
* a Deployment behind a Service scaled 0 -> N: the time from `kubectl scale` until a watch of the
  EndpointSlices (this script's own) sees N ready endpoints (Kubernetes's part: scheduler, kwok,
  EndpointSlice controller) and until a Destination.Get stream shows N (the whole path); the
  difference is the destination service's share (its watch, store, translation and the gRPC stream);
* one more pod (N -> N+1), the same two times, five times over, for the latency of a single update;
* the destination process's RSS (VmRSS) idle and at N pods.

Every wait is bounded; the cluster and the process are stopped at the end. Figures print as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.platform.kubernetes import convert  # noqa: E402
from tether.platform.kubernetes.client import KubeClient  # noqa: E402
from tether.platform.kubernetes.informer import Informer  # noqa: E402
from tether.platform.kubernetes.store import ENDPOINT_SLICES  # noqa: E402
from tether.testing.kubecluster import KubeCluster, wait_until  # noqa: E402
from tether.testing.kubeplatform import (  # noqa: E402
    EndpointWatch,
    Issuers,
    KubeDestinationProc,
    KubeIdentityProc,
    apply,
    apply_crds,
    kubectl_apply,
)

IMAGE = "registry.invalid/tether/bench:1.0"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SliceWatch:
    """The Service's EndpointSlices followed by a watch of their own (in a thread): when the number of
    ready endpoints they list changed, as this host saw the API server's event."""

    def __init__(self, kubeconfig: str, ns: str) -> None:
        self.slices: dict[tuple[str, str], int] = {}
        self.changes: list[tuple[float, int]] = []
        self._ns = ns
        self._kubeconfig = kubeconfig
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def replace(self, items: Any) -> None:
        self.slices = {convert.key_of(i): self._ready(i) for i in items}
        self.changes.append((time.monotonic(), sum(self.slices.values())))

    def event(self, type_: str, obj: Any) -> None:
        if type_ == "DELETED":
            self.slices.pop(convert.key_of(obj), None)
        else:
            self.slices[convert.key_of(obj)] = self._ready(obj)
        self.changes.append((time.monotonic(), sum(self.slices.values())))

    @staticmethod
    def _ready(s: Any) -> int:
        return sum(1 for ep in s.get("endpoints") or [] if (ep.get("conditions") or {}).get("ready"))

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with KubeClient.connect(self._kubeconfig) as client:
            await Informer(client, ENDPOINT_SLICES, self, namespace=self._ns,
                           label_selector="kubernetes.io/service-name=web").run(self._stop)

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def first_at(changes: list[tuple[float, Any]], since: float, ok: Any) -> float | None:
    return next((t for t, v in list(changes) if t >= since and ok(v)), None)


def scale_and_time(cluster: KubeCluster, ns: str, watch: EndpointWatch, slices: SliceWatch, n: int,
                   timeout: float) -> dict[str, float]:
    began = time.monotonic()
    cluster.kubectl("scale", "-n", ns, "deployment/web", f"--replicas={n}")
    slices_at: float | None = None
    stream_at: float | None = None
    deadline = began + timeout
    while time.monotonic() < deadline and (slices_at is None or stream_at is None):
        stream_at = first_at(watch.changes, began, lambda addrs: len(addrs) == n)
        slices_at = first_at(slices.changes, began, lambda count: count == n)
        time.sleep(0.05)
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
        # The identity service: its Secret and ConfigMap read, TokenReview ready.
        cluster.create_namespace("linkerd")
        ca = Issuers("linkerd")
        cert, key = ca.issuer()
        apply(cluster, ca.roots(), ca.secret(cert, key))
        began = time.monotonic()
        ident = KubeIdentityProc(Path(tmp), cluster, "linkerd", "--log-level", "warn")
        try:
            ident.wait_ready(timeout=120)
            out["identity_ready_s"] = round(time.monotonic() - began, 3)
            out["identity_rss_mib"] = round(rss_mib(ident.pid), 1)
        finally:
            ident.stop()
        began = time.monotonic()
        dest = KubeDestinationProc(Path(tmp), cluster, "linkerd", "--log-level", "warn")
        try:
            dest.wait_ready(timeout=120)
            out["destination_ready_s"] = round(time.monotonic() - began, 3)
            out["rss_idle_mib"] = round(rss_mib(dest.pid), 1)
            watch = EndpointWatch(dest.addr, f"web.{ns}.svc.cluster.local:80", json.dumps({"ns": ns}))
            slices = SliceWatch(str(cluster.kubeconfig), ns)
            try:
                out["scale_0_to_n"] = scale_and_time(cluster, ns, watch, slices, args.pods, args.timeout)
                out["rss_at_n_mib"] = round(rss_mib(dest.pid), 1)
                singles = [scale_and_time(cluster, ns, watch, slices, args.pods + i, 120) for i in range(1, 6)]
                out["one_more_pod"] = {
                    k: {"median": round(statistics.median(s[k] for s in singles), 3),
                        "max": round(max(s[k] for s in singles), 3)}
                    for k in ("slices_s", "stream_s", "stream_after_slices_s")
                }
            finally:
                watch.close()
                slices.close()
            out["rss_end_mib"] = round(rss_mib(dest.pid), 1)
            wait_until(lambda: dest.popen.poll() is None, timeout=1, what="destination alive")
        finally:
            dest.stop()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
