"""The Grafana dashboards: shipped files equal what tether.viz.grafana builds; `viz dashboards -o DIR`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tether.viz import grafana


def test_shipped_dashboards_are_the_generated_ones() -> None:
    # If this fails after a change to tether/viz/grafana.py: python -m tether.viz.grafana
    assert grafana.shipped() == grafana.render()


def test_dashboards_are_written_and_each_panel_has_a_query(tmp_path: Path) -> None:
    out = tmp_path / "boards"
    r = subprocess.run([sys.executable, "-m", "tether", "viz", "dashboards", "-o", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no multicluster dashboard" in r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["top-line.json", "namespace.json", "deployment.json", "pod.json", "route.json",
                            "tcp.json", "authorization.json"])
    for name in names:
        doc = json.loads((out / name).read_text())
        assert doc["uid"].startswith("tether-") and doc["panels"]
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids))
        for p in doc["panels"]:
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), (name, p["title"])


def test_an_unwritable_directory_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    r = subprocess.run([sys.executable, "-m", "tether", "viz", "dashboards", "-o", str(f / "x")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--output-dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
