"""Transparent interception: two pods in network namespaces, iptables REDIRECT, SO_ORIGINAL_DST.

The client pod's application calls the server pod's address directly; its outbound proxy (running
as uid 2102, like linkerd-proxy) and the server pod's inbound proxy are in the path only because of
the rules `tether proxy-init` installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tether.testing import netns
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)

PROXY_UID = 2102


def start_pod_proxy(pod: netns.Pod, log_dir: Path, *extra: str) -> Proc:
    """proxy-init in the pod, then its proxy as uid 2102 on the standard ports."""
    pod.exec(sys.executable, "-m", "tether", "proxy-init")
    return Proc(["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
                 sys.executable, "-m", "tether", "proxy", "--inbound-addr", "0.0.0.0:4143",
                 "--outbound-addr", "127.0.0.1:4140", "--admin-addr", "127.0.0.1:4191",
                 "--opaque-ports", "9300", "--log-level", "warn,tether=info", *extra],
                log_dir / f"proxy-{pod.name}.log", netns=pod.ns)


def start_server_apps(server: netns.Pod, log_dir: Path) -> list[Proc]:
    """The server pod's HTTP app on 8080 and its server-speaks-first TCP app on 9300."""
    return [Proc([sys.executable, "-m", "tether.testing.backend", "--host", "0.0.0.0", "--port", "8080",
                  "--name", "server-pod"], log_dir / "backend.log", netns=server.ns),
            Proc([sys.executable, "-c", _TCP_ECHO], log_dir / "tcp.log", netns=server.ns)]


def wait_pods_ready(client: netns.Pod, server: netns.Pod, timeout: float) -> None:
    for pod in (client, server):
        wait_for(lambda pod=pod: pod.exec("curl", "-sf", "http://127.0.0.1:4191/ready",
                                          check=False).returncode == 0,
                 timeout, what=f"proxy in {pod.name} ready")
    wait_for(lambda: server.exec("curl", "-sf", "http://127.0.0.1:8080/", check=False).returncode == 0,
             20, what="backend up")


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[netns.Pod, netns.Pod, list[Proc]]]:
    net = netns.PodNetwork()
    procs: list[Proc] = []
    try:
        client = net.add_pod("client")
        server = net.add_pod("server")
        procs += [start_pod_proxy(pod, tmp_path) for pod in (client, server)]
        procs += start_server_apps(server, tmp_path)
        wait_pods_ready(client, server, 20)
        yield client, server, procs
    finally:
        for p in procs:
            p.stop(5)
        net.close()


_TCP_ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9300)); s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"banner\\n")
    data = c.recv(100)
    c.sendall(data.upper()); c.close()
