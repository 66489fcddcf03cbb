"""A meshed pair of proxies doing identity, destination, outbound and inbound policy, with no
google.protobuf in either process: their messages go through tether's own runtime (protolite).

client --> client proxy --mTLS--> web proxy --> app; both proxies certified by a real identity
service, the client proxy resolving and routing through a real destination controller (an HTTPRoute
with a header filter), the web proxy watching its port's inbound policy there. Whether protobuf is
loaded is read from each proxy's /proc/PID/maps (protobuf's upb extension is a shared object).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tether.platform.local.workloads import WorkloadPort
from tether.testing.backend import BackendServer, start_in_thread
from tether.testing.mesh import LocalMesh, web_with_header_route
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

AUTHORITY = "web.default.svc.cluster.local:80"


def protobuf_objects(pid: int) -> list[str]:
    """The protobuf shared objects mapped into a process (upb's _message extension, the C++ one)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({ln.split()[-1] for ln in maps.splitlines() if "/google/_upb/" in ln or "/google/protobuf/" in ln})


class Mesh:
    def __init__(self, work: Path) -> None:
        self.mesh = LocalMesh(work)
        self.app: BackendServer | None = None
        self.controller: Proc | None = None
        self.mesh.create_ca()
        self.mesh.start_identity()
        self.app = start_in_thread("web")
        web_inbound = free_port()
        web, client = self.mesh.workload("web"), self.mesh.workload("client")
        self.web, self.client = web, client
        # The web workload's endpoint is its proxy's inbound listener (iptables would send it there).
        reg = self.mesh.registry
        reg.update(replace(reg.get("default", "web"), labels={"app": "web"}, addresses=("127.0.0.1",),
                           ports=(WorkloadPort(web_inbound),)))
        resources = work / "resources"
        resources.mkdir()
        (resources / "web.yaml").write_text(web_with_header_route(web_inbound))
        port, admin = free_port(), free_port()
        self.controller = Proc([sys.executable, "-m", "tether", "controller", "destination",
                                "--addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
                                "--resources-dir", str(resources), "--state-dir", str(self.mesh.state)],
                               work / "controller.log")
        self.mesh.procs.append(self.controller)
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 30, what="controller ready")
        control = f"127.0.0.1:{port}"
        self.web_proxy = self.mesh.proxy(web, inbound_port=web_inbound, policy_addrs=control,
                                         inbound_app_addr=f"127.0.0.1:{self.app.server_address[1]}")
        self.client_proxy = self.mesh.proxy(client, destination_addrs=control, policy_addrs=control,
                                            destination_context='{"ns":"default"}')

    def close(self) -> None:
        self.mesh.close()
        if self.app is not None:
            self.app.shutdown()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        m.close()


def _metric(proxy: ProxyProc, name: str) -> list[str]:
    return [ln for ln in proxy.metrics().splitlines() if ln.startswith(name + "{")]


def test_a_meshed_pair_resolves_routes_and_authorizes_without_protobuf(mesh: Mesh) -> None:
    # The check can fail: a process that loads protobuf messages (as the proxy did) shows its shared object.
    control = subprocess.run([sys.executable, "-c", "import tether.api.gen.destination_pb2, os, sys; "
                              "sys.stdout.write(open(f'/proc/{os.getpid()}/maps').read())"],
                             capture_output=True, text=True, timeout=60, check=True)
    assert "/google/_upb/" in control.stdout or "/google/protobuf/" in control.stdout

    def answer() -> tuple[int, bytes]:
        return http_get(mesh.client_proxy.outbound + "/headers", headers={"Host": AUTHORITY})

    # Destination (Get) and outbound policy (OutboundPolicies.Watch): the route's filter is applied.
    wait_for(lambda: answer()[0] == 200, 30, what="web through the client proxy")
    status, body = answer()
    assert status == 200
    assert json.loads(body).get("x-route") == "web-headers"
    # Identity: both proxies certified, the request crossed over mTLS with the client's identity.
    for proxy, ident in ((mesh.client_proxy, mesh.client.identity), (mesh.web_proxy, mesh.web.identity)):
        doc = json.loads(http_get(proxy.admin + "/identity.json")[1])
        assert ident in json.dumps(doc), doc
    inbound = _metric(mesh.web_proxy, "request_total")
    assert any('tls="true"' in ln and f'client_id="{mesh.client.identity}"' in ln for ln in inbound), inbound
    # Inbound policy (InboundServerPolicies.WatchPort): the controller's policy for the port is in force.
    policies = _metric(mesh.web_proxy, "tether_inbound_policy")
    assert any(ln.endswith(" 1") for ln in policies), policies
    # And neither process ever loaded protobuf.
    for proxy in (mesh.client_proxy, mesh.web_proxy):
        assert protobuf_objects(proxy.pid) == [], proxy.name
