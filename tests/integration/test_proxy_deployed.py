"""The proxy runs as every deployment starts it: optimisation level 2 and no debug ranges (issue 16:
~1 MiB of a meshed proxy's idle RSS), and an operator sees it in ``proxy_build_info``.

Real processes: a meshed pair started with the Kubernetes proxy container's own command and
environment-variable settings, getting certificates from a real identity service and serving a
request over mTLS; and a proxy started without the flags, whose labels say so.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tether.core.inject import InjectValues
from tether.core.inject.annotations import ProxyOverrides
from tether.core.inject.pod import proxy_container
from tether.testing.backend import BackendServer, start_in_thread
from tether.testing.mesh import LocalMesh, MeshWorkload
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

AUTHORITY = "web.default.svc.cluster.local:80"
CHART = Path(__file__).resolve().parents[2] / "charts" / "tether-control-plane"
_BUILD_INFO = re.compile(r"^proxy_build_info\{([^}]*)\} 1$", re.MULTILINE)


def build_info(admin: str) -> dict[str, str]:
    status, body = http_get(admin + "/metrics")
    assert status == 200
    m = _BUILD_INFO.search(body.decode())
    assert m is not None, body[:500]
    return dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))


class PodProxy:
    """A proxy started as the Kubernetes proxy container runs it: the container's command and args, its
    settings as TETHER_PROXY_* variables, and the image's ``python`` (here this venv's) first on PATH."""

    def __init__(self, tmp: Path, name: str, settings: dict[str, str]) -> None:
        chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
        container = proxy_container(InjectValues.from_values(chart_values, "linkerd", "0.1.0"), ProxyOverrides(),
                                    native=False)
        self.command = [*container["command"], *container["args"]]
        # The container's fixed settings of the interpreter (its locale), as the kubelet passes them.
        fixed = {e["name"]: e["value"] for e in container["env"] if e["name"] in ("LC_ALL", "PYTHONCOERCECLOCALE")}
        self.admin_port, self.inbound_port, self.outbound_port = free_port(), free_port(), free_port()
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TETHER_PROXY_ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
            "TETHER_PROXY_INBOUND_ADDR": f"127.0.0.1:{self.inbound_port}",
            "TETHER_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{self.outbound_port}",
            "TETHER_PROXY_LOG_LEVEL": "warn,tether=info",
            **fixed,
            **settings,
        }
        self.proc = Proc(self.command, tmp / f"{name}.log", env=env)
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        wait_for(lambda: self._ready(), 30, what=f"{name} /ready")

    def _ready(self) -> bool:
        if self.proc.popen.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.popen.returncode}:\n{self.proc.log()}")
        return http_get(self.admin + "/ready", timeout=1)[0] == 200

    def stop(self) -> None:
        self.proc.stop()


def identity_settings(mesh: LocalMesh, w: MeshWorkload) -> dict[str, str]:
    return {"TETHER_PROXY_IDENTITY_NAME": w.identity, "TETHER_PROXY_IDENTITY_TOKEN_PATH": str(w.token_path),
            "TETHER_PROXY_IDENTITY_TRUST_ANCHORS": str(mesh.anchors),
            "TETHER_PROXY_IDENTITY_ADDRS": ",".join(mesh.identity_addrs)}


@pytest.fixture
def app() -> Iterator[BackendServer]:
    srv = start_in_thread("web")
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_meshed_pair_run_as_the_pod_runs_it_is_optimised_and_serves_over_mtls(
        tmp_path: Path, app: BackendServer) -> None:
    mesh = LocalMesh(tmp_path)
    mesh.create_ca()
    mesh.start_identity(1)
    started: list[PodProxy] = []
    try:
        web, client = mesh.workload("web"), mesh.workload("client")
        server = PodProxy(tmp_path, "server", {
            **identity_settings(mesh, web),
            "TETHER_PROXY_INBOUND_APP_ADDR": f"127.0.0.1:{app.server_address[1]}"})
        started.append(server)
        dst = tmp_path / "destinations.yaml"
        dst.write_text(yaml.safe_dump({"destinations": {AUTHORITY: [{
            "addr": f"127.0.0.1:{app.server_address[1]}", "proxy_port": server.inbound_port,
            "identity": web.identity}]}}))
        proxy = PodProxy(tmp_path, "client", {**identity_settings(mesh, client),
                                              "TETHER_PROXY_DESTINATIONS_FILE": str(dst)})
        started.append(proxy)
        assert proxy.command[:5] == ["python", "-OO", "-X", "no_debug_ranges", "-m"]

        url = f"http://127.0.0.1:{proxy.outbound_port}/"
        assert http_get(url, headers={"Host": AUTHORITY}) == (200, b"hello from web\n")
        metrics = http_get(server.admin + "/metrics")[1].decode()
        assert any(ln.startswith("request_total{") and 'tls="true"' in ln and f'client_id="{client.identity}"' in ln
                   for ln in metrics.splitlines()), metrics
        for p in started:
            info = build_info(p.admin)
            assert info["python_optimize"] == "2" and info["python_debug_ranges"] == "false", info
            assert info["python_locale"] == "C", info
            assert info["vendor"] == "tether"
            # In the C locale no locale file is mapped (C.UTF-8's LC_CTYPE: 120 KiB of RSS).
            maps = Path(f"/proc/{p.proc.popen.pid}/maps").read_text()
            assert "/locale/" not in maps, [ln for ln in maps.splitlines() if "/locale/" in ln]
    finally:
        for p in reversed(started):
            p.stop()
        mesh.close()


def test_the_labels_tell_a_proxy_run_without_the_flags(tmp_path: Path, app: BackendServer) -> None:
    # The test harness's proxies run as deployed; this one is started bare, as a developer might.
    admin = free_port()
    bare = Proc([sys.executable, "-m", "tether", "proxy", "--admin-addr", f"127.0.0.1:{admin}",
                 "--outbound-addr", f"127.0.0.1:{free_port()}", "--inbound-addr", f"127.0.0.1:{free_port()}",
                 "--log-level", "warn"], tmp_path / "bare.log",
                env={"PYTHONOPTIMIZE": "", "PYTHONNODEBUGRANGES": "", "LC_ALL": "", "LANG": "C.UTF-8",
                     "PYTHONCOERCECLOCALE": ""})
    harness = ProxyProc(tmp_path, name="harness", log_level="warn").wait_ready()
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200, 30, what="bare /ready")
        info = build_info(f"http://127.0.0.1:{admin}")
        assert (info["python_optimize"], info["python_debug_ranges"], info["python_locale"]) == \
            ("0", "true", "C.UTF-8"), info
        assert build_info(harness.admin)["python_optimize"] == "2"
        assert build_info(harness.admin)["python_locale"] == "C"
    finally:
        bare.stop()
        harness.stop()
