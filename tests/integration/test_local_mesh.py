"""The local mesh end to end: `tether up`, pods in network namespaces, Services by name over mTLS,
scale, restarts, proxy-await, bad arguments, and `tether down` leaving nothing behind.

Each test gets its own state directory, bridge name and pod/service networks (others run tests on
this machine at the same time), and a finalizer that runs `tether down` even when the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.platform.local import network
from tether.testing import netns
from tether.testing.procs import http_get, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)

TETHER = [sys.executable, "-m", "tether"]


def free_networks() -> tuple[str, str]:
    """A pod /24 and a service /24 in 10.240.0.0/12 that no interface of this host uses."""
    base = ipaddress.ip_network("10.240.0.0/12")
    for _ in range(100):
        n = random.randrange(0, 2 ** 12 - 1)
        pods = ipaddress.ip_network((int(base.network_address) + n * 256, 24))
        svcs = ipaddress.ip_network((int(base.network_address) + (n + 1) * 256, 24))
        if not network.addresses_in_use(pods) and not network.addresses_in_use(svcs):
            return str(pods), str(svcs)
    raise RuntimeError("no free /24 in 10.240.0.0/12")


class Mesh:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.prefix: list[str] = []  # e.g. setpriv dropping every capability
        self.bridge = f"tt{uuid.uuid4().hex[:8]}"
        self.pod_cidr, self.service_cidr = free_networks()

    def tether(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.prefix, *TETHER, *args], capture_output=True, text=True, timeout=timeout,
                           cwd="/tmp", env={**os.environ, "TETHER_STATE_DIR": str(self.state)})
        if check and r.returncode != 0:
            raise AssertionError(f"tether {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n"
                                 f"{self.supervisor_log()}")
        return r

    def supervisor_log(self) -> str:
        try:
            return (self.state / "supervisor.log").read_text()[-4000:]
        except OSError:
            return ""

    def up(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.tether("up", "--bridge", self.bridge, "--pod-cidr", self.pod_cidr,
                           "--service-cidr", self.service_cidr, *extra)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.tether("status", "-o", "json", check=False).stdout))

    def pods(self, workload: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.status()["pods"] if workload is None or p["workload"] == workload]

    def settings(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "mesh.json").read_text()))

    def exec(self, pod: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tether("exec", pod, "--", *cmd, check=check, timeout=30)

    def apply(self, text: str) -> None:
        r = subprocess.run([*TETHER, "apply", "--resources-dir", str(self.state / "resources"), "-f", "-"],
                           input=text, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def metrics(self, pod: str) -> str:
        return self.exec(pod, "curl", "-s", "http://127.0.0.1:4191/metrics").stdout

    def leftovers(self, mesh_id: str, bridge: str, pids: list[int]) -> list[str]:
        prefix = f"tether-{mesh_id}-"
        out = [f"netns {n}" for n in network.leftover_netns(prefix)]
        out += [f"file {p}" for p in network.leftover_netns_etc(prefix)]
        if network.link_exists(bridge):
            out.append(f"bridge {bridge}")
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        out += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if f"tth{mesh_id}" in ln]
        if Path(f"/run/tether/{mesh_id}").exists():
            out.append(f"dir /run/tether/{mesh_id}")
        if self.state.exists():
            out.append(f"dir {self.state}")
        out += [f"process {pid}" for pid in pids if Path(f"/proc/{pid}").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        return out


def all_pids(status: dict[str, Any]) -> list[int]:
    pids = [status["supervisorPid"]] if status.get("supervisorPid") else []
    pids += [c["pid"] for c in status["components"] if c.get("pid")]
    pids += [p[k] for p in status["pods"] for k in ("appPid", "proxyPid") if p.get(k)]
    return pids


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path / "state")
    try:
        yield m
    finally:
        if (m.state / "mesh.json").exists():
            subprocess.run([*TETHER, "down", "--state-dir", str(m.state)], capture_output=True, timeout=120)


# http.server with a listen backlog for concurrent clients (its default of 5 makes the proxy's connects
# to it time out under load).
HTTP_APP = [sys.executable, "-c", "import http.server as h; h.ThreadingHTTPServer.request_queue_size = 256; "
            "h.test(h.SimpleHTTPRequestHandler, h.ThreadingHTTPServer, port=8080, bind='0.0.0.0')"]


def test_up_run_services_by_name_over_mtls_and_down_leaves_nothing(mesh: Mesh) -> None:
    out = mesh.up().stdout
    assert "control plane started" in out and "production brings its own" in out
    again = mesh.up().stdout
    assert "already up" in again
    mesh.tether("run", "web", "--port", "8080", "--replicas", "2", "--", *HTTP_APP)
    mesh.tether("run", "client", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    wait_for(lambda: mesh.status()["services"], 5, what="the Service's virtual IP")
    vip = mesh.status()["services"][0]["clusterIP"]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network(mesh.service_cidr)
    # The names reach the pods' hosts files once every destination replica serves the Service (at
    # most 10 s after the supervisor saw it): the virtual IP is in the status before that.
    wait_for(lambda: mesh.exec("client-0", "getent", "hosts", "web", check=False).returncode == 0, 15,
             what="the Service's name in the client pod's hosts file")
    for name in ("web", "web.default", "web.default.svc.cluster.local"):
        r = mesh.exec("client-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{remote_ip}",
                      f"http://{name}/", check=False)
        assert r.stdout == f"200 {vip}", (name, r.stdout, r.stderr)
    server_id = "web.default.serviceaccount.identity.linkerd.cluster.local"
    client_id = "client.default.serviceaccount.identity.linkerd.cluster.local"
    lines = [ln for ln in mesh.metrics("client-0").splitlines() if ln.startswith("response_total{")]
    # Each request over mTLS to a web identity. (Which name form labels the series is the proxy's
    # choice: the one asked for, or the Service's full name it resolved to.)
    forms = ("web:80", "web.default:80", "web.default.svc.cluster.local:80")
    meshed = [ln for ln in lines if 'tls="true"' in ln and f'server_id="{server_id}"' in ln
              and 'classification="success"' in ln and any(f'authority="{f}"' in ln for f in forms)]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in meshed) == 3, lines
    inbound = "".join(mesh.metrics(f"web-{i}") for i in (0, 1))
    assert f'client_id="{client_id}"' in inbound
    # Local mode runs its proxies as every deployment does: -OO, no debug ranges (proxy_build_info).
    assert inbound.count('python_optimize="2",python_debug_ranges="false",python_locale="C"') == 2, inbound
    status = mesh.status()
    assert status["controlPlaneReady"] and [p["phase"] for p in status["pods"]] == ["Running"] * 3
    assert {(w["name"], w["replicas"], w["ready"]) for w in status["workloads"]} == {("web", 2, 2), ("client", 1, 1)}
    assert "workload default/web: 2/2 ready" in mesh.tether("status").stdout
    checked = mesh.tether("check", "--proxy").stdout
    assert "tether-local-data-plane" in checked and "Status check results are \u221a" in checked
    # The proxies run as uid 2102: the check says whether that user gets this Python (an interpreter
    # under /root, mode 0700, gives it the system's libpython instead).
    theirs = subprocess.run(["setpriv", "--reuid=2102", "--regid=2102", "--clear-groups", sys.executable, "-c",
                             "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    mine = ".".join(map(str, sys.version_info[:3]))
    if theirs == mine:
        assert "\u221a every meshed pod's proxy runs this Python" in checked, checked
    else:
        assert "\u203c every meshed pod's proxy runs this Python" in checked, checked
        assert f"its proxy runs Python {theirs}, this command {mine}" in checked, checked
    mesh.state.chmod(0o777)
    r = mesh.tether("check", check=False)
    assert r.returncode == 1 and f"{mesh.state} is writable by others" in r.stdout
    mesh.state.chmod(0o755)
    mesh_id, bridge, pids = mesh.settings()["mesh_id"], mesh.bridge, all_pids(status)
    assert len(pids) == 1 + 2 + 6
    # iptables rules live in the pods' namespaces: they go with them.
    assert "PROXY_INIT_REDIRECT" in mesh.exec("client-0", "iptables", "-t", "nat", "-S").stdout
    out = mesh.tether("down").stdout
    assert "stopped 3 pods" in out
    assert mesh.leftovers(mesh_id, bridge, pids) == []


def test_scaling_changes_a_clients_endpoints_within_a_second(mesh: Mesh) -> None:
    mesh.up()
    mesh.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
    mesh.tether("run", "client", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    wait_for(lambda: mesh.exec("client-0", "curl", "-sf", "http://web/", check=False).returncode == 0, 10,
             what="web reachable")
    (client,) = mesh.pods("client")
    gauge = 'outbound_http_balancer_endpoints{authority="web:80",endpoint_state="ready"}'

    def endpoints() -> int:
        # The client proxy's admin port answers on the pod's address, from the host.
        text = http_get(f"http://{client['ip']}:4191/metrics")[1].decode()
        return next(int(float(ln.split()[-1])) for ln in text.splitlines() if ln.startswith(gauge))

    assert endpoints() == 1
    mesh.tether("scale", "web", "--replicas", "2")
    scaled = time.monotonic()
    wait_for(lambda: endpoints() == 2, 5, what="the client's balancer to have two endpoints")
    assert time.monotonic() - scaled < 1.0
    # Both pods serve: concurrent requests spread over them.
    script = ("import urllib.request\nfrom concurrent.futures import ThreadPoolExecutor\n"
              "with ThreadPoolExecutor(8) as ex:\n"
              "    list(ex.map(lambda _: urllib.request.urlopen('http://web/', timeout=5).read(), range(200)))\n")
    wait_for(lambda: mesh.exec("client-0", sys.executable, "-c", script) and 'dst_pod="web-1"' in
             mesh.metrics("client-0"), 20, what="requests reaching web-1")
    mesh.tether("scale", "web", "--replicas", "1")
    wait_for(lambda: endpoints() == 1, 5, what="the client's balancer back to one endpoint")
    # The pod left the endpoints before it stopped: no request failed on the way down.
    assert [p["name"] for p in mesh.pods("web")] == ["web-0"]
    mesh.exec("client-0", sys.executable, "-c", script)
    failures = [ln for ln in mesh.metrics("client-0").splitlines()
                if ln.startswith("response_total{") and 'classification="failure"' in ln]
    assert failures == []


def test_a_killed_application_or_controller_is_restarted(mesh: Mesh) -> None:
    mesh.up()
    dest = next(c for c in mesh.status()["components"] if c["name"] == "destination-0")
    os.kill(dest["pid"], signal.SIGKILL)
    wait_for(lambda: [c for c in mesh.status()["components"] if c["name"] == "destination-0" and c["ready"]
                      and c["restarts"] == 1 and c["pid"] != dest["pid"]], 20, what="destination restarted")
    mesh.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
    (pod,) = mesh.pods("web")
    os.kill(pod["appPid"], signal.SIGKILL)
    again = wait_for(lambda: [p for p in mesh.pods("web") if p["appRestarts"] == 1 and p["appPid"]
                              and p["appPid"] != pod["appPid"]], 10, what="the app restarted")
    assert again
    wait_for(lambda: mesh.exec("web-0", "curl", "-sf", "http://127.0.0.1:8080/", check=False).returncode == 0, 10,
             what="the restarted app serving")


def test_an_application_waits_for_its_proxy(mesh: Mesh) -> None:
    mesh.up()
    # A log level the proxy refuses: it exits at start and is restarted, never ready.
    mesh.tether("run", "held", "--annotation", "config.linkerd.io/proxy-log-level=tether=loud", "--no-wait",
                "--", "sh", "-c", "echo started; sleep 3600")
    wait_for(lambda: [p for p in mesh.pods("held") if p["proxyRestarts"] >= 2], 20, what="the proxy restarted twice")
    (pod,) = mesh.pods("held")
    assert pod["phase"] == "WaitingForProxy" and not pod["appRunning"] and pod["appPid"] is None
    assert mesh.tether("logs", "held").stdout == ""
    assert "tether=loud" in mesh.tether("logs", "held", "-c", "proxy").stdout
    r = mesh.tether("check", "--proxy", check=False)
    assert r.returncode == 1 and "default/held-0: WaitingForProxy" in r.stdout, r.stdout
    # With proxy-await disabled the application does not wait.
    mesh.tether("run", "eager", "--annotation", "config.linkerd.io/proxy-log-level=tether=loud",
                "--annotation", "config.linkerd.io/proxy-await=disabled", "--no-wait",
                "--", "sh", "-c", "echo started; sleep 3600")
    wait_for(lambda: mesh.tether("logs", "eager").stdout == "started\n", 20, what="the eager app started")


def test_down_during_traffic_exits_cleanly(mesh: Mesh) -> None:
    mesh.up("--ha")
    status = mesh.status()
    assert len(status["components"]) == 6 and all(c["ready"] for c in status["components"])
    mesh.tether("run", "web", "--port", "8080", "--replicas", "2", "--", *HTTP_APP)
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    loop = "while true; do curl -s -o /dev/null http://web/; done"
    mesh.tether("run", "load", "--", "sh", "-c", loop)
    try:
        wait_for(lambda: 'dst_service="web"' in mesh.metrics("load-0"), 30, what="traffic flowing")
    except TimeoutError as e:  # what the load pod's proxy decided, for whoever reads the failure
        proxy_log = mesh.tether("logs", "load", "-c", "proxy", check=False).stdout[-3000:]
        counts = [ln for ln in mesh.metrics("load-0").splitlines() if ln.startswith("request_total")]
        raise AssertionError(f"{e}\nload-0 request_total: {counts}\nload-0 proxy log:\n{proxy_log}\n"
                             f"supervisor log:\n{mesh.supervisor_log()}") from None
    status = mesh.status()
    mesh_id, pids = mesh.settings()["mesh_id"], all_pids(status)
    started = time.monotonic()
    r = mesh.tether("down", check=False)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - started < 30
    assert mesh.leftovers(mesh_id, mesh.bridge, pids) == []


def test_bad_arguments_get_one_line_errors(mesh: Mesh) -> None:
    def fails(*args: str, says: str) -> None:
        r = mesh.tether(*args, check=False)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)

    fails("run", "web", "--port", "8080", "--", "true", says="no mesh here")
    fails("down", "--timeout", "soon", says="--timeout")
    fails("up", "--pod-cidr", "10.1.2.3/40", says="--pod-cidr")
    fails("up", "--bridge", "a-very-long-bridge-name", says="--bridge")
    fails("up", "--identity-trust-anchors-file", "/nonexistent", says="--identity-trust-anchors-file")
    mesh.up()
    fails("up", "--pod-cidr", mesh.pod_cidr, "--bridge", f"x{mesh.bridge[1:]}", "--state-dir",
          str(mesh.state.parent / "other"), says="--pod-cidr")
    fails("run", "web", says="missing COMMAND")
    fails("run", "-n", "nowhere", "web", "--", "true", says="-n nowhere: no such namespace")
    fails("run", "web", "--port", "4143", "--", "true", says="port 4143: used by the pod's proxy")
    fails("run", "web", "--port", "http", "--", "true", says="--port 'http'")
    fails("run", "web", "--annotation", "config.linkerd.io/opaque-ports=mysql", "--", "true",
          says="annotation config.linkerd.io/opaque-ports")
    fails("run", "web", "--annotation", "config.linkerd.io/proxy-cpu-limit=1", "--", "true",
          says="not supported by the local platform")
    fails("run", "web", "--label", "novalue", "--", "true", says="--label 'novalue'")
    fails("scale", "ghost", "--replicas", "2", says="no workload ghost")
    fails("logs", "ghost", says="NAME ghost")
    mesh.tether("run", "web", "--no-wait", "--", "sleep", "3600")
    fails("run", "web", "--", "true", says="NAME web: a workload of that name runs")


def test_explicit_pods_without_network_namespaces(mesh: Mesh) -> None:
    # No bridge and no namespaces (what works without root); the test itself runs as root.
    out = mesh.tether("up", "--explicit").stdout
    assert "--explicit only" in out
    assert not network.link_exists(mesh.bridge)
    fails = mesh.tether("run", "web", "--", "true", check=False)
    assert fails.returncode == 2 and "--explicit is needed" in fails.stderr
    app = [sys.executable, "-c", "import http.server as h, os; h.ThreadingHTTPServer.request_queue_size = 256; "
           "h.test(h.SimpleHTTPRequestHandler, h.ThreadingHTTPServer, port=8080, bind=os.environ['POD_IP'])"]
    mesh.tether("run", "web", "--explicit", "--port", "8080", "--replicas", "2", "--", *app)
    mesh.tether("run", "client", "--explicit", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    wait_for(lambda: mesh.exec("client-0", "curl", "-sf", "http://web/", check=False).returncode == 0, 10,
             what="web reachable through the client's proxy (HTTP_PROXY)")
    for name in ("web", "web.default", "web.default.svc.cluster.local"):
        assert mesh.exec("client-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                         f"http://{name}/").stdout == "200"
    pods = {p["name"]: p for p in mesh.pods()}
    assert all(p["explicit"] and ipaddress.ip_address(p["ip"]).is_loopback for p in pods.values())
    client_metrics = http_get(f"http://{pods['client-0']['proxyAdmin']}/metrics")[1].decode()
    server_id = "web.default.serviceaccount.identity.linkerd.cluster.local"
    assert any(ln.startswith("response_total{") and 'tls="true"' in ln and f'server_id="{server_id}"' in ln
               for ln in client_metrics.splitlines()), client_metrics
    pids = all_pids(mesh.status())
    mesh_id = mesh.settings()["mesh_id"]
    assert "stopped 3 pods" in mesh.tether("down").stdout
    assert mesh.leftovers(mesh_id, mesh.bridge, pids) == []


# No capability at all: what an unprivileged user has (the uid stays 0 only so that the
# interpreter under /root can be run; without CAP_DAC_OVERRIDE it reads only what root owns).
NO_PRIVILEGES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--"]

GRPC_APP = [sys.executable, "-c", """
import os, grpc
from concurrent import futures
def hello(req, ctx):
    return b"hello " + req + b" from " + os.environ["POD_NAME"].encode()
