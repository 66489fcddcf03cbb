"""`tether authz`: the authorizations of each port of a workload, from the local store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tether.cli.tree import cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "authz" / "web.yaml"


def run(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    res = tmp_path / "res"
    if not res.exists():
        res.mkdir()
        shutil.copy(FIXTURE, res / "web.yaml")
    # Through the command tree, as `tether authz` runs (its context settings, e.g. -h, come from there).
    r = CliRunner().invoke(cli, ["authz", *args, "--resources-dir", str(res), "--state-dir", str(tmp_path / "state")])
    return r.exit_code, r.stdout, r.stderr


def test_table_lists_server_and_route_authorizations_per_port(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, "-n", "shop", "web-1")
    assert code == 0
    assert out.splitlines() == [
        "PORT   ROUTE             SERVER                        AUTHORIZATION",
        "8080   *                 server/web                    authorizationpolicy/server-from-nets",
        "8080   httproute/admin   server/web                    authorizationpolicy/admin-from-client",
        "9090   *                 default:all-unauthenticated   default:all-unauthenticated",
        "9090   default:probe     default:all-unauthenticated   default:probe",
    ]


def test_wide_and_json_say_networks_and_authentication(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, "-n", "shop", "po/web-1", "-o", "wide")
    assert code == 0 and "10.0.0.0/8 except 10.9.0.0/16" in out
    assert "mesh: client.shop.serviceaccount.identity.linkerd.cluster.local" in out
    code, out, _ = run(tmp_path, "-n", "shop", "web-1", "-o", "json", "--port", "9090", "--default-policy", "deny")
    assert code == 0
    assert json.loads(out)["items"] == [
        {"port": 9090, "protocol": "detect", "route": "*", "server": "default:deny",
         "authorization": "(none: denied)", "networks": "", "authentication": ""},
        {"port": 9090, "protocol": "detect", "route": "default:probe", "server": "default:deny",
         "authorization": "default:probe", "networks": "0.0.0.0/0,::/0", "authentication": "unauthenticated"}]


def test_probe_route_shows_on_a_port_without_routes(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, "-n", "shop", "web-1", "--port", "8080", "--port", "9090", "-o", "json")
    assert code == 0
    items = json.loads(out)["items"]
    # 8080 has its own routes: Linkerd adds no probe route there; 9090 gets one from every network.
    assert [(i["port"], i["networks"]) for i in items if i["route"] == "default:probe"] == [(9090, "0.0.0.0/0,::/0")]


def test_unknown_workload_is_a_one_line_error(tmp_path: Path) -> None:
    run(tmp_path, "-n", "shop", "web-1")
    r = subprocess.run([sys.executable, "-m", "tether", "authz", "-n", "shop", "ghost", "--resources-dir",
                        str(tmp_path / "res"), "--state-dir", str(tmp_path / "state")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == (f"tether authz: WORKLOAD 'ghost': no workload shop/ghost in {tmp_path / 'res'} "
                        f"or {tmp_path / 'state'}\n")
