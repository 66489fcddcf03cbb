"""The mesh on Kubernetes, end to end: pods injected by the real API server's call to the injector and run
from that injected spec, the previous release upgraded to this one with traffic flowing.

The previous release (PREVIOUS_COMMIT, tagged PREVIOUS: its chart, packaged by helm, and its sources) goes first:
`helm template` of its chart gives the issuer Secret, trust roots, service accounts and linkerd-config in
the API server, and its identity, destination and injector run as host processes from its sources, the
identity and destination with the args of its chart's Deployments (`chart_controller`: the files of their
volumes made as the kubelet would, their Services' names resolved to this host). Deployments are
created with kubectl in a namespace annotated `linkerd.io/inject: enabled`; kwok schedules their pods.
`tether.testing.kubelet` then does what a kubelet would with each pod object as the API server stored
it: network namespace at the kwok-assigned IP, the `linkerd-init` container, the proxy container with
the injected environment, projected token and trust-anchor volume, its postStart `proxy-await`, then
the application, each image tag mapped to that release's code. The upgrade is the seeds' order:
`tether upgrade | kubectl apply`, the control plane replaced, then new pods (this release's injector,
proxy and init container) beside the old ones, while a client's requests flow without one failing.
This release's chart runs the control plane over TLS: the new pods' proxies get their certificates
and resolve and route over TLS, while the previous release's keep speaking plaintext
(`controlPlaneTLS.acceptPlaintext`) until the upgrade is finished by turning that off.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
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
from tether.testing.kubeplatform import Issuers, KubeControllerProc, chart_controller, kubectl_apply
from tether.testing.procs import Proc, free_port, http_get

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
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # the installed chart's, by name
    release: str = PREVIOUS
    procs: dict[str, KubeControllerProc] = field(default_factory=dict)
    pods: dict[str, PodRunner] = field(default_factory=dict)
    injector: Injector | None = None

    def services(self) -> dict[str, str]:
        """The control plane's Service names, as the cluster's DNS answers them here: this host."""
        return {f"{name}.{self.cp}.svc.cluster.local": GATEWAY
                for name in ("linkerd-identity", "linkerd-dst", "linkerd-policy")}

    def start_controller(self, name: str, env: dict[str, str] | None = None) -> None:
        """identity on 8080, destination on 8086 and linkerd-policy's 8090: each Service's port on the host,
        run with the installed chart's args. A running one is replaced (stopped, then the new one started
        and ready)."""
        old = self.procs.pop(name, None)
        if old is not None:
            old.stop()
        deployment = self.deployments["linkerd-identity" if name == "identity" else "linkerd-destination"]
        port = {"identity": 8080, "destination": 8086, "policy": 8090}[name]
        proc = chart_controller(self.dir, self.cluster, deployment, host=GATEWAY, port=port,
                                services=self.services(), env=env)
        self.procs[name] = proc
        proc.wait_ready()

    def install(self, rendered: str) -> str:
        """What the host-run control plane reads from the API server applied, the Deployments kept for
        start_controller; returns linkerd-config's values text."""
        objects, values, self.deployments = control_plane_objects(rendered)
        self.cluster.kubectl("apply", "-n", self.cp, "-f", "-", stdin=yaml.safe_dump_all(objects))
        return values

    def upgrade(self, *sets: str, after_each: Callable[[str], None] = lambda name: None) -> str:
        """The seeds' upgrade line, `tether upgrade | kubectl apply` (the installed values, ``sets`` over them),
        then identity, destination and policy replaced in turn (``after_each`` called after each); returns
        the new values text. The injector is left to the caller."""
        sets = tuple(a for s in sets for a in ("--set", s))
        rendered = run_tether("upgrade", "-L", self.cp, *sets, env={"KUBECONFIG": str(self.cluster.kubeconfig)})
        values = self.install(rendered)
        for name in ("identity", "destination", "policy"):
            self.start_controller(name)  # this release's code
            after_each(name)
        self.release = __version__
        return values

    def new_pods(self) -> tuple[PodRunner, PodRunner]:
        """client2 and server2, injected by this release's injector (created once)."""
        if not any(name.startswith("client2-") for name in self.pods):
            kubectl_apply(self.cluster, self.app, deployment("client2", CLIENT_IMAGE, None),
                          deployment("server2", SERVER_IMAGE, 8080), service("server2"))
            self.run(self.pod_of("client2"))
            self.run(self.pod_of("server2"))
        return self.runner("client2"), self.runner("server2")

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
        runner = PodRunner(self.cluster, pod, bridge=self.bridge, index=len(self.pods), gateway=GATEWAY,
                           prefixlen=PREFIXLEN, workdir=self.dir, images=images, executables=executables,
                           hosts=self.services(), image_env={old_image: self.previous_env, **{
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


def control_plane_objects(rendered: str) -> tuple[list[dict[str, Any]], str, dict[str, dict[str, Any]]]:
    """What the host-run control plane reads from the API server (the issuer and webhook Secrets, the
    trust roots, linkerd-config, the service accounts its tokens are minted for), linkerd-config's values
    text, and the Deployments by name (the args the host processes run)."""
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    wanted = [d for d in docs if d["kind"] in ("Secret", "ConfigMap", "ServiceAccount")]
    config = next(d for d in wanted if d["metadata"]["name"] == "linkerd-config")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    return wanted, config["data"]["values"], deployments


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
        kube_cluster.create_namespace(cp)
        values = m.install(rendered)
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
        controllers = "\n".join(f"--- {name}\n{proc.log()[-2000:]}" for name, proc in mesh.procs.items())
        raise AssertionError(f"{e}; the last failures: {failures[-3:]}\n{mesh.runner(client).logs()}\n"
                             f"{controllers}") from None
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
    """The seeds' order: `tether upgrade | kubectl apply`, the control plane replaced component by component
    (now over TLS, plaintext still served), then this release's pods beside the previous release's; the
    client's requests flow all along, none fails."""
    client = mesh.runner("client")
    stop = mesh.dir / "stop-load"
    load = Proc(["python3", "-c", LOAD, cluster_ip(mesh, "server"), str(stop)], mesh.dir / "load.log",
                netns=client.netns)
    marks: dict[str, float] = {}
    try:
        wait_until(lambda: load.popen.poll() is None and _served(mesh, "client") >= 20, timeout=60,
                   what="traffic flowing before the upgrade")
        def served_across(name: str) -> None:
            # Requests were served across the replacement: the proxies ride on what they already hold,
            # and the previous release's reconnect to this release's control plane in plaintext.
            wait_until(lambda: _served(mesh, "client") > before[0] + 10, timeout=30,
                       what=f"traffic after {name} was replaced")
            marks[name] = time.time()
            before[0] = _served(mesh, "client")

        before = [_served(mesh, "client")]
        # The seeds' upgrade line: this release renders the installed values (one changed) for kubectl.
        # (proxy-init goes back to its non-root default: this release runs it so.)
        values = mesh.upgrade("proxy.logLevel=debug,proxyInit.runAsRoot=false", after_each=served_across)
        assert yaml.safe_load(values)["proxy"]["logLevel"] == "debug"
        # The previous release's proxies came back to the new destination and policy services in plaintext.
        for name in ("destination", "policy"):
            wait_until(lambda: _connections(mesh, name)["false"] >= 1, timeout=30,  # noqa: B023 - called here
                       what=f"the previous release's proxies reconnected to {name} in plaintext")
        config = mesh.cluster.api.get(f"/api/v1/namespaces/{mesh.cp}/configmaps/linkerd-config")
        assert config["data"]["version"] == __version__
        mesh.start_injector(values)
        new_client, new_server = mesh.new_pods()
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


def _connections(mesh: Mesh, name: str) -> dict[str, int]:
    """A control-plane process's connections served, by tls ("true", "false"), and refused ("refused")."""
    prefix = "identity" if name == "identity" else "destination"
    out = {"true": 0, "false": 0, "refused": 0}
    for line in mesh.procs[name].metrics().splitlines():
        value = int(float(line.rsplit(" ", 1)[1])) if line.startswith(prefix) else 0
        for tls in ("true", "false"):
            if line.startswith(f'{prefix}_connections_total{{tls="{tls}"}}'):
                out[tls] = value
        if line.startswith(f'{prefix}_connections_refused_total{{reason="plaintext"}}'):
            out["refused"] = value
    return out


def _certificate(mesh: Mesh, runner: PodRunner, port: int, name: str) -> str:
    """What openssl in the pod's network namespace sees of the control plane's TLS on this host's ``port``,
    asking for ``name`` and verifying it against the control plane's trust anchors."""
    roots = mesh.cluster.api.get(f"/api/v1/namespaces/{mesh.cp}/configmaps/linkerd-identity-trust-roots")
    anchors = mesh.dir / "anchors.pem"
    anchors.write_text(roots["data"]["ca-bundle.crt"])
    r = subprocess.run(network.netns_exec(runner.netns, [
        "openssl", "s_client", "-connect", f"{GATEWAY}:{port}", "-servername", name, "-verify_hostname", name,
        "-CAfile", str(anchors), "-showcerts"]), input="", capture_output=True, text=True, timeout=30)
    return r.stdout


def _plaintext_get(mesh: Mesh, port: int, host: str = GATEWAY) -> str:
    """A plaintext gRPC client (the previous release's proxy, an operator's port-forward) asking the
    control plane on ``host:port`` for the server Service's endpoints: the first answer's kind."""
    import grpc

    from tether.api.gen import destination_pb2, destination_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as ch:
        call = destination_pb2_grpc.DestinationStub(ch).Get(destination_pb2.GetDestination(
            scheme="k8s", path=f"server.{mesh.app}.svc.cluster.local:80",
            context_token=json.dumps({"ns": mesh.app})), timeout=10)
        first = next(iter(call))
        call.cancel()
        return str(first.WhichOneof("update"))


def test_this_release_reaches_its_control_plane_over_tls(mesh: Mesh) -> None:
    """What the chart runs: identity over TLS as linkerd-identity, destination and policy over mutual TLS as
    linkerd-destination; this release's injected proxies are given those names, get their certificates and
    resolve and route over TLS; plaintext is served until the upgrade is finished, then refused."""
    if mesh.release != __version__:  # run alone: upgrade first (the upgrade test does it with traffic)
        mesh.start_injector(mesh.upgrade("proxy.logLevel=debug,proxyInit.runAsRoot=false"))
    client2, _server2 = mesh.new_pods()
    identity = f"linkerd-identity.{mesh.cp}.serviceaccount.identity.{mesh.cp}.cluster.local"
    destination = f"linkerd-destination.{mesh.cp}.serviceaccount.identity.{mesh.cp}.cluster.local"
    env = {e["name"]: e.get("value") for c in client2.pod["spec"]["containers"] for e in c.get("env", [])}
    for prefix in ("TETHER_PROXY", "LINKERD2_PROXY"):
        assert env[f"{prefix}_IDENTITY_SVC_NAME"] == identity, env
        assert env[f"{prefix}_DESTINATION_SVC_NAME"] == env[f"{prefix}_POLICY_SVC_NAME"] == destination, env
    # Seen from a pod: each Service's port presents its service's certificate, chained to the anchors.
    for port, name in ((8080, identity), (8086, destination), (8090, destination)):
        seen = _certificate(mesh, client2, port, name)
        assert "Verification: OK" in seen and f"Verified peername: {name}" in seen, (port, seen[-2000:])
    # The new proxies got their certificates over TLS, and resolve and route over mutual TLS ...
    assert _connections(mesh, "identity")["true"] >= 2
    assert_mtls(mesh, "client2", "server2")
    for name in ("destination", "policy"):
        assert _connections(mesh, name)["true"] >= 1, name
    # ... while a plaintext client is still answered: the previous release's proxies, until restarted.
    assert _plaintext_get(mesh, 8086) == "add"
    # The destination service is ready (the chart's readiness probe) only once certified: with no identity
    # service to reach it never is, and serves nothing.
    unreachable = {**mesh.services(), f"linkerd-identity.{mesh.cp}.svc.cluster.local": "127.0.0.2"}
    port = free_port()
    lonely = chart_controller(mesh.dir, mesh.cluster, mesh.deployments["linkerd-destination"], host="127.0.0.1",
                              port=port, services=unreachable)
    try:
        wait_until(lambda: "cannot get a certificate" in lonely.log(), timeout=60,
                   what="the destination service's log naming its missing certificate")
        probe = next(c for c in mesh.deployments["linkerd-destination"]["spec"]["template"]["spec"]["containers"]
                     if c["name"] == "destination")["readinessProbe"]["httpGet"]
        assert http_get(f"http://127.0.0.1:{lonely.admin_port}{probe['path']}")[0] == 503
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        lonely.stop()
    # Finishing the upgrade: plaintext off. A plaintext client is refused, and counted where the operator
    # looks; this release's proxies come back over TLS and keep routing.
    mesh.upgrade("controlPlaneTLS.acceptPlaintext=false")
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        _plaintext_get(mesh, 8086)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _connections(mesh, "destination")["refused"] >= 1
    # The operators' plaintext listener on the pod's loopback (what `kubectl port-forward
    # deploy/linkerd-destination 8086:8087` reaches for `tether diagnostics`) still answers.
    operator_port = mesh.procs["destination"].plaintext_port
    assert operator_port is not None
    assert _plaintext_get(mesh, operator_port, "127.0.0.1") == "add"
    for name in ("destination", "policy"):
        wait_until(lambda: _connections(mesh, name)["true"] >= 1, timeout=60,  # noqa: B023 - called here
                   what=f"this release's proxies back on {name} over TLS")
    assert_mtls(mesh, "client2", "server2")
