"""The CLI against a real local mesh: an identity service, a registered workload, its proxy.

`tether identity WORKLOAD`, `tether check [--proxy]`, `tether version --proxy` and the warning of
an identity service whose issuer is named for another control plane, all as a user runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether import __version__
from tether.core.identity.names import DEFAULT_CONTROL_PLANE_NS
from tether.platform.local.controlplane import read_records
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, ProxyProc, free_port, wait_for

pytestmark = pytest.mark.integration


def tether(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tether", *args]
    if state is not None:
        cmd += ["--state-dir", str(state)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    m = LocalMesh(tmp_path_factory.mktemp("mesh"))
    try:
        m.create_ca()
        m.start_identity()
        web = m.workload("web")
        m.proxy(web)  # ready, its admin address recorded in the registry
        yield m
    finally:
        m.close()


def test_identity_of_a_registered_workload(mesh: LocalMesh) -> None:
    r = tether("identity", "default/web", state=mesh.state)
    assert r.returncode == 0, r.stderr
    assert f"Identity:  web.default.serviceaccount.identity.{DEFAULT_CONTROL_PLANE_NS}.cluster.local" in r.stdout
    assert "URI:spiffe://cluster.local/ns/default/sa/web" in r.stdout
    doc = json.loads(tether("identity", "web", "-o", "json", state=mesh.state).stdout)
    assert doc["ready"] is True and doc["workload"] == "default/web"
    assert doc["certificates"][0]["uris"] == ["spiffe://cluster.local/ns/default/sa/web"]


def test_the_proxy_logs_its_admin_address(mesh: LocalMesh) -> None:
    proxy = next(p for p in mesh.procs if isinstance(p, ProxyProc))
    assert f"INFO tether.proxy.app: admin listener on 127.0.0.1:{proxy.admin_port}" in proxy.log()


def test_check_and_check_proxy_pass_on_a_healthy_mesh(mesh: LocalMesh) -> None:
    r = tether("check", state=mesh.state)
    assert r.returncode == 0, r.stdout
    assert "\u221a control plane processes are ready" in r.stdout
    assert "\u221a issuer cert is issued by the trust anchor" in r.stdout
    assert "linkerd-data-plane" not in r.stdout
    r = tether("check", "--proxy", "-o", "json", state=mesh.state)
    assert r.returncode == 0, r.stdout
    doc = json.loads(r.stdout)
    assert doc["success"] is True
    assert [c["categoryName"] for c in doc["categories"]] == [
        "linkerd-existence", "linkerd-identity", "control-plane-version", "linkerd-data-plane",
        "linkerd-identity-data-plane"]
    assert all(ch["result"] == "success" for c in doc["categories"] for ch in c["checks"])


def test_version_reads_the_running_processes(mesh: LocalMesh) -> None:
    r = tether("version", "--proxy", state=mesh.state)
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        f"Client version: {__version__}",
        f"Server version: {__version__}",
        f"Proxy version (default/web): {__version__}",
    ]


def test_check_proxy_fails_when_a_proxy_is_gone(mesh: LocalMesh, tmp_path: Path) -> None:
    # A second workload whose proxy admin address nobody listens on.
    r = tether("workload", "register", "ghost", "--proxy-admin", f"127.0.0.1:{free_port()}", state=mesh.state)
    assert r.returncode == 0, r.stderr
    try:
        r = tether("check", "--proxy", "--category", "linkerd-data-plane", state=mesh.state)
        assert r.returncode == 1
        assert "\u00d7 data plane proxies are ready" in r.stdout and "default/ghost" in r.stdout
    finally:
        assert tether("workload", "remove", "ghost", state=mesh.state).returncode == 0


def test_identity_service_warns_about_an_issuer_named_for_another_control_plane(tmp_path: Path) -> None:
    ca, state = tmp_path / "ca", tmp_path / "state"
    assert tether("identity", "create-ca", "--out", str(ca), "--controller-namespace", "other").returncode == 0
    admin = free_port()
    p = Proc([sys.executable, "-m", "tether", "controller", "identity", "--addr", "127.0.0.1:0",
              "--admin-addr", f"127.0.0.1:{admin}", "--issuer-dir", str(ca), "--state-dir", str(state)],
             tmp_path / "identity.log", env={**os.environ})
    try:
        wait_for(lambda: read_records(state), 20, what="the identity service's record")
        log = p.log()
        assert " WARN tether.controller: the issuer is named identity.other.cluster.local, not " \
               f"identity.{DEFAULT_CONTROL_PLANE_NS}.cluster.local" in log
        assert "WARNING" not in log
        r = tether("check", "--category", "linkerd-identity", state=state)
        assert r.returncode == 0  # a warning, not an error
        assert "\u203c issuer cert is named for the control plane's namespace and trust domain" in r.stdout
    finally:
        assert p.stop() == 0
    assert read_records(state) == [], "the record goes when the service stops"


def test_identity_and_check_work_on_the_demos_state(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    demo = Proc([sys.executable, "-m", "tether", "demo", "--duration", "1s", "--rps", "20", "--keep-running",
                 "--workdir", str(work)], tmp_path / "demo.log")
    try:
        wait_for(lambda: "mesh left running" in demo.log(), 60, what="the demo's mesh")
        assert f"tether identity default/web --state-dir {work / 'state'}" in demo.log()
        r = tether("identity", "default/web", state=work / "state")
        assert r.returncode == 0, r.stderr
        assert "Identity:  web.default.serviceaccount.identity.linkerd.cluster.local" in r.stdout
        r = tether("check", "--proxy", state=work / "state")
        assert r.returncode == 0, r.stdout
    finally:
        assert demo.stop() in (0, 143)
