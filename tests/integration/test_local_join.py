"""`tether join`: a second host's pods in the first host's mesh. The two hosts are two network
namespaces joined by a veth pair, each with its own bridge, supervisor and pods; the commands run
in them with `nsenter --net` (only the network namespace: pods' namespaces stay visible)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing import netns
from tether.testing.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)


class Host:
    def __init__(self, name: str, state: Path) -> None:
        self.ns, self.state = name, state

    def tether(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", sys.executable, "-m", "tether", *args],
                           capture_output=True, text=True, timeout=120, cwd="/tmp",
                           env={**os.environ, "TETHER_STATE_DIR": str(self.state)})
        if check and r.returncode != 0:
            path = self.state / "supervisor.log"
            log = path.read_text()[-3000:] if path.exists() else ""
            raise AssertionError(f"{self.ns}: tether {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}\n{log}")
        return r

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host, dict[str, str]]]:
    from test_local_mesh import free_networks

    tag = uuid.uuid4().hex[:6]
    a, b = Host(f"tjoin-{tag}-a", tmp_path / "a"), Host(f"tjoin-{tag}-b", tmp_path / "b")
    pods_a, svcs = free_networks()
    pods_b, link = free_networks()
    link_net = next(iter(ipaddress.ip_network(link).subnets(new_prefix=30)))
    addr_a, addr_b = (str(h) for h in link_net.hosts())
    nets = {"pods_a": pods_a, "svcs": svcs, "pods_b": pods_b}
    try:
        for h in (a, b):
            subprocess.run(["ip", "netns", "add", h.ns], check=True)
            h.ip("link", "set", "lo", "up")
        subprocess.run(["ip", "link", "add", f"j{tag}a", "netns", a.ns, "type", "veth", "peer", "name", f"j{tag}b",
                        "netns", b.ns], check=True)
        a.ip("addr", "add", f"{addr_a}/30", "dev", f"j{tag}a")
        b.ip("addr", "add", f"{addr_b}/30", "dev", f"j{tag}b")
        a.ip("link", "set", f"j{tag}a", "up")
        b.ip("link", "set", f"j{tag}b", "up")
        b.ip("route", "add", "default", "via", addr_a)
        yield a, b, nets
    finally:
        for h in (b, a):
            if (h.state / "mesh.json").exists():
                h.tether("down", check=False)
        for h in (a, b):
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)


def test_a_second_host_joins_and_its_pods_are_reached_over_mtls(hosts: tuple[Host, Host, dict[str, str]]) -> None:
    a, b, nets = hosts
    out = a.tether("up", "--bridge", "tjbr0", "--pod-cidr", nets["pods_a"], "--service-cidr", nets["svcs"]).stdout
    assert "tether join --control-plane" in out
    join_addr = json.loads((a.state / "mesh.json").read_text())["join_addr"]
    bad = (a.state.parent / "bad.token")
    bad.write_text("not-the-token\n")
    r = b.tether("join", "--control-plane", join_addr, "--token", str(bad), "--pod-cidr", nets["pods_b"], check=False)
    assert r.returncode == 1 and "HTTP 401 missing or wrong join token" in r.stderr
    b.tether("join", "--control-plane", join_addr, "--token", str(a.state / "join.token"), "--bridge", "tjbr0",
             "--pod-cidr", nets["pods_b"])
    b.tether("run", "web", "--port", "8080", "--replicas", "2", "--", sys.executable, "-m", "http.server", "8080")
    a.tether("run", "client", "--", "sleep", "3600")
    r = subprocess.run([sys.executable, "-m", "tether", "apply", "--resources-dir", str(a.state / "resources"), "-f",
                        "-"], input="apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n"
                        "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # The first host's pod reaches the second host's pods through the Service, by name, with mTLS.
    wait_for(lambda: a.tether("exec", "client", "--", "curl", "-sf", "-m", "5", "http://web/", check=False)
             .returncode == 0, 15, what="web on the second host reachable")
    metrics = a.tether("exec", "client", "--", "curl", "-s", "http://127.0.0.1:4191/metrics").stdout
    web_ips = {p["ip"] for p in json.loads(b.tether("status", "-o", "json").stdout)["pods"]}
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(nets["pods_b"]) for ip in web_ips)
    lines = [ln for ln in metrics.splitlines() if ln.startswith("response_total{") and 'tls="true"' in ln
             and 'server_id="web.default.serviceaccount.identity.linkerd.cluster.local"' in ln]
    assert any(f'target_ip="{ip}"' in ln for ln in lines for ip in web_ips), metrics
    # The second host's pods know the Service names too (from the first host's join API).
    wait_for(lambda: "web.default.svc.cluster.local web.default.svc web.default web"
             in b.tether("exec", "web-0", "--", "cat", "/etc/hosts").stdout, 10,
             what="the Service's names in the second host's pods")
    # Leaving: the second host's pods leave the endpoints; its forwarding setting is put back.
    b.tether("down")
    r = a.tether("exec", "client", "--", "curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
                 "http://web/", check=False)
    assert r.stdout == "503", r.stdout
    a.tether("down")
    for h in (a, b):
        forward = subprocess.run(["ip", "netns", "exec", h.ns, "cat", "/proc/sys/net/ipv4/ip_forward"],
                                 capture_output=True, text=True).stdout.strip()
        assert forward == "0", h.ns
    routes = subprocess.run(["ip", "-n", a.ns, "route"], capture_output=True, text=True).stdout
    assert nets["pods_b"] not in routes
