"""Two pods injected by the real API server's call to the injector, then run from that injected spec:
their proxies reach each other through a Service over mTLS.

The control plane is installed the `tether install` way (its issuer Secret, trust-roots ConfigMap and
linkerd-config in the API server) and runs as host processes: identity and destination against the
API server, the injector called by the API server. Deployments are created with kubectl in a
namespace annotated `linkerd.io/inject: enabled`; kwok schedules their pods. `tether.testing.kubelet`
then does what a kubelet would with each pod object as the API server stored it: network namespace
at the kwok-assigned IP, the `linkerd-init` container (`tether proxy-init` with the injected
arguments), the proxy container with the injected environment, projected token and trust-anchor
volume, its postStart `proxy-await`, then the application. Nothing about the proxies is configured
by the test: what they do is what the injected spec says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.platform.local import network
from tether.testing import netns
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeinjector import running_injector
from tether.testing.kubelet import PodRunner
from tether.testing.kubeplatform import KubeDestinationProc, KubeIdentityProc, kubectl_apply
from tether.testing.procs import Proc, http_get

pytestmark = [pytest.mark.kube, pytest.mark.timeout(420)]

SERVER_IMAGE = "registry.invalid/tether/hello"
CLIENT_IMAGE = "registry.invalid/tether/sleeper"
GATEWAY = "10.244.255.254"  # the host's address on the bridge; kwok hands out pod IPs in 10.244.N.0/24
PREFIXLEN = 16


def deployment(name: str, image: str, port: int | None, annotations: dict[str, str]) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "image": f"{image}:1.0"}
    if port:
        app["ports"] = [{"name": "http", "containerPort": port}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}, "annotations": annotations},
                              "spec": {"serviceAccountName": name, "containers": [app]}}},
    }


def probe_pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": f"{CLIENT_IMAGE}:1.0"}]}}


LOAD = """
import http.client, json, os, sys, time
ip, stop = sys.argv[1], sys.argv[2]
ok, statuses, errors, conn, times = 0, {}, [], None, []
while not os.path.exists(stop):
    try:
        if conn is None:
            conn = http.client.HTTPConnection(ip, 80, timeout=5)
        conn.request("GET", "/")
        r = conn.getresponse()
        body = r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status == 200 and b"hello from server" in body:
            ok += 1
            times.append(time.time())
        else:
            errors.append(f"{time.time():.3f} HTTP {r.status} {body[:80]!r}")
    except Exception as e:
        errors.append(f"{time.time():.3f} {e!r}")
        conn = None
    time.sleep(0.02)
