"""`tether workload register|list|remove`, `tether version` and `tether completion`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether import __version__
from tether.cli.main import main
from tether.platform.local.workloads import WorkloadRegistry


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_register_writes_a_token_the_registry_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path)
    code, out, _ = run(capsys, "workload", "register", "web", "-n", "shop", "--service-account", "web-sa",
                       "--port", "8080:http", "--label", "app=web", "--address", "10.0.0.5",
                       "--proxy-admin", "127.0.0.1:4191", "--state-dir", state, "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["identity"] == "web-sa.shop.serviceaccount.identity.linkerd.cluster.local"
    token_path = Path(doc["tokenPath"])
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    reg = WorkloadRegistry(state)
    w = reg.validate_token(token_path.read_text())
    assert (w.key, w.proxy_admin, dict(w.labels)) == ("shop/web", "127.0.0.1:4191", {"app": "web"})


def test_registering_again_keeps_the_token_unless_rotated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path)
    assert run(capsys, "workload", "register", "web", "--state-dir", state)[0] == 0
    token = WorkloadRegistry(state).read_token("default", "web")
    code, out, _ = run(capsys, "workload", "register", "web", "--proxy-admin", "127.0.0.1:5000", "--state-dir", state)
    assert code == 0 and "token unchanged" in out
    reg = WorkloadRegistry(state)
    assert reg.validate_token(token).proxy_admin == "127.0.0.1:5000"
    assert run(capsys, "workload", "register", "web", "--rotate-token", "--state-dir", state)[0] == 0
    assert reg.read_token("default", "web") != token


def test_list_table_wide_json_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path)
    for name, ns in (("web", "shop"), ("db", "shop"), ("client", "default")):
        assert run(capsys, "workload", "register", name, "-n", ns, "--state-dir", state)[0] == 0
    code, out, _ = run(capsys, "workload", "list", "--state-dir", state)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "SERVICE", "ACCOUNT", "PROXY", "ADMIN"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["default", "client"], ["shop", "db"], ["shop", "web"]]
    wide = run(capsys, "workload", "list", "-o", "wide", "--state-dir", state)[1]
    assert "IDENTITY" in wide.splitlines()[0] and "web.shop.serviceaccount.identity.linkerd.cluster.local" in wide
    items = json.loads(run(capsys, "workload", "list", "-n", "shop", "-o", "json", "--state-dir", state)[1])["items"]
    assert [i["name"] for i in items] == ["db", "web"]
    assert list(items[0]) == ["namespace", "name", "serviceAccount", "addresses", "ports", "labels", "proxyAdmin",
                              "identity"]
    assert yaml.safe_load(run(capsys, "workload", "list", "-o", "yaml", "--state-dir", state)[1])["items"][0][
        "name"] == "client"


def test_list_of_nothing_says_so_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "workload", "list", "--state-dir", str(tmp_path))
    assert code == 0 and out == "" and "No workloads registered" in err


def test_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path)
    assert run(capsys, "workload", "register", "web", "--state-dir", state)[0] == 0
    token = WorkloadRegistry(state).read_token("default", "web")
    assert run(capsys, "workload", "remove", "web", "--state-dir", state)[0] == 0
    with pytest.raises(Exception, match="not registered"):
        WorkloadRegistry(state).validate_token(token)
    code, _, err = run(capsys, "workload", "remove", "web", "--state-dir", state)
    assert code == 1 and "no workload default/web" in err


@pytest.mark.parametrize(("args", "flag"), [
    (["--port", "99999"], "--port"), (["--label", "novalue"], "--label"), (["--address", "10.0.0"], "--address"),
    (["--proxy-admin", "localhost"], "--proxy-admin"),
])
def test_register_bad_values(args: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "workload", "register", "web", *args, "--state-dir", str(tmp_path))
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1


def test_identity_of_a_workload_without_proxy_admin_says_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "workload", "register", "web", "--state-dir", str(tmp_path))[0] == 0
    code, _, err = run(capsys, "identity", "web", "--state-dir", str(tmp_path))
    assert code == 1 and "--proxy-admin" in err


# -- version ---------------------------------------------------------------------------------------


def test_version_says_plainly_what_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "version", "--proxy", "--state-dir", str(tmp_path))
    assert code == 0
    assert out.splitlines()[0] == f"Client version: {__version__}"
    assert "Server version: unavailable (no control plane recorded in" in out
    assert "Proxy versions: unavailable (no workload" in out
    doc = json.loads(run(capsys, "version", "--state-dir", str(tmp_path), "-o", "json")[1])
    assert doc["client"] == {"version": __version__} and doc["server"]["version"] is None
    assert run(capsys, "version", "--client")[1] == f"Client version: {__version__}\n"
    assert run(capsys, "--version")[1] == f"tether version {__version__}\n"


# -- completion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0 and "_TETHER_COMPLETE" in out


def test_bash_accepts_the_script_and_completes_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "tether.bash"
    script.write_text(run(capsys, "completion", "bash")[1])
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    tether = str(Path(sys.executable).parent / "tether")

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_TETHER_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        r = subprocess.run([tether], capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, r.stderr
        return [line.split(",", 1)[1] for line in r.stdout.splitlines()]

    assert complete("tether ide") == ["identity"]
    assert set(complete("tether workload ")) == {"list", "register", "remove"}
    assert "--detect-timeout" in complete("tether proxy --detect")
    # The whole round trip in bash: source the script, call its completion function.
    bash = (f"source {script}; COMP_WORDS=(tether identity cr); COMP_CWORD=2; "
            "_tether_completion tether cr identity; printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": f"{Path(tether).parent}:{os.environ['PATH']}"})
    assert r.stdout.split() == ["create-ca", "create-issuer"], r.stderr
