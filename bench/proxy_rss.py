"""Idle RSS of tether proxies, quickly: a plain one (no control plane) and a meshed pair (identity,
destination, outbound and inbound policy through a real identity service and destination controller),
after 20 requests through each, settled (3 s, then the median of six VmRSS samples 0.5 s apart).
Also whether protobuf's shared object is mapped in each. Compare builds by running it from each
worktree (its own .venv):

    .venv/bin/python bench/proxy_rss.py

A focused check (issue 16's memory figures); bench/mesh.py measures the mTLS pair under load.
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from tether.platform.local.workloads import WorkloadPort
from tether.testing.backend import start_in_thread
from tether.testing.mesh import LocalMesh, web_with_header_route
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

AUTHORITY = "web.default.svc.cluster.local:80"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settled(pid: int) -> float:
    time.sleep(3)
    samples = []
    for _ in range(6):
        samples.append(rss_kib(pid))
        time.sleep(0.5)
    return statistics.median(samples) / 1024


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="protolite-rss-"))
    mesh = LocalMesh(work)
    app = start_in_thread("web")
    try:
        mesh.create_ca()
        mesh.start_identity()
        web_inbound = free_port()
        web, client = mesh.workload("web"), mesh.workload("client")
        reg = mesh.registry
        reg.update(replace(reg.get("default", "web"), labels={"app": "web"}, addresses=("127.0.0.1",),
                           ports=(WorkloadPort(web_inbound),)))
        res = work / "resources"
        res.mkdir()
        (res / "web.yaml").write_text(web_with_header_route(web_inbound))
        port, admin = free_port(), free_port()
        ctl = Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", f"127.0.0.1:{port}",
                    "--admin-addr", f"127.0.0.1:{admin}", "--resources-dir", str(res), "--state-dir",
                    str(mesh.state)], work / "controller.log")
        mesh.procs.append(ctl)
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 60, what="controller")
        cp = f"127.0.0.1:{port}"
        plain = ProxyProc(work, name="plain", inbound_app_addr=f"127.0.0.1:{app.server_address[1]}",
                          log_level="warn").wait_ready(60)
        mesh.procs.append(plain)
        web_proxy = mesh.proxy(web, inbound_port=web_inbound, policy_addrs=cp,
                               inbound_app_addr=f"127.0.0.1:{app.server_address[1]}")
        client_proxy = mesh.proxy(client, destination_addrs=cp, policy_addrs=cp,
                                  destination_context='{"ns":"default"}')
        wait_for(lambda: http_get(client_proxy.outbound + "/headers", headers={"Host": AUTHORITY})[0] == 200, 60,
                 what="request through the pair")
        for _ in range(20):
            s, body = http_get(client_proxy.outbound + "/headers", headers={"Host": AUTHORITY})
            assert s == 200 and json.loads(body).get("x-route") == "web-headers", (s, body)
            assert http_get(plain.outbound + "/", headers={"Host": f"127.0.0.1:{app.server_address[1]}"})[0] == 200
        mods: dict[str, bool] = {}
        out = {"plain": settled(plain.pid), "meshed client (identity, destination, policy)": settled(client_proxy.pid),
               "meshed server (identity, inbound policy)": settled(web_proxy.pid)}
        for p in (plain, client_proxy, web_proxy):
            maps = Path(f"/proc/{p.pid}/maps").read_text()
            mods[p.name] = "_upb" in maps
        for k, v in out.items():
            print(f"{k}: {v:.1f} MiB")
        print("protobuf (upb) mapped:", mods)
    finally:
        mesh.close()
        app.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
