"""The help text of every command, against goldens under tests/unit/golden/help/, so that a change to
what users read is reviewed in the diff. Refresh with ``TETHER_UPDATE_GOLDEN=1 pytest tests/unit/test_cli_help.py``."""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import pytest
from cli_tree import command_paths, ids

from tether.cli.main import main
from tether.cli.proxy_cmd import FLAGS, HIDDEN
from tether.proxy.config import ProxyConfig

GOLDEN = Path(__file__).parent / "golden" / "help"
UPDATE = os.environ.get("TETHER_UPDATE_GOLDEN") == "1"
PATHS = command_paths()


def golden_path(path: tuple[str, ...]) -> Path:
    return GOLDEN / ("_".join(("tether", *path)) + ".txt")


def help_text(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*path, "--help"]) == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Help must not depend on the caller's environment or terminal.
    for var in ("COLUMNS", "TETHER_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("path", PATHS, ids=ids(PATHS))
def test_help_matches_golden(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(path, capsys)
    golden = golden_path(path)
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        return
    assert golden.exists(), f"no golden {golden}: run with TETHER_UPDATE_GOLDEN=1 and review it"
    expected = golden.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(golden), "now"))
        pytest.fail(f"help of tether {' '.join(path)} changed (TETHER_UPDATE_GOLDEN=1 to accept):\n{diff}")


def test_no_golden_without_a_command() -> None:
    expected = {golden_path(p).name for p in PATHS}
    stale = sorted(p.name for p in GOLDEN.glob("*.txt") if p.name not in expected)
    assert not stale, f"goldens for commands that no longer exist: {stale}"


def test_every_proxy_setting_has_help_and_a_unit() -> None:
    fields = {f.name for f in dataclasses.fields(ProxyConfig)} - HIDDEN
    missing = sorted(fields - set(FLAGS))
    assert not missing, f"ProxyConfig fields without an entry in tether.cli.proxy_cmd.FLAGS: {missing}"
    assert not set(FLAGS) - fields, "FLAGS names fields ProxyConfig does not have"
    for name, flag in FLAGS.items():
        assert flag.help and flag.metavar and flag.metavar != "VALUE", name


def test_proxy_help_shows_units_and_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(("proxy",), capsys)
    joined = " ".join(text.split())  # click wraps long lines
    assert "VALUE" not in text and "None" not in text
    assert "--detect-timeout DURATION" in joined
    assert "[env var: TETHER_PROXY_DETECT_TIMEOUT; default: 10s]" in joined
    assert "[env var: TETHER_PROXY_MAX_HEADER_BYTES; default: 64Ki]" in joined
    assert "[env var: TETHER_PROXY_EWMA_DEFAULT_RTT; default: 30ms]" in joined
    assert "[env var: TETHER_PROXY_INBOUND_ADDR; default: 0.0.0.0:4143]" in joined
    assert joined.count("default:") == len([f for f in FLAGS if getattr(ProxyConfig(), f) is not None])


def test_help_is_for_operators_not_developers(capsys: pytest.CaptureFixture[str]) -> None:
    for path in (("check",), ("identity",), ("proxy-init",)):
        text = help_text(path, capsys)
        for internal in ("Checker", "register_category", "CheckFailed", "identity_json", "IdentityClient", "``"):
            assert internal not in text, (path, internal)


# -- `tether proxy` starts without click -----------------------------------------------------------

SAMPLES = {
    "DURATION": "250ms", "SIZE": "32Ki", "HOST:PORT": "127.0.0.1:5000", "PORTS": "25,4000-4001", "COUNT": "3",
    "FRACTION": "0.25", "BOOL": "false", "SPEC": "info,tether=debug", "FORMAT": "json", "PATH": "/tmp/x",
    "NAME": "web.default.serviceaccount.identity.linkerd.cluster.local", "HOST:PORT,...": "127.0.0.1:1,127.0.0.1:2",
    "NAME,...": "tap.linkerd-viz.serviceaccount.identity.linkerd.cluster.local", "PROTO": "http",
    "K=V,...": "k8s.pod.name=web-0", "JSON": '{"ns":"web","pod":"web-0"}', "POLICY": "cluster-authenticated",
    "CIDR,...": "10.0.0.0/8,fd00::/8",
}


def test_the_fast_path_reads_every_flag_as_click_does() -> None:
    from tether.cli.proxy_cmd import command, config_from_flags, parse_fast

    argv: list[str] = []
    for i, (name, flag) in enumerate(FLAGS.items()):
        value = SAMPLES[flag.metavar]
        argv += [f"--{name.replace('_', '-')}={value}"] if i % 2 else [f"--{name.replace('_', '-')}", value]
    fast = parse_fast(argv)
    assert fast is not None and set(fast) == set(FLAGS)
    ctx = command().make_context("proxy", list(argv))
    assert config_from_flags(fast) == config_from_flags(ctx.params)


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["--nope", "1"], ["--detect-timeout", "10x"], ["--idle-timeout"],
                                  ["--log-level", "loud"], ["--log-format", "xml"], ["--", "x"], ["extra"]])
def test_the_fast_path_leaves_help_and_errors_to_click(argv: list[str]) -> None:
    from tether.cli.proxy_cmd import parse_fast

    assert parse_fast(argv) is None


def test_a_proxy_command_line_does_not_import_click() -> None:
    import subprocess
    import sys

    code = ("import sys; from tether.cli import main, proxy_cmd; "
            "assert proxy_cmd.parse_fast(['--admin-addr', '127.0.0.1:0', '--log-level', 'info']) is not None; "
            "import tether.proxy.app; print('click' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_command_list_is_each_commands_own_short_help() -> None:
    import click

    from tether.cli.tree import COMMANDS, cli

    ctx = click.Context(cli, info_name="tether")
    for name, entry in COMMANDS.items():
        cmd = cli.get_command(ctx, name)
        assert cmd is not None and cmd.get_short_help_str(limit=200) == entry.help, name


def test_top_level_help_imports_no_command_module() -> None:
    import subprocess
    import sys

    code = ("import sys; from tether.cli.main import main; main(['--help']); "
            "print(sorted(m for m in sys.modules if m.endswith('_cmd') or m == 'tether.cli.check'), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "[]", r.stderr
