"""The meshed two-hop path side by side: direct, nginx (one hop), and client -> outbound tether proxy
-> inbound tether proxy -> server, in plaintext and over mTLS, in front of a fortio echo server.

Run by hand: .venv/bin/python bench/mesh.py   (bench/README.md says what each figure means)

For the two-hop targets the CPU and RSS columns are the two proxies together (both run under one
parent process); the identity service is not counted.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import harness as h
import http1
import yaml

from tether.testing.mesh import LocalMesh

TARGETS = ("direct", "nginx", "tether-2hop-plain", "tether-2hop-mtls")
_meshes: list[LocalMesh] = []


def _proxy_args(port: int, admin: int, inbound: int, extra: list[str]) -> list[str]:
    return [str(h.TETHER), "proxy", "--outbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
            "--inbound-addr", f"127.0.0.1:{inbound}", "--log-level", "warn", *extra]


def start_two_hop(workdir: Path, port: int, backend_port: int, mtls: bool) -> h.Proc:
    in_port, in_admin, out_inbound, out_admin = (h.free_port() for _ in range(4))
    out_extra: list[str] = []
    in_extra = ["--inbound-app-addr", f"127.0.0.1:{backend_port}"]
    endpoint: dict[str, object] = {"addr": f"127.0.0.1:{backend_port}", "proxy_port": in_port}
    if mtls:
        mesh = LocalMesh(workdir / "mesh")
        mesh.work.mkdir(parents=True, exist_ok=True)
        _meshes.append(mesh)
        mesh.create_ca()
        mesh.start_identity()
        for w, extra in ((mesh.workload("server"), in_extra), (mesh.workload("client"), out_extra)):
            extra += ["--identity-name", w.identity, "--identity-token-path", str(w.token_path),
                      "--identity-trust-anchors", str(mesh.anchors), "--identity-addrs", mesh.identity_addrs[0]]
            if w.name == "server":
                endpoint["identity"] = w.identity
    dst = workdir / "mesh-destinations.yaml"
    dst.write_text(yaml.safe_dump({"destinations": {http1.AUTHORITY: [endpoint]}}))
    out_extra += ["--destinations-file", str(dst)]
    inbound = _proxy_args(h.free_port(), in_admin, in_port, in_extra)
    outbound = _proxy_args(port, out_admin, out_inbound, out_extra)
    # One parent for both proxies: the harness reads CPU and RSS over its process tree.
    script = f"{shlex.join(inbound)} & {shlex.join(outbound)} & wait"
    proc = h.start("two-hop", ["sh", "-c", script], workdir)
    h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{in_admin}/ready"), 30, "inbound proxy /ready")
    return h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{out_admin}/ready"), 30, "outbound proxy /ready")


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    if name in ("direct", "nginx"):
        return http1.start_target(name, workdir, fortio, backend_port, workers)
    reason = h.tether_unavailable_reason()
    if reason is not None:
        raise h.Skip(reason)
    port = h.free_port()
    proc = start_two_hop(workdir, port, backend_port, mtls=name.endswith("mtls"))
    target = ["-H", f"Host: {http1.AUTHORITY}", f"http://127.0.0.1:{port}{http1.PATH}"]

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        return h.fortio_load(fortio, target, qps, connections, seconds, workdir, ok_codes=("200",))

    def hold(n: int) -> contextlib.AbstractContextManager[int]:
        return http1.hold_http1(port, n)

    return h.Target(name, proc, load, hold)


SUITE = h.Suite(
    kind="mesh",
    script="bench/mesh.py",
    title=f"meshed two-hop HTTP/1.1 GET {http1.PATH}",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=http1.start_backend,
    start_target=start_target,
)

if __name__ == "__main__":
    try:
        sys.exit(h.main(SUITE))
    finally:
        for m in _meshes:
            m.close()
