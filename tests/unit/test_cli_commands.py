"""Every command and subcommand, found by walking the command tree: --help, no arguments, bad
arguments. Errors are one line naming the flag (or file), exit 2 for usage and 1 for failures, and
never a traceback. A new command is covered without touching this file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from cli_tree import command_paths, ids, walk

from tether.cli.main import main

PATHS = command_paths()

# Commands that, run without arguments, would serve or change the host: their no-argument run is
# not made here (their --help and bad arguments are). Each entry says why.
NOT_RUN_BARE = {
    ("proxy",): "serves on 0.0.0.0:4143 until stopped",
    ("demo",): "runs a mesh of processes for 10s",
    ("proxy-init",): "installs iptables rules in this network namespace",
    ("controller", "destination"): "serves on 0.0.0.0:8086 until stopped",
    ("proxy-await",): "waits up to 2m for a proxy's /ready on 127.0.0.1:4191",
    ("controller", "injector"): "serves the admission webhooks on 0.0.0.0:8443 until stopped",
    ("up",): "creates a bridge and starts a control plane on this host until `tether down`",
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, path: tuple[str, ...]) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    # "tether identity show: ..." for `tether identity` (its default subcommand) is fine.
    where = lines[0].split(":", 1)[0]
    assert (where + " ").startswith(" ".join(("tether", *path)) + " "), lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TETHER_STATE_DIR", str(tmp_path / "state"))


def test_the_walk_finds_every_command_group() -> None:
    names = {p[0] for p in PATHS if p}
    assert {"proxy", "proxy-init", "identity", "controller", "check", "demo", "workload", "version",
            "completion", "apply", "delete", "get", "diagnostics"} <= names
    assert ("identity", "create-issuer") in PATHS and ("workload", "register") in PATHS
    assert ("controller", "destination") in PATHS and ("diagnostics", "endpoints") in PATHS
    assert set(NOT_RUN_BARE) <= set(PATHS), "NOT_RUN_BARE names a command that does not exist"


@pytest.mark.parametrize("path", PATHS, ids=ids(PATHS))
def test_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *path, "--help")
    assert code == 0 and err == ""
    assert out.startswith("Usage: " + " ".join(("tether", *path)))
    for opt in ("-h", "--help"):
        assert opt in out


BARE = [p for p in PATHS if p not in NOT_RUN_BARE]


@pytest.mark.parametrize("path", BARE, ids=ids(BARE))
def test_no_arguments(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *path)
    assert code in (0, 1, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 0:
        return
    _, cmd = next((p, c) for p, c in walk() if p == path)
    if isinstance(cmd, click.Group) and code == 2 and "Usage:" in err:
        return  # a group without its subcommand: the group's help, on stderr
    if code == 1 and out:
        return  # a report that failed (check): the report is the output
    one_line_error(err, path)


@pytest.mark.parametrize("path", PATHS, ids=ids(PATHS))
def test_unknown_flag_names_the_flag_and_the_subcommand(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *path, "--no-such-flag")
    assert code == 2 and out == ""
    line = one_line_error(err, path)
    assert "--no-such-flag" in line and "--help" in line


def _strict_options(cmd: click.Command) -> list[click.Option]:
    """Options whose type refuses the text "not-a-value" (so a run with it must fail before acting)."""
    out = []
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.is_flag or p.name in ("help", "version"):
            continue
        try:
            p.type.convert("not-a-value", p, None)
        except click.BadParameter:
            out.append(p)
    return out


BAD_VALUES = [(path, opt.opts[-1]) for path, cmd in walk() for opt in _strict_options(cmd)]


@pytest.mark.parametrize(("path", "flag"), BAD_VALUES, ids=[f"{' '.join(p)} {f}" for p, f in BAD_VALUES])
def test_a_bad_value_names_its_flag(path: tuple[str, ...], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *path, flag, "not-a-value")
    assert code == 2 and out == "", err
    line = one_line_error(err, path)
    assert flag in line and "not-a-value" in line


def test_bad_values_cover_the_proxy_flags() -> None:
    proxy_flags = {f for p, f in BAD_VALUES if p == ("proxy",)}
    assert {"--detect-timeout", "--max-header-bytes", "--inbound-addr", "--opaque-ports", "--tcp-zero-copy",
            "--log-level", "--log-format"} <= proxy_flags


def test_an_extra_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "version", "surplus")
    assert code == 2
    assert "surplus" in one_line_error(err, ("version",))


# -- the real console script, as a user runs it ----------------------------------------------------


def tether_bin() -> str:
    path = Path(sys.executable).parent / "tether"
    assert path.exists(), f"console script not installed next to {sys.executable}"
    return str(path)


SCRIPT_CASES = [
    (["--version"], 0, None),
    (["proxy", "--nope"], 2, "--nope"),
    (["proxy", "--detect-timeout", "10x"], 2, "--detect-timeout"),
    (["proxy-init", "--dry-run", "--subnets-to-ignore", "10.0.0.0/33"], 2, "--subnets-to-ignore"),
    (["proxy-init", "--dry-run", "--proxy-uid", "-1"], 2, "--proxy-uid"),
    (["demo", "--rps", "0"], 2, "--rps"),
    (["check", "--category", "linkerd-identiy"], 2, "--category"),
    (["identity", "create-issuer", "--anchor-cert", "/nonexistent/ca.crt", "--anchor-key", "k", "--out", "o"], 2,
     "/nonexistent/ca.crt"),
    (["controller", "identity", "--addr", "nohost"], 2, "--addr"),
    (["workload", "remove", "nobody"], 1, "default/nobody"),
    (["completion", "tcsh"], 2, "tcsh"),
    (["controller", "destination", "--cluster-networks", "10.0.0.0/33"], 2, "--cluster-networks"),
    (["controller", "destination", "--stream-queue-limit", "0"], 2, "--stream-queue-limit"),
    (["get", "sp", "-n", "prod", "-A"], 2, "-A/--all-namespaces"),
    (["get", "bogus"], 2, "unknown kind 'bogus'"),
    (["diagnostics", "policy", "deploy/x", "80"], 2, "want po/NAME (inbound) or svc/NAME (outbound)"),
    (["diagnostics", "policy", "po/x", "99999"], 2, "PORT"),
    (["run", "web", "--", "true"], 1, "no mesh here"),
    (["run", "web"], 2, "missing COMMAND"),
    (["up", "--service-cidr", "10.0.0.0/8", "--pod-cidr", "10.1.0.0/16"], 2, "overlaps --pod-cidr"),
    (["status"], 1, "no mesh here"),
]


@pytest.mark.parametrize(("args", "status", "named"), SCRIPT_CASES, ids=[" ".join(a) for a, _, _ in SCRIPT_CASES])
def test_console_script(args: list[str], status: int, named: str | None, tmp_path: Path) -> None:
    r = subprocess.run([tether_bin(), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={**os.environ, "TETHER_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    if named:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert named in r.stderr


def test_output_closed_early_is_quiet(tmp_path: Path) -> None:
    # `tether proxy-init --dry-run | head -1` used to end in BrokenPipeError. 5,000 ignored ports print
    # 5,000 rules, more than a pipe holds, so the writer is still writing when head exits.
    ports = ",".join(str(p) for p in range(1000, 6000))
    cmd = f"{tether_bin()} proxy-init --dry-run --outbound-ports-to-ignore {ports} | head -1; exit ${{PIPESTATUS[0]}}"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.stdout.startswith("iptables -t nat -N PROXY_INIT_REDIRECT")
    assert r.stderr == "" and r.returncode == 141


def test_proxy_init_sends_the_proxys_own_pod_traffic_inbound_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "proxy-init", "--dry-run")
    assert rc == 0
    output = [ln for ln in out.splitlines() if " PROXY_INIT_OUTPUT " in ln and "-A" in ln]
    # First in the chain, before the rule that lets the proxy's own connections out.
    assert "--uid-owner 2102 -o lo ! -d 127.0.0.1/32 -j PROXY_INIT_REDIRECT" in output[0], output
    assert "--uid-owner 2102 -j RETURN" in output[1], output
    rc, out, _ = run(capsys, "proxy-init", "--dry-run", "--no-redirect-self-calls")
    assert rc == 0 and "! -d 127.0.0.1/32" not in out
