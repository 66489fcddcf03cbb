"""What an idle plain proxy keeps in memory: modules it loads only when a feature needs them.

Each of these once loaded at start-up and cost RSS in every proxy (docs/notes/issue-16.md, "the
plain proxy's memory"): hashlib through ``secrets`` (~1 MiB with OpenSSL's digests), tempfile,
shutil, bz2 and lzma through ``importlib.abc`` (~1 MiB), platform (to ask for glibc), PyYAML without
a destinations file (~1.4 MiB), the policy watch's gRPC client and the HTTP/2 codec under it
without ``--policy-addrs`` (~0.8 MiB). The proxy here is a real process that served a request; what it
loaded is read at its exit and, for the C extensions, from /proc/PID/maps while it runs.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.request
from pathlib import Path

import yaml

from tether.testing.backend import BackendServer
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, free_port, http_get, wait_for

# Runs `tether proxy` as the console script does and writes the loaded modules when it exits.
_WRAPPER = """
import atexit, sys
def _dump():
    with open(sys.argv[1], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(_dump)
from tether.cli.main import main
raise SystemExit(main(sys.argv[2:]))
"""

# Never loaded by a plain proxy, whatever it is configured with.
_NEVER = ("hashlib", "_hashlib", "secrets", "tempfile", "shutil", "bz2", "lzma", "importlib.resources",
          "platform", "click", "pydantic", "tether.proxy.identity", "tether.proxy.tap_wire",
          # the control plane's gRPC client and the HTTP/2 codec: no --policy-addrs, no HTTP/2 served
          "tether.proxy.inbound.policy_watch", "tether.proxy.grpc_client", "tether.proxy.http.h2client",
          "tether.proxy.http.h2server", "tether.proxy.http.h2conn", "tether.core.http.h2proto")
# Not loaded to serve a plain request: pathlib (with fnmatch and ntpath; tether's own paths use
# os.path) and urllib.parse (with ipaddress before it; only a route matching query parameters and a
# percent-encoded grpc-message need it). ~0.3 MiB of every proxy (docs/notes/issue-16-idlemem3.md).
_NOT_FOR_A_REQUEST = ("pathlib", "fnmatch", "ntpath", "urllib.parse")
_EXTENSIONS = ("_hashlib", "_bz2", "_lzma")  # C extensions among them: visible in the memory map


def _run_proxy(tmp: Path, flags: list[str], request: tuple[str, str] | None = None,
               requests: int = 1) -> tuple[set[str], str]:
    """Start a proxy, optionally send ``requests`` requests through it, stop it; (modules, memory map)."""
    out = tmp / "modules.txt"
    admin, outbound = free_port(), free_port()
    proc = Proc([sys.executable, "-c", _WRAPPER, str(out), "proxy", "--admin-addr", f"127.0.0.1:{admin}",
                 "--outbound-addr", f"127.0.0.1:{outbound}", "--inbound-addr", f"127.0.0.1:{free_port()}",
                 "--log-level", "warn", *flags], tmp / "proxy.log")
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200, 20, what="proxy /ready")
        if request is not None:
            authority, path = request
            req = urllib.request.Request(f"http://127.0.0.1:{outbound}{path}", headers={"Host": authority})
            no_env_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            for _ in range(requests):
                with no_env_proxy.open(req, timeout=10) as r:
                    assert r.status == 200 and r.read().startswith(b"hello from")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.log()
    finally:
        proc.stop()
    return set(out.read_text().split()), maps


def test_a_plain_proxy_that_served_a_request_loads_no_feature_it_was_not_asked_for(
        tmp_path: Path, backend: BackendServer) -> None:
    dst = tmp_path / "destinations.yaml"
    dst.write_text(yaml.safe_dump({"destinations": {"web.local:80": [f"127.0.0.1:{backend.server_address[1]}"]}}))
    modules, maps = _run_proxy(tmp_path, ["--destinations-file", str(dst)], ("web.local", "/"))
    assert "yaml" in modules  # the destinations file is YAML: loaded because it was asked for
    assert sorted(m for m in modules if m in _NEVER or m.startswith("importlib.resources.")) == []
    assert sorted(m for m in modules if m in _NOT_FOR_A_REQUEST) == []
    assert [e for e in _EXTENSIONS if f"/{e}." in maps] == []


def test_a_proxy_without_a_destinations_file_does_not_load_yaml(tmp_path: Path) -> None:
    modules, _ = _run_proxy(tmp_path, [])
    assert "yaml" not in modules
    assert sorted(m for m in modules if m in _NEVER) == []


def test_a_meshed_client_proxy_reads_certificate_dates_without_strptime(tmp_path: Path, backend: BackendServer) -> None:
    # A new mTLS connection per request: the first a full handshake, the next resumed, each resumed
    # one checking the peer certificate's notAfter. time.strptime would bring _strptime and calendar.
    mesh = LocalMesh(tmp_path / "mesh")
    try:
        mesh.create_ca()
        mesh.start_identity()
        web, client = mesh.workload("web"), mesh.workload("client")
        server = mesh.proxy(web, inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}")
        dst = tmp_path / "destinations.json"
        dst.write_text(json.dumps({"destinations": {"web.local:80": [{
            "addr": f"127.0.0.1:{backend.server_address[1]}", "proxy_port": server.inbound_port,
            "identity": web.identity}]}}))
        modules, _ = _run_proxy(tmp_path, [
            "--destinations-file", str(dst), "--pool-max-idle-per-endpoint", "0",
            "--identity-name", client.identity, "--identity-token-path", str(client.token_path),
            "--identity-trust-anchors", str(mesh.anchors), "--identity-addrs", mesh.identity_addrs[0]],
            ("web.local", "/"), requests=3)
        hs = [ln for ln in server.metrics().splitlines() if ln.startswith("tls_handshakes_total{")]
        assert any('resumed="true"' in ln and not ln.endswith(" 0") for ln in hs), hs  # resumed ones were checked
        assert sorted(m for m in modules if m in ("_strptime", "calendar")) == []
    finally:
        mesh.close()
