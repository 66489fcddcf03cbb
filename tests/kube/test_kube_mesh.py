"""The mesh on Kubernetes, end to end: pods injected by the real API server's call to the injector and run
from that injected spec, the previous release upgraded to this one with traffic flowing.

The previous release (PREVIOUS_COMMIT, tagged PREVIOUS: its chart, packaged by helm, and its sources) goes first:
`helm template` of its chart gives the issuer Secret, trust roots and linkerd-config in the API server,
and its identity, destination and injector run as host processes from its sources. Deployments are
created with kubectl in a namespace annotated `linkerd.io/inject: enabled`; kwok schedules their pods.
`tether.testing.kubelet` then does what a kubelet would with each pod object as the API server stored
it: network namespace at the kwok-assigned IP, the `linkerd-init` container, the proxy container with
the injected environment, projected token and trust-anchor volume, its postStart `proxy-await`, then
the application, each image tag mapped to that release's code. The upgrade is the seeds' order:
`tether upgrade | kubectl apply`, the control plane replaced, then new pods (this release's injector,
proxy and init container) beside the old ones, while a client's requests flow without one failing.
"""

from __future__ import annotations

import base64
import datetime as dt
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

import tether
from tether import __version__
from tether.cli.install_cmd import webhook_certificate
from tether.platform.local import network
from tether.testing import netns
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeinjector import Injector, remove_webhooks, start_injector
from tether.testing.kubelet import PodRunner
from tether.testing.kubeplatform import Issuers, KubeDestinationProc, KubeIdentityProc, kubectl_apply
from tether.testing.procs import Proc, http_get

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PREVIOUS = "v0.1.0"  # the release before this one
# Its commit (tag v0.1.0): a clone made without tags still has it in main's history.
PREVIOUS_COMMIT = "19e534d0836f0ea52aa5c334fb3b8dee2c5793ca"
SERVER_IMAGE = "registry.invalid/tether/hello"
CLIENT_IMAGE = "registry.invalid/tether/sleeper"
# This release's images run the sources this test imports (a pod's environment is its own: without this
# they would run whatever tether the interpreter has installed, another checkout's perhaps).
CURRENT_ENV = {"PYTHONPATH": str(Path(tether.__file__).resolve().parents[1])}
GATEWAY = "10.244.255.254"  # the host's address on the bridge; kwok hands out pod IPs in 10.244.N.0/24
PREFIXLEN = 16


def deployment(name: str, image: str, port: int | None, app: str = "") -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": f"{image}:1.0"}
    if port:
        container["ports"] = [{"name": "http", "containerPort": port}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app or name}},
                 "template": {"metadata": {"labels": {"app": app or name}},
                              "spec": {"serviceAccountName": name, "containers": [container]}}},
    }