h = grpc.method_handlers_generic_handler("demo.Greeter", {
    "Hello": grpc.unary_unary_rpc_method_handler(hello, lambda b: b, lambda b: b)})
s = grpc.server(futures.ThreadPoolExecutor(4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port(os.environ["POD_IP"] + ":50051")
s.start()
s.wait_for_termination()
"""]

GRPC_CLIENT = """
import grpc, sys
with grpc.insecure_channel("greeter:50051") as ch:  # through http_proxy: a CONNECT to the pod's proxy
    call = ch.unary_unary("/demo.Greeter/Hello", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    print(call(b"client", timeout=10).decode())
"""


def test_explicit_mode_needs_no_privilege_and_carries_grpc_through_http_proxy(mesh: Mesh) -> None:
    """`tether up --explicit` and explicit pods with every capability dropped; a gRPC client in a pod
    reaches a gRPC Service by name through its proxy (grpcio sends CONNECT to HTTP_PROXY), over mTLS."""
    probe = subprocess.run([*NO_PRIVILEGES, "ip", "netns", "add", f"tt-probe-{uuid.uuid4().hex[:6]}"],
                           capture_output=True, text=True)
    assert probe.returncode != 0, "the capability-less wrapper could still create a network namespace"
    mesh.prefix = NO_PRIVILEGES
    mesh.tether("up", "--explicit")
    mesh.tether("run", "greeter", "--explicit", "--port", "50051", "--", *GRPC_APP)
    mesh.tether("run", "client", "--explicit", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: greeter, namespace: default}\n"
               "spec: {selector: {app: greeter}, ports: [{port: 50051, targetPort: 50051}]}\n")
    got = wait_for(lambda: mesh.exec("client-0", sys.executable, "-c", GRPC_CLIENT, check=False).stdout.strip(),
                   20, what="the gRPC call through the client's proxy")
    assert got == "hello client from greeter-0", got
    pods = {p["name"]: p for p in mesh.pods()}
    client_metrics = http_get(f"http://{pods['client-0']['proxyAdmin']}/metrics")[1].decode()
    server_id = "greeter.default.serviceaccount.identity.linkerd.cluster.local"
    assert any(ln.startswith("tcp_open_total{") and 'peer="dst"' in ln and f'server_id="{server_id}"' in ln
               for ln in client_metrics.splitlines()), client_metrics
    pids = all_pids(mesh.status())
    mesh_id = mesh.settings()["mesh_id"]
    assert "stopped 2 pods" in mesh.tether("down").stdout
    assert mesh.leftovers(mesh_id, mesh.bridge, pids) == []


def test_down_after_the_supervisor_was_killed_leaves_nothing(mesh: Mesh) -> None:
    mesh.up()
    mesh.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
    status = mesh.status()
    pids, mesh_id = all_pids(status), mesh.settings()["mesh_id"]
    os.kill(status["supervisorPid"], signal.SIGKILL)
    wait_for(lambda: not mesh.status()["running"], 10, what="the supervisor gone")
    assert mesh.tether("status", check=False).returncode == 1
    # Its children (control plane, the pod's proxy and app) are orphans now: down finds and stops them.
    assert mesh.tether("down").returncode == 0
    assert mesh.leftovers(mesh_id, mesh.bridge, pids) == []


LOCKDOWN = """\
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-http, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  port: 8080
  proxyProtocol: HTTP/1
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: only-admin, namespace: default}
spec:
  identities: ["admin.default.serviceaccount.identity.linkerd.cluster.local"]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-admin-only, namespace: default}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  requiredAuthenticationRefs:
    - {group: policy.linkerd.io, kind: MeshTLSAuthentication, name: only-admin}
"""


def test_a_server_and_authorization_policy_lock_a_workload_down(mesh: Mesh) -> None:
    # The pods' proxies take their inbound policy from the local control plane: a Server with an
    # AuthorizationPolicy for another identity turns the client's next request into 403.
    mesh.up()
    mesh.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
    mesh.tether("run", "client", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")

    def status() -> str:
        return mesh.exec("client-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://web/",
                         check=False).stdout

    wait_for(lambda: status() == "200", 10, what="web reachable")
    mesh.apply(LOCKDOWN)
    wait_for(lambda: status() == "403", 10, what="the lock-down in force")
    inbound = mesh.metrics("web-0")
    assert any(ln.startswith("inbound_http_authz_deny_total{") and 'srv_name="web-http"' in ln
               for ln in inbound.splitlines()), inbound
    r = subprocess.run([*TETHER, "delete", "--resources-dir", str(mesh.state / "resources"), "-f", "-"],
                       input=LOCKDOWN, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: status() == "200", 10, what="the default policy back")


def test_a_pod_calls_its_own_service_through_both_sides_of_its_proxy(mesh: Mesh) -> None:
    # The outbound side dials the pod's own address (routed over lo, never through PREROUTING): the
    # proxy-init rule sends it to the inbound side, which takes the mTLS off for the application.
    mesh.up()
    mesh.tether("run", "web", "--port", "8080", "--", *HTTP_APP)
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    wait_for(lambda: mesh.exec("web-0", "getent", "hosts", "web", check=False).returncode == 0, 15,
             what="the Service's name in the pod's hosts file")
    r = mesh.exec("web-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://web/", check=False)
    assert r.stdout == "200", (r.stdout, r.stderr)
    me = "web.default.serviceaccount.identity.linkerd.cluster.local"
    inbound = [ln for ln in mesh.metrics("web-0").splitlines()
               if ln.startswith("request_total{") and 'direction="inbound"' in ln and 'target_port="8080"' in ln]
    assert any('tls="true"' in ln and f'client_id="{me}"' in ln for ln in inbound), inbound
    rules = mesh.exec("web-0", "iptables", "-t", "nat", "-S", "PROXY_INIT_OUTPUT").stdout.splitlines()
    assert rules[1] == ("-A PROXY_INIT_OUTPUT ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 2102 "
                        "-m comment --comment tether -j PROXY_INIT_REDIRECT"), rules


# Answers every connection on two ports with a banner before reading anything (as SMTP, MySQL or
# NATS servers do), then closes.
BANNER_APP = [sys.executable, "-c", """
import socket, threading
def serve(port):
    ls = socket.create_server(("0.0.0.0", port), backlog=64)
    while True:
        c, _ = ls.accept()
        c.sendall(b"220 banner on %d\\r\\n" % port)
        c.close()
threading.Thread(target=serve, args=(5555,), daemon=True).start()
serve(5556)
"""]
# Connects, sends nothing, prints what the server says first (60 s at most).
READ_BANNER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
print(s.recv(100).decode().strip())
"""


def test_a_server_speaks_first_port_the_destination_marks_opaque_is_not_detected(mesh: Mesh) -> None:
    """The client's proxy asks discovery about a connection's original destination before detecting:
    a Service port in the Service's config.linkerd.io/opaque-ports, and a pod's port in the pod's,
    are forwarded at once, so a server that speaks first is heard without the client sending a
    byte. Before, the client's proxy waited for the protocol detection timeout (10 s) first."""
    mesh.up()
    mesh.tether("run", "banner", "--port", "5555", "--port", "5556",
                "--annotation", "config.linkerd.io/opaque-ports=5556", "--", *BANNER_APP)
    mesh.tether("run", "client", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: banner\n  namespace: default\n"
               "  annotations: {config.linkerd.io/opaque-ports: '5555'}\n"
               "spec: {selector: {app: banner}, ports: [{port: 5555, targetPort: 5555}]}\n")
    wait_for(lambda: mesh.exec("client-0", "getent", "hosts", "banner", check=False).returncode == 0, 15,
             what="the Service's name in the client pod's hosts file")
    pod_ip = mesh.pods("banner")[0]["ip"]
    heard = [mesh.exec("client-0", sys.executable, "-c", READ_BANNER, *to).stdout.strip()
             for to in (("banner", "5555"), (pod_ip, "5556"))]
    assert heard == ["220 banner on 5555", "220 banner on 5556"], heard
    log = mesh.tether("logs", "client", "-c", "proxy").stdout
    assert "protocol detection timed out" not in log, log[-3000:]
    client = mesh.metrics("client-0").splitlines()
    opaque = [ln for ln in client if ln.startswith("tcp_open_total{") and 'direction="outbound"' in ln
              and 'peer="dst"' in ln and 'tls="true"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in opaque) >= 2, opaque


def test_http_to_a_port_only_the_pod_marks_opaque(mesh: Mesh) -> None:
    """The pod lists its port in config.linkerd.io/opaque-ports, the Service does not: the client's
    proxy detects HTTP and reaches the pod's proxy at its inbound port with a transport header naming
    the port (the destination's opaque_transport hint, per pod, as Linkerd's); the server's proxy
    forwards the connection to the application as bytes, as that port's policy says."""
    mesh.up()
    mesh.tether("run", "web", "--port", "8080", "--annotation", "config.linkerd.io/opaque-ports=8080", "--",
                *HTTP_APP)
    mesh.tether("run", "client", "--", "sleep", "3600")
    mesh.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
               "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    wait_for(lambda: mesh.exec("client-0", "getent", "hosts", "web", check=False).returncode == 0, 15,
             what="the Service's name in the client pod's hosts file")
    codes = [mesh.exec("client-0", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://web/",
                       check=False).stdout for _ in range(3)]
    assert codes == ["200"] * 3, codes
    client_id = "client.default.serviceaccount.identity.linkerd.cluster.local"
    server = mesh.metrics("web-0").splitlines()
    opened = [ln for ln in server if ln.startswith("tcp_open_total{") and 'direction="inbound"' in ln
              and 'tls="true"' in ln and f'client_id="{client_id}"' in ln]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in opened) >= 1, opened
    assert not [ln for ln in server if ln.startswith("request_total{") and f'client_id="{client_id}"' in ln]