print(json.dumps({"ok": ok, "statuses": statuses, "errors": errors, "times": times}))
"""


@dataclass
class Mesh:
    """The installed control plane (host processes), the injector, and the pods run from their injected specs."""

    cluster: KubeCluster
    cp: str
    app: str
    dir: Path
    bridge: str
    values_file: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    pods: dict[str, PodRunner] = field(default_factory=dict)

    def start_controller(self, name: str) -> None:
        """identity on 8080, destination on 8086 and linkerd-policy's 8090: each Service's port on the host."""
        old = self.procs.pop(name, None)
        if old is not None:
            old.stop()
        kind = KubeIdentityProc if name == "identity" else KubeDestinationProc
        port = {"identity": 8080, "destination": 8086, "policy": 8090}[name]
        proc = kind(self.dir, self.cluster, self.cp, host=GATEWAY, port=port)
        self.procs[name] = proc
        proc.wait_ready()

    def pod_of(self, deployment: str, not_in: tuple[str, ...] = ()) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pods = self.cluster.api.get(f"/api/v1/namespaces/{self.app}/pods", labelSelector=f"app={deployment}")
            ok = [p for p in pods["items"] if (p.get("status") or {}).get("podIP")
                  and p["status"].get("phase") == "Running" and p["metadata"]["name"] not in not_in]
            return ok[0] if ok else None

        return wait_until(running, timeout=90, what=f"a {deployment} pod running")

    def run(self, pod: dict[str, Any]) -> PodRunner:
        """What a kubelet does for ``pod``, as the API server stored it (injected)."""
        names = [c["name"] for c in (*pod["spec"].get("initContainers", []), *pod["spec"]["containers"])]
        assert names == ["linkerd-init", "linkerd-proxy", "app"], names
        tether = [sys.executable, "-m", "tether"]
        images = {"localhost/tether": tether,
                  SERVER_IMAGE: [sys.executable, "-m", "tether.testing.backend", "--host", "0.0.0.0", "--port",
                                 "8080", "--name", "server"],
                  CLIENT_IMAGE: [sys.executable, "-c", "import time; time.sleep(3600)"]}
        hosts = {f"{name}.{self.cp}.svc.cluster.local": GATEWAY
                 for name in ("linkerd-identity", "linkerd-dst", "linkerd-policy")}
        runner = PodRunner(self.cluster, pod, bridge=self.bridge, index=len(self.pods), gateway=GATEWAY,
                           prefixlen=PREFIXLEN, workdir=self.dir, images=images,
                           executables={"tether": tether, "tether-proxy-init": [*tether, "proxy-init"],
                                        "python": [sys.executable]}, hosts=hosts)
        self.pods[runner.name] = runner
        try:
            runner.start()
        except Exception as e:
            raise AssertionError(f"{e}\n{runner.logs()}") from e
        return runner


@pytest.fixture(scope="module")
def mesh(kube_cluster: KubeCluster) -> Iterator[Mesh]:
    why = netns.available()
    if why is not None:
        pytest.skip(f"pods in network namespaces: {why}")
    suffix = uuid.uuid4().hex[:6]
    cp, app = f"mcp-{suffix}", f"mapp-{suffix}"
    bridge = f"tk{suffix}"
    # A directory the proxies (uid 2102) can read: pytest's own tmp_path is private to root.
    d = Path(tempfile.mkdtemp(prefix="tether-kube-mesh-"))
    os.chmod(d, 0o755)
    network.create_bridge(bridge, GATEWAY, PREFIXLEN)
    crds = run_tether("install", "--crds")
    kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, timeout=120)
    objects, values = install_objects(cp)
    kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
    injector_dir = d / "injector"
    injector_dir.mkdir()
    m = Mesh(kube_cluster, cp, app, d, bridge, injector_dir / "values.yaml")
    try:
        # The control plane's Services, as a cluster's DNS and kube-proxy would give them to the pods: the
        # names resolve (the pods' /etc/hosts) to the host, where each process listens on its Service's port.
        for name in ("identity", "destination", "policy"):
            m.start_controller(name)
        with running_injector(kube_cluster, injector_dir, values, "Fail", probe_pod=probe_pod,
                              controller_namespace=cp):
            kube_cluster.create_namespace(app)
            kube_cluster.kubectl("annotate", "namespace", app, "linkerd.io/inject=enabled")
            kubectl_apply(
                kube_cluster, app,
                *({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}
                  for sa in ("server", "client")),
                deployment("server", SERVER_IMAGE, 8080, {}),
                deployment("client", CLIENT_IMAGE, None, {}),
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server"},
                 "spec": {"selector": {"app": "server"},
                          "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
            for name in ("server", "client"):
                m.run(m.pod_of(name))
            yield m
    finally:
        for runner in reversed(list(m.pods.values())):
            runner.close()
        for proc in m.procs.values():
            proc.stop()
        network.delete_bridge(bridge)
        shutil.rmtree(d, ignore_errors=True)


def run_tether(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=120,
                          check=True, env={**os.environ, **(env or {})}).stdout


def install_objects(cp: str, *upgrade: str, env: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """What `tether install -L cp` (or `tether upgrade -L cp ...`) renders that the host-run control plane
    reads from the API server (namespace, issuer Secret, trust roots, linkerd-config), and the values text."""
    rendered = run_tether(*(upgrade or ("install",)), "-L", cp, env=env)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    wanted = [d for d in docs if d["kind"] == "Namespace" or d["metadata"].get("name") in (
        "linkerd-identity-issuer", "linkerd-identity-trust-roots", "linkerd-config")]
    config = next(d for d in wanted if d["metadata"]["name"] == "linkerd-config")
    return wanted, config["data"]["values"]


def _pod_name(m: Mesh, deployment: str) -> str:
    return next(name for name in m.pods if name.startswith(f"{deployment}-"))


def test_injected_pods_reach_each_other_through_a_service_over_mtls(mesh: Mesh) -> None:
    server, client = mesh.pods[_pod_name(mesh, "server")], mesh.pods[_pod_name(mesh, "client")]
    cluster_ip = mesh.cluster.api.get(f"/api/v1/namespaces/{mesh.app}/services/server")["spec"]["clusterIP"]

    # The client application calls the Service's ClusterIP; the injected init container's rules send it to
    # its proxy, which resolves it through the destination service and connects to the server pod over mTLS.
    def answered() -> str | None:
        out = client.exec("curl", "-s", "-m", "5", f"http://{cluster_ip}:80/")
        return out if "hello from server" in out else None

    assert "hello from server" in wait_until(answered, timeout=60, what="the client's request answered")
    client_id = f"client.{mesh.app}.serviceaccount.identity.{mesh.cp}.cluster.local"
    metrics = http_get(f"http://{server.ip}:4191/metrics")[1].decode()
    inbound = [line for line in metrics.splitlines()
               if line.startswith("request_total{") and 'direction="inbound"' in line]
    assert any('tls="true"' in line and f'client_id="{client_id}"' in line for line in inbound), inbound
    client_metrics = http_get(f"http://{client.ip}:4191/metrics")[1].decode()
    outbound = [line for line in client_metrics.splitlines()
                if line.startswith("request_total{") and 'direction="outbound"' in line]
    server_id = f"server.{mesh.app}.serviceaccount.identity.{mesh.cp}.cluster.local"
    assert any('tls="true"' in line and f'server_id="{server_id}"' in line for line in outbound), outbound
    # The proxies run as the injected user (the container's process is the one the runner started: exec all the way).
    status = Path(f"/proc/{server.procs['linkerd-proxy'].pid}/status").read_text()
    assert next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1] == "2102", status


def test_upgrade_control_plane_first_with_traffic_flowing(mesh: Mesh) -> None:
    """The seeds' order: `tether upgrade | kubectl apply`, the control plane rolled (each component
    replaced), then new workloads injected with the new values talk to the old ones; the client's
    requests flow all along, and none fails."""
    client = mesh.pods[_pod_name(mesh, "client")]
    cluster_ip = mesh.cluster.api.get(f"/api/v1/namespaces/{mesh.app}/services/server")["spec"]["clusterIP"]
    stop = mesh.dir / "stop-load"
    load = Proc(["python3", "-c", LOAD, cluster_ip, str(stop)], mesh.dir / "load.log", netns=client.netns)
    try:
        wait_until(lambda: client.procs["linkerd-proxy"].popen.poll() is None and load.popen.poll() is None
                   and _served(mesh, "client") >= 20, timeout=60, what="traffic flowing before the upgrade")
        # The seeds' upgrade line: the installed values reused, one changed, applied with kubectl.
        objects, values = install_objects(mesh.cp, "upgrade", "--set", "proxy.logLevel=debug",
                                          env={"KUBECONFIG": str(mesh.cluster.kubeconfig)})
        assert yaml.safe_load(values)["proxy"]["logLevel"] == "debug"
        mesh.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
        marks = {}
        for name in ("identity", "destination", "policy"):
            before = _served(mesh, "client")
            mesh.start_controller(name)
            # Requests were served across the replacement: the proxies ride on what they already hold.
            wait_until(lambda: _served(mesh, "client") > before + 10, timeout=30,  # noqa: B023 - called here
                       what=f"traffic after {name} was replaced")
            marks[name] = time.time()
        # The injector's values volume is updated as the kubelet updates a ConfigMap volume; new pods get them.
        mesh.values_file.write_text(values)

        def new_values_used() -> bool:
            pod = mesh.cluster.api.request("POST", "/api/v1/namespaces/t-inj-probe/pods",
                                           probe_pod("probe", {"linkerd.io/inject": "enabled"}),
                                           query={"dryRun": "All"})
            proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "linkerd-proxy")
            return {"name": "TETHER_PROXY_LOG_LEVEL", "value": "debug"} in proxy["env"]

        wait_until(new_values_used, timeout=30, what="the injector using the upgraded values")
        kubectl_apply(mesh.cluster, mesh.app, {"apiVersion": "v1", "kind": "ServiceAccount",
                                               "metadata": {"name": "client2"}},
                      deployment("client2", CLIENT_IMAGE, None, {}))
        new = mesh.run(mesh.pod_of("client2"))
        assert "TETHER_PROXY_LOG_LEVEL" in json.dumps(new.pod["spec"]) and '"debug"' in json.dumps(new.pod["spec"])
        # The upgraded proxy talks to the old one over mTLS, as the old client keeps doing.
        assert "hello from server" in new.exec("curl", "-s", "-m", "5", f"http://{cluster_ip}:80/")
        new_id = f"client2.{mesh.app}.serviceaccount.identity.{mesh.cp}.cluster.local"
        server_metrics = http_get(f"http://{mesh.pods[_pod_name(mesh, 'server')].ip}:4191/metrics")[1].decode()
        assert f'client_id="{new_id}"' in server_metrics
    finally:
        stop.write_text("")
        load.wait(30)
    result = json.loads(load.log().strip().splitlines()[-1])
    assert result["errors"] == [], result["errors"][:20]
    assert result["ok"] >= 100 and set(result["statuses"]) == {"200"}, result["statuses"]
    # Served before, during and after the control plane's replacement.
    assert any(t > marks["policy"] for t in result["times"]), "no request served after the upgrade"


def _served(mesh: Mesh, deployment: str) -> int:
    """Requests the pod's proxy has sent out and seen answered (its own outbound request_total)."""
    runner = mesh.pods[_pod_name(mesh, deployment)]
    text = http_get(f"http://{runner.ip}:4191/metrics")[1].decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("request_total{") and 'direction="outbound"' in line)
