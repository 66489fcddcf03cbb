"""Two kwok pods made real: their proxies run in network namespaces at the pods' kwok-assigned IPs and
reach each other through the Service over mTLS.

A small runner does what a kubelet would for the two pods: a network namespace with the pod's IP on
a host bridge, `tether proxy-init` rules, the proxy as uid 2102 with a projected token bound to the
pod (TokenRequest, audience identity.l5d.io), and the server's application. The control plane runs
on the host against the API server: the client's proxy resolves the Service's ClusterIP through the
destination service (endpoints from the real EndpointSlice controller) and the server's proxy
sees the client's identity, certified through TokenReview.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.platform.local import network
from tether.testing import netns
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeplatform import (
    Issuers,
    KubeDestinationProc,
    KubeIdentityProc,
    apply,
    apply_crds,
    kubectl_apply,
)
from tether.testing.procs import Proc, http_get

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

IMAGE = "registry.invalid/tether/test:1.0"
PROXY_UID = 2102
GATEWAY = "10.244.255.254"  # the host's address on the bridge; kwok hands out pod IPs in 10.244.N.0/24
PREFIXLEN = 16


def deployment(name: str, sa: str, port: int | None) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "image": IMAGE}
    if port:
        app["ports"] = [{"name": "http", "containerPort": port}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"serviceAccountName": sa,
                                       "containers": [app, {"name": "linkerd-proxy", "image": IMAGE}]}}},
    }


class NetnsPod:
    """One pod's network namespace and processes, as a kubelet would run them."""

    def __init__(self, pod: dict[str, Any], bridge: str, index: int, tmp: Path) -> None:
        self.name = pod["metadata"]["name"]
        self.ip = pod["status"]["podIP"]
        self.netns = f"tk-{uuid.uuid4().hex[:8]}"
        self.dir = tmp / self.name
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        self.procs: list[Proc] = []
        network.create_pod_netns(self.netns, f"{bridge}v{index}", bridge, self.ip, PREFIXLEN, GATEWAY)

    def run(self, *argv: str, name: str, as_proxy: bool = False) -> Proc:
        uid = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"] if as_proxy else []
        p = Proc([*uid, *argv], self.dir / f"{name}.log", netns=self.netns)
        self.procs.append(p)
        return p

    def exec(self, *argv: str) -> str:
        import subprocess

        r = subprocess.run(network.netns_exec(self.netns, list(argv)), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(argv)}: {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        network.delete_pod_netns(self.netns)


@pytest.fixture
def bridge() -> Iterator[str]:
    why = netns.available()
    if why is not None:
        pytest.skip(f"two pods in network namespaces: {why}")
    name = f"tk{uuid.uuid4().hex[:6]}"
    network.create_bridge(name, GATEWAY, PREFIXLEN)
    yield name
    network.delete_bridge(name)


@pytest.fixture
def podfiles() -> Iterator[Path]:
    """A directory the proxies (uid 2102) can read: pytest's own tmp_path is private to root."""
    d = Path(tempfile.mkdtemp(prefix="tether-kube-mesh-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    items: list[Any] = []
    yield items
    for item in reversed(items):
        item.close() if isinstance(item, NetnsPod) else item.stop()


def test_two_pods_reach_each_other_through_a_service_over_mtls(
    kube_cluster: KubeCluster, bridge: str, podfiles: Path, cleanup: list[Any]
) -> None:
    tmp_path = podfiles
    apply_crds(kube_cluster)
    suffix = uuid.uuid4().hex[:6]
    cp, app = f"mcp-{suffix}", f"mapp-{suffix}"
    for n in (cp, app):
        kube_cluster.create_namespace(n)
    ca = Issuers(cp)
    cert, key = ca.issuer()
    apply(kube_cluster, ca.roots(), ca.secret(cert, key),
          *({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": app}}
            for sa in ("server", "client")))
    kubectl_apply(kube_cluster, app, deployment("server", "server", 8080), deployment("client", "client", None),
                  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
                   "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 80,
                                                                      "targetPort": "http"}]}})

    def running(name: str) -> dict[str, Any] | None:
        pods = kube_cluster.api.get(f"/api/v1/namespaces/{app}/pods", labelSelector=f"app={name}")["items"]
        ok = [p for p in pods if (p.get("status") or {}).get("podIP") and p["status"].get("phase") == "Running"]
        return ok[0] if ok else None

    server_pod = wait_until(lambda: running("server"), timeout=90, what="the server pod running")
    client_pod = wait_until(lambda: running("client"), timeout=90, what="the client pod running")
    cluster_ip = kube_cluster.api.get(f"/api/v1/namespaces/{app}/services/server")["spec"]["clusterIP"]

    identity = KubeIdentityProc(tmp_path, kube_cluster, cp, host=GATEWAY)
    destination = KubeDestinationProc(tmp_path, kube_cluster, cp, host=GATEWAY)
    cleanup.extend([identity, destination])
    identity.wait_ready()
    destination.wait_ready()
    anchors = tmp_path / "ca-bundle.crt"
    anchors.write_text(ca.roots()["data"]["ca-bundle.crt"])
    os.chmod(anchors, 0o644)

    pods = {}
    for index, (pod, sa) in enumerate(((server_pod, "server"), (client_pod, "client"))):
        p = NetnsPod(pod, bridge, index, tmp_path)
        cleanup.append(p)
        pods[sa] = p
        # The projected token a kubelet would mount: bound to the pod, for the identity audience.
        token = kube_cluster.api.create(
            f"/api/v1/namespaces/{app}/serviceaccounts/{sa}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"audiences": ["identity.l5d.io"], "expirationSeconds": 3600,
                      "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                         "uid": pod["metadata"]["uid"]}}})["status"]["token"]
        token_file = p.dir / "token"
        token_file.write_text(token)
        os.chown(token_file, PROXY_UID, PROXY_UID)
        os.chmod(token_file, 0o600)
        p.exec(sys.executable, "-m", "tether", "proxy-init", "--proxy-uid", str(PROXY_UID))
        p.run(sys.executable, "-m", "tether", "proxy",
              "--inbound-addr", "0.0.0.0:4143", "--outbound-addr", "127.0.0.1:4140", "--admin-addr", "0.0.0.0:4191",
              "--identity-name", f"{sa}.{app}.serviceaccount.identity.{cp}.cluster.local",
              "--identity-token-path", str(token_file), "--identity-trust-anchors", str(anchors),
              "--identity-addrs", identity.addr, "--destination-addrs", destination.addr,
              "--destination-context", json.dumps({"ns": app, "pod": p.name}),
              name="proxy", as_proxy=True)
    pods["server"].run(sys.executable, "-m", "tether.testing.backend", "--host", "0.0.0.0", "--port", "8080",
                       "--name", "server", name="app")

    for p in pods.values():
        def ready(p: NetnsPod = p) -> bool:
            if any(proc.popen.poll() is not None for proc in p.procs):
                raise RuntimeError(f"{p.name}: a process exited:\n" + "\n".join(x.log() for x in p.procs))
            try:
                return http_get(f"http://{p.ip}:4191/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout=60, what=f"{p.name}'s proxy ready (certified through TokenReview)")

    # The client application calls the Service's ClusterIP; iptables sends it to its proxy, which
    # resolves it through the destination service and connects to the server pod over mTLS.
    def answered() -> str | None:
        out = pods["client"].exec("curl", "-s", "-m", "5", f"http://{cluster_ip}:80/")
        return out if "hello from server" in out else None

    assert "hello from server" in wait_until(answered, timeout=60, what="the client's request answered")
    client_id = f"client.{app}.serviceaccount.identity.{cp}.cluster.local"
    metrics = http_get(f"http://{pods['server'].ip}:4191/metrics")[1].decode()
    inbound = [line for line in metrics.splitlines()
               if line.startswith("request_total{") and 'direction="inbound"' in line]
    assert any('tls="true"' in line and f'client_id="{client_id}"' in line for line in inbound), inbound
    client_metrics = http_get(f"http://{pods['client'].ip}:4191/metrics")[1].decode()
    outbound = [line for line in client_metrics.splitlines()
                if line.startswith("request_total{") and 'direction="outbound"' in line]
    server_id = f"server.{app}.serviceaccount.identity.{cp}.cluster.local"
    assert any('tls="true"' in line and f'server_id="{server_id}"' in line for line in outbound), outbound
