"""Figures of the local mesh: `tether up` to a ready control plane, `tether run` to a ready pod,
control-plane memory idle and with N pods. Needs root; makes its own bridge and networks, and runs
`tether down` at the end (also on failure).

    sudo .venv/bin/python bench/local_mesh.py --pods 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))


def tether(state: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TETHER_STATE_DIR": str(state)})
    if r.returncode != 0:
        raise SystemExit(f"tether {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def control_plane_rss(status: dict[str, Any]) -> dict[str, float]:
    out = {c["name"]: rss_mib(c["pid"]) for c in status["components"] if c.get("pid")}
    out["supervisor"] = rss_mib(status["supervisorPid"])
    return out


def main() -> None:
    from test_local_mesh import free_networks

    p = argparse.ArgumentParser()
    p.add_argument("--pods", type=int, default=100)
    p.add_argument("--ha", action="store_true")
    args = p.parse_args()
    state = Path(tempfile.mkdtemp(prefix="tether-bench-")) / "state"
    pods_net, svc_net = free_networks()
    bridge = f"tb{uuid.uuid4().hex[:8]}"
    try:
        t0 = time.monotonic()
        tether(state, "up", "--bridge", bridge, "--pod-cidr", pods_net, "--service-cidr", svc_net,
               *(["--ha"] if args.ha else []))
        up_s = time.monotonic() - t0
        time.sleep(3)
        idle = control_plane_rss(json.loads(tether(state, "status", "-o", "json")))
        t0 = time.monotonic()
        tether(state, "run", "one", "--port", "8080", "--", "sleep", "36000")
        run_s = time.monotonic() - t0
        t0 = time.monotonic()
        tether(state, "run", "many", "--port", "8080", "--replicas", str(args.pods), "--timeout", "900s",
               "--", "sleep", "36000")
        many_s = time.monotonic() - t0
        time.sleep(5)
        status = json.loads(tether(state, "status", "-o", "json"))
        loaded = control_plane_rss(status)
        proxies = [rss_mib(p["proxyPid"]) for p in status["pods"] if p.get("proxyPid")]
        print(json.dumps({
            "pods": args.pods + 1, "ha": args.ha,
            "upToReadySeconds": round(up_s, 2), "runOnePodToReadySeconds": round(run_s, 2),
            f"run{args.pods}PodsToReadySeconds": round(many_s, 2),
            "controlPlaneRssMiBIdle": {k: round(v, 1) for k, v in idle.items()},
            "controlPlaneRssMiBWithPods": {k: round(v, 1) for k, v in loaded.items()},
            "proxyRssMiBMedian": round(sorted(proxies)[len(proxies) // 2], 1) if proxies else None,
        }, indent=2))
    finally:
        subprocess.run([sys.executable, "-m", "tether", "down", "--state-dir", str(state)], capture_output=True,
                       timeout=600)


if __name__ == "__main__":
    main()