def service(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


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
    """The control plane (host processes), the injector, and the pods run from their injected specs."""

    cluster: KubeCluster
    cp: str
    app: str
    dir: Path
    bridge: str
    previous_env: dict[str, str]  # PYTHONPATH of the previous release's sources
    procs: dict[str, Proc] = field(default_factory=dict)
    pods: dict[str, PodRunner] = field(default_factory=dict)
    injector: Injector | None = None

    def start_controller(self, name: str, env: dict[str, str] | None = None) -> None:
        """identity on 8080, destination on 8086 and linkerd-policy's 8090: each Service's port on the host.
        A running one is replaced (stopped, then the new one started and ready)."""
        old = self.procs.pop(name, None)
        if old is not None:
            old.stop()
        kind = KubeIdentityProc if name == "identity" else KubeDestinationProc
        port = {"identity": 8080, "destination": 8086, "policy": 8090}[name]
        proc = kind(self.dir, self.cluster, self.cp, host=GATEWAY, port=port, env=env)
        self.procs[name] = proc
        proc.wait_ready()

    def start_injector(self, values: str, env: dict[str, str] | None = None) -> None:
        if self.injector is not None:
            self.injector.stop()
        self.injector = start_injector(self.cluster, self.dir / f"injector-{uuid.uuid4().hex[:4]}", values, "Fail",
                                       probe_pod, controller_namespace=self.cp, env=env)

    def pod_of(self, deployment: str) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pods = self.cluster.api.get(f"/api/v1/namespaces/{self.app}/pods", labelSelector=f"app={deployment}")
            ok = [p for p in pods["items"] if (p.get("status") or {}).get("podIP")
                  and p["status"].get("phase") == "Running"]
            return ok[0] if ok else None

        return wait_until(running, timeout=90, what=f"a {deployment} pod running")

    def run(self, pod: dict[str, Any]) -> PodRunner:
        """What a kubelet does for ``pod``, as the API server stored it (injected); each tether image tag
        runs that release's code."""
        names = [c["name"] for c in (*pod["spec"].get("initContainers", []), *pod["spec"]["containers"])]
        assert names == ["linkerd-init", "linkerd-proxy", "app"], names
        tether = [sys.executable, "-m", "tether"]
        old_image = f"localhost/tether:{PREVIOUS.lstrip('v')}"
        images = {old_image: tether, f"localhost/tether:{__version__}": tether,
                  SERVER_IMAGE: [sys.executable, "-m", "tether.testing.backend", "--host", "0.0.0.0", "--port",
                                 "8080", "--name", "server"],
                  CLIENT_IMAGE: [sys.executable, "-c", "import time; time.sleep(3600)"]}
        executables = {"tether": tether, "tether-proxy-init": [*tether, "proxy-init"], "python": [sys.executable]}
        hosts = {f"{name}.{self.cp}.svc.cluster.local": GATEWAY
                 for name in ("linkerd-identity", "linkerd-dst", "linkerd-policy")}
        runner = PodRunner(self.cluster, pod, bridge=self.bridge, index=len(self.pods), gateway=GATEWAY,
                           prefixlen=PREFIXLEN, workdir=self.dir, images=images, executables=executables,
                           hosts=hosts, image_env={old_image: self.previous_env, **{
                               image: CURRENT_ENV for image in (f"localhost/tether:{__version__}", SERVER_IMAGE,
                                                                CLIENT_IMAGE)}})
        self.pods[runner.name] = runner
        try:
            runner.start()
        except Exception as e:
            raise AssertionError(f"{e}\n{runner.logs()}") from e
        return runner

    def runner(self, deployment: str) -> PodRunner:
        return next(r for name, r in self.pods.items() if name.startswith(f"{deployment}-"))


def control_plane_objects(rendered: str) -> tuple[list[dict[str, Any]], str]:
    """What the host-run control plane reads from the API server (the issuer and webhook Secrets, the
    trust roots, linkerd-config), and linkerd-config's values text."""
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    wanted = [d for d in docs if d["kind"] in ("Secret", "ConfigMap")]
    config = next(d for d in wanted if d["metadata"]["name"] == "linkerd-config")
    return wanted, config["data"]["values"]


def previous_release(cluster: KubeCluster, d: Path) -> tuple[Path, Path]:
    """The previous release's sources and its control-plane chart packaged by helm, from its commit."""
    out = d / "previous"
    git = ["git", "-C", str(ROOT)]

    def have() -> bool:
        return subprocess.run([*git, "cat-file", "-e", f"{PREVIOUS_COMMIT}^{{commit}}"],
                              capture_output=True, check=False).returncode == 0

    if not have():
        # A shallow clone: ask its origin for that one commit.
        subprocess.run([*git, "fetch", "-q", "--depth=1", "origin", PREVIOUS_COMMIT],
                       capture_output=True, check=False, timeout=120)
    if not have():
        pytest.fail(f"the previous release {PREVIOUS} (commit {PREVIOUS_COMMIT}) is not in this clone "
                    "and its origin did not give it: clone with history (no --depth)")
    archive = subprocess.run([*git, "archive", PREVIOUS_COMMIT, "src", "charts", "scripts"],
                             capture_output=True, check=True)
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    # Its generated gRPC modules, as its own setup makes them.
    subprocess.run(["bash", str(out / "scripts" / "gen-protos.sh"), sys.executable], capture_output=True, check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(out)], check=True)
    cluster.helm("package", str(out / "charts" / "tether-control-plane"), "-d", str(out))
    return out / "src", next(out.glob("tether-control-plane-*.tgz"))


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
    previous_src, previous_chart = previous_release(kube_cluster, d)
    m = Mesh(kube_cluster, cp, app, d, bridge, {"PYTHONPATH": str(previous_src), "TETHER_PURE_PYTHON": "1"})
    network.create_bridge(bridge, GATEWAY, PREFIXLEN)
    try:
        crds = run_tether("install", "--crds")
        kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=crds, timeout=120)
        # The previous release, installed with helm from its chart with certificates made for it.
        ca = Issuers(cp)
        cert, key = ca.issuer()
        files = {"identityTrustAnchorsPEM": ca.roots()["data"]["ca-bundle.crt"]}
        secret = ca.secret(cert, key)
        files["identity.issuer.tls.crtPEM"] = base64.b64decode(secret["data"]["tls.crt"]).decode()
        files["identity.issuer.tls.keyPEM"] = base64.b64decode(secret["data"]["tls.key"]).decode()
        files["proxyInjector.crtPEM"], files["proxyInjector.keyPEM"], files["proxyInjector.caBundle"] = (
            webhook_certificate(cp, dt.datetime.now(dt.UTC)))
        args = []
        for k, v in files.items():
            path = d / k
            path.write_text(v)
            args += ["--set-file", f"{k}={path}"]
        # 0.1.0's proxy-init failed as a non-root user (its iptables lock and capabilities; fixed in 0.2.0):
        # its users ran it as root, the workaround its chart offers.
        rendered = kube_cluster.helm("template", "linkerd", str(previous_chart), "--namespace", cp, *args,
                                     "--set", "proxyInit.runAsRoot=true")
        objects, values = control_plane_objects(rendered)
        kube_cluster.create_namespace(cp)
        kube_cluster.kubectl("apply", "-n", cp, "-f", "-", stdin=yaml.safe_dump_all(objects))
        # The control plane's Services, as a cluster's DNS and kube-proxy would give them to the pods: the
        # names resolve (the pods' /etc/hosts) to the host, where each process listens on its Service's port.
        for name in ("identity", "destination", "policy"):
            m.start_controller(name, env=m.previous_env)
        m.start_injector(values, env=m.previous_env)
        kube_cluster.create_namespace(app)
        kube_cluster.kubectl("annotate", "namespace", app, "linkerd.io/inject=enabled")
        kubectl_apply(kube_cluster, app,
                      *({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}
                        for sa in ("server", "client", "client2", "server2")),
                      deployment("server", SERVER_IMAGE, 8080), deployment("client", CLIENT_IMAGE, None),
                      service("server"))
        for name in ("server", "client"):
            m.run(m.pod_of(name))
        yield m
    finally:
        if m.injector is not None:
            m.injector.stop()
        remove_webhooks(kube_cluster)
        for runner in reversed(list(m.pods.values())):
            runner.close()
        for proc in m.procs.values():
            proc.stop()
        network.delete_bridge(bridge)
        shutil.rmtree(d, ignore_errors=True)


