"""The main job's demo on a real local mesh: the demo app as meshed pods, HTTP and gRPC over mTLS,
golden metrics per workload, and a retry setting raising the front end's success rate."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tether.platform.local import network
from tether.testing import netns

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)


def test_the_demo_shows_golden_metrics_and_retries_raising_success(tmp_path: Path) -> None:
    from test_local_mesh import free_networks

    state = tmp_path / "state"
    pods, svcs = free_networks()
    bridge = f"td{uuid.uuid4().hex[:8]}"
    try:
        r = subprocess.run([sys.executable, "-m", "tether.demo", "run", "--state-dir", str(state), "--window", "5",
                            "--down", f"--up-flag=--bridge={bridge}", f"--up-flag=--pod-cidr={pods}",
                            f"--up-flag=--service-cidr={svcs}"], capture_output=True, text=True, timeout=300)
    finally:
        if (state / "mesh.json").exists():
            subprocess.run([sys.executable, "-m", "tether", "down", "--state-dir", str(state)], capture_output=True,
                           timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # One golden-metrics table per window, with every workload the traffic reaches, gRPC included.
    assert len(re.findall(r"^  greeter +100\.00% ", out, re.M)) == 2, out
    m = re.search(r"web's success rate: ([\d.]+)% -> ([\d.]+)%", out)
    assert m is not None, out
    before, after = float(m.group(1)), float(m.group(2))
    assert before < 95 and after > 99, out  # 20% of web requests fail without retries (GET / -> books)
    assert "stop it all" not in out and "tether down: stopped 5 pods" in out
    assert not network.link_exists(bridge)