"""


def metric_lines(pod: netns.Pod, name: str) -> list[str]:
    out = pod.exec("curl", "-s", "http://127.0.0.1:4191/metrics").stdout
    return [ln for ln in out.splitlines() if ln.startswith(name + "{")]


def test_http_is_intercepted_on_both_sides(pods) -> None:  # type: ignore[no-untyped-def]
    client, server, _ = pods
    url = f"http://{server.ip}:8080/"
    for _ in range(5):
        r = client.exec("curl", "-s", url)
        assert r.stdout == "hello from server-pod\n"
    out = [ln for ln in metric_lines(client, "request_total") if 'direction="outbound"' in ln]
    assert any(f'target_addr="{server.ip}:8080"' in ln and ln.endswith(" 5") for ln in out), out
    inb = [ln for ln in metric_lines(server, "request_total") if 'direction="inbound"' in ln]
    assert any(ln.endswith(" 5") for ln in inb), inb


def test_opaque_tcp_is_intercepted_and_server_speaks_first(pods) -> None:  # type: ignore[no-untyped-def]
    client, server, _ = pods
    script = (
        f"import socket; c = socket.create_connection(('{server.ip}', 9300), timeout=5); "
        "print(c.recv(100).decode().strip()); c.sendall(b'hello'); print(c.recv(100).decode())"
    )
    r = client.exec(sys.executable, "-c", script)
    assert r.stdout.split() == ["banner", "HELLO"]
    opened = [ln for ln in metric_lines(client, "tcp_open_total") if 'direction="outbound"' in ln]
    assert any(f'target_addr="{server.ip}:9300"' in ln for ln in opened), opened
    inbound = [ln for ln in metric_lines(server, "tcp_open_total") if 'direction="inbound"' in ln]
    assert inbound, "the server pod's inbound proxy saw no TCP connection"


def test_proxy_own_traffic_is_not_looped(pods) -> None:  # type: ignore[no-untyped-def]
    # The admin port is excluded from inbound redirection and the proxy's own connections
    # (uid 2102) from outbound redirection: a request crosses each proxy exactly once.
    client, server, _ = pods
    client.exec("curl", "-s", f"http://{server.ip}:8080/")
    out = [ln for ln in metric_lines(client, "request_total") if 'direction="inbound"' in ln]
    assert out == [], "the client pod's proxy saw its own outbound request come back in"


@pytest.fixture
def meshed_pods() -> Iterator[tuple[netns.Pod, netns.Pod, LocalMesh]]:
    """Client and server pods whose proxies have identities from an identity service in a third pod."""
    # The proxies run as uid 2102: their files live where that uid can read them (pytest's
    # tmp_path is under a root-only directory).
    tmp_path = Path(tempfile.mkdtemp(prefix="tether-netns-"))
    tmp_path.chmod(0o755)
    net = netns.PodNetwork()
    mesh = LocalMesh(tmp_path)
    procs: list[Proc] = []
    try:
        client, server, control = net.add_pod("client"), net.add_pod("server"), net.add_pod("control")
        mesh.create_ca()
        identity = Proc([sys.executable, "-m", "tether", "controller", "identity", "--addr", "0.0.0.0:8080",
                         "--admin-addr", "127.0.0.1:9990", "--issuer-dir", str(mesh.ca_dir), "--state-dir",
                         str(mesh.state), "--identity-trust-domain", "cluster.local", "--controller-namespace",
                         mesh.cp_ns], tmp_path / "identity.log", netns=control.ns)
        procs.append(identity)
        wait_for(lambda: control.exec("curl", "-sf", "http://127.0.0.1:9990/ready", check=False).returncode == 0,
                 20, what="identity service ready")
        ws = {pod.name: mesh.workload(pod.name) for pod in (client, server)}
        for path in [mesh.state, *mesh.state.rglob("*")]:
            os.chown(path, PROXY_UID, PROXY_UID)  # the proxies run as 2102 and read their tokens
        dst = tmp_path / "destinations.yaml"
        server_id = ws["server"].identity
        dst.write_text(yaml.safe_dump({"destinations": {
            f"{server.ip}:8080": [{"addr": f"{server.ip}:8080", "identity": server_id}],
            f"{server.ip}:9300": [{"addr": f"{server.ip}:9300", "identity": server_id, "proxy_port": 4143}],
        }}))
        for pod in (client, server):
            w = ws[pod.name]
            procs.append(start_pod_proxy(
                pod, tmp_path, "--destinations-file", str(dst), "--identity-name", w.identity,
                "--identity-token-path", str(w.token_path), "--identity-trust-anchors", str(mesh.anchors),
                "--identity-addrs", f"{control.ip}:8080"))
        procs += start_server_apps(server, tmp_path)
        wait_pods_ready(client, server, 30)
        yield client, server, mesh
    finally:
        for p in procs:
            p.stop(5)
        net.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_transparent_http_and_tcp_cross_pods_over_mtls(meshed_pods) -> None:  # type: ignore[no-untyped-def]
    client, server, mesh = meshed_pods
    server_id = mesh.identity_name("server", "default")
    client_id = mesh.identity_name("client", "default")
    for _ in range(3):
        assert client.exec("curl", "-s", f"http://{server.ip}:8080/").stdout == "hello from server-pod\n"
    out = [ln for ln in metric_lines(client, "request_total") if 'direction="outbound"' in ln]
    assert any('tls="true"' in ln and f'server_id="{server_id}"' in ln for ln in out), out
    inb = [ln for ln in metric_lines(server, "request_total") if 'direction="inbound"' in ln]
    assert any('tls="true"' in ln and f'client_id="{client_id}"' in ln for ln in inb), inb
    # Opaque TCP: mTLS to the peer's 4143 with the original port in the transport header.
    script = (
        f"import socket; c = socket.create_connection(('{server.ip}', 9300), timeout=5); "
        "print(c.recv(100).decode().strip()); c.sendall(b'meshed'); print(c.recv(100).decode())"
    )
    assert client.exec(sys.executable, "-c", script).stdout.split() == ["banner", "MESHED"]
    tcp_out = [ln for ln in metric_lines(client, "tcp_open_total") if 'peer="dst"' in ln]
    assert any(f'server_id="{server_id}"' in ln for ln in tcp_out), tcp_out
    tcp_in = [ln for ln in metric_lines(server, "tcp_open_total") if 'direction="inbound"' in ln]
    assert any(f'client_id="{client_id}"' in ln for ln in tcp_in), tcp_in