def run_tether(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=120,
                          check=True, env={**os.environ, **(env or {})}).stdout


def cluster_ip(mesh: Mesh, name: str) -> str:
    return str(mesh.cluster.api.get(f"/api/v1/namespaces/{mesh.app}/services/{name}")["spec"]["clusterIP"])


def assert_mtls(mesh: Mesh, client: str, server: str) -> None:
    """The client pod's request to the server's Service is answered, and both proxies counted it over mTLS
    with each other's identity."""
    url = f"http://{cluster_ip(mesh, server)}:80/"
    # The application has no readiness probe (a pod without one is Ready at once), and a new proxy's
    # first request waits for its discovery: retry until the first answer.
    failures: list[str] = []

    def answered() -> bool:
        try:
            return "hello from server" in mesh.runner(client).exec("curl", "-s", "-m", "5", url)
        except RuntimeError as e:  # curl's exit status: refused, or no answer within 5 s
            failures.append(str(e))
            return False

    try:
        wait_until(answered, timeout=60, what=f"{client}'s request to {server} answered")
    except TimeoutError as e:
        raise AssertionError(f"{e}; the last failures: {failures[-3:]}") from None
    client_id = f"{client}.{mesh.app}.serviceaccount.identity.{mesh.cp}.cluster.local"
    server_id = f"{server}.{mesh.app}.serviceaccount.identity.{mesh.cp}.cluster.local"
    inbound = [line for line in http_get(f"http://{mesh.runner(server).ip}:4191/metrics")[1].decode().splitlines()
               if line.startswith("request_total{") and 'direction="inbound"' in line]
    assert any('tls="true"' in line and f'client_id="{client_id}"' in line for line in inbound), inbound
    outbound = [line for line in http_get(f"http://{mesh.runner(client).ip}:4191/metrics")[1].decode().splitlines()
                if line.startswith("request_total{") and 'direction="outbound"' in line]
    assert any('tls="true"' in line and f'server_id="{server_id}"' in line for line in outbound), outbound


def proxy_version(runner: PodRunner) -> str:
    return str(runner.pod["metadata"]["annotations"]["linkerd.io/proxy-version"])


def test_injected_pods_of_the_previous_release_reach_each_other_over_mtls(mesh: Mesh) -> None:
    assert proxy_version(mesh.runner("server")) == PREVIOUS.lstrip("v")
    assert_mtls(mesh, "client", "server")


def test_upgrade_from_the_previous_release_with_traffic_flowing(mesh: Mesh) -> None:
    """The seeds' order: `tether upgrade | kubectl apply`, the control plane replaced component by component,
    then this release's pods beside the previous release's; the client's requests flow all along, none fails."""
    client = mesh.runner("client")
    stop = mesh.dir / "stop-load"
    load = Proc(["python3", "-c", LOAD, cluster_ip(mesh, "server"), str(stop)], mesh.dir / "load.log",
                netns=client.netns)
    marks: dict[str, float] = {}
    try:
        wait_until(lambda: load.popen.poll() is None and _served(mesh, "client") >= 20, timeout=60,
                   what="traffic flowing before the upgrade")
        # The seeds' upgrade line: this release renders the installed values (one changed) for kubectl.
        # (proxy-init goes back to its non-root default: this release runs it so.)
        rendered = run_tether("upgrade", "-L", mesh.cp, "--set", "proxy.logLevel=debug,proxyInit.runAsRoot=false",
                              env={"KUBECONFIG": str(mesh.cluster.kubeconfig)})
        objects, values = control_plane_objects(rendered)
        config = next(o for o in objects if o["metadata"]["name"] == "linkerd-config")
        assert config["data"]["version"] == __version__ and yaml.safe_load(values)["proxy"]["logLevel"] == "debug"
        mesh.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))
        for name in ("identity", "destination", "policy"):
            before = _served(mesh, "client")
            mesh.start_controller(name)  # this release's code
            # Requests were served across the replacement: the proxies ride on what they already hold.
            wait_until(lambda: _served(mesh, "client") > before + 10, timeout=30,  # noqa: B023 - called here
                       what=f"traffic after {name} was replaced")
            marks[name] = time.time()
        mesh.start_injector(values)
        kubectl_apply(mesh.cluster, mesh.app, deployment("client2", CLIENT_IMAGE, None),
                      deployment("server2", SERVER_IMAGE, 8080), service("server2"))
        new_client, new_server = mesh.run(mesh.pod_of("client2")), mesh.run(mesh.pod_of("server2"))
        for runner in (new_client, new_server):
            assert proxy_version(runner) == __version__
            env = {e["name"]: e.get("value") for c in runner.pod["spec"]["containers"] for e in c.get("env", [])}
            assert env["TETHER_PROXY_LOG_LEVEL"] == "debug", env
            init = runner.pod["spec"]["initContainers"][0]
            assert init["command"] == ["tether-proxy-init"] and init["securityContext"]["runAsUser"] == 65534
        # This release's proxy to the previous release's and to its own, over mTLS both ways.
        assert_mtls(mesh, "client2", "server")
        assert_mtls(mesh, "client2", "server2")
        # The proxy runs as the injected user (the container's process is the one the runner started).
        status = Path(f"/proc/{new_server.procs['linkerd-proxy'].pid}/status").read_text()
        assert next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1] == "2102", status
    finally:
        stop.write_text("")
        load.wait(30)
    result = json.loads(load.log().strip().splitlines()[-1])
    assert result["errors"] == [], result["errors"][:20]
    assert result["ok"] >= 100 and set(result["statuses"]) == {"200"}, result["statuses"]
    assert any(t > marks["policy"] for t in result["times"]), "no request served after the control plane's upgrade"


def _served(mesh: Mesh, deployment: str) -> int:
    """Requests the pod's proxy has sent out and seen answered (its own outbound request_total)."""
    text = http_get(f"http://{mesh.runner(deployment).ip}:4191/metrics")[1].decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("request_total{") and 'direction="outbound"' in line)
