"""The traps a new user found in the CLI, each fixed: every test here failed before (issue 9)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tether.cli.main import main
from tether.core.identity.authority import create_anchor
from tether.core.identity.certs import TrustBundle, chain_to_anchor, parse_certificates
from tether.core.identity.names import DEFAULT_CONTROL_PLANE_NS, DEFAULT_TRUST_DOMAIN
from tether.proxy.config import ProxyConfig


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def two_cas(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["identity", "create-ca", "--out", str(d)]) == 0
    return a, b


# -- identity create-issuer ------------------------------------------------------------------------


def test_create_issuer_refuses_a_key_that_is_not_the_anchors(
    two_cas: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_cas
    out = tmp_path / "issuer"
    capsys.readouterr()
    code, _, err = run(capsys, "identity", "create-issuer", "--anchor-cert", str(a / "ca.crt"),
                       "--anchor-key", str(b / "ca.key"), "--out", str(out))
    assert code == 2
    assert "--anchor-key" in err and "is not the key of --anchor-cert" in err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"


def test_create_issuer_output_verifies_against_the_anchor(
    two_cas: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = two_cas
    out = tmp_path / "issuer"
    code, _, _ = run(capsys, "identity", "create-issuer", "--anchor-cert", str(a / "ca.crt"),
                     "--anchor-key", str(a / "ca.key"), "--out", str(out))
    assert code == 0
    issuer = parse_certificates((out / "tls.crt").read_bytes(), "tls.crt")[0]
    chain_to_anchor(issuer, (), TrustBundle.from_pem((out / "ca.crt").read_bytes()), dt.datetime.now(dt.UTC), "issuer")
    r = subprocess.run(["openssl", "verify", "-CAfile", str(a / "ca.crt"), str(out / "tls.crt")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_issuer_refuses_to_outlive_the_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = dt.datetime.now(dt.UTC)
    anchor, key = create_anchor("root.linkerd.cluster.local", now, dt.timedelta(days=30))
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.crt").write_bytes(anchor.public_bytes(pem))
    (tmp_path / "ca.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    args = ["identity", "create-issuer", "--anchor-cert", str(tmp_path / "ca.crt"), "--anchor-key",
            str(tmp_path / "ca.key"), "--out", str(tmp_path / "i")]
    code, _, err = run(capsys, *args)  # default lifetime: a year
    assert code == 2 and "--lifetime" in err and "after the anchor" in err
    code, _, _ = run(capsys, *args, "--lifetime", "480h")
    assert code == 0


def test_create_ca_refuses_an_issuer_longer_than_the_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "identity", "create-ca", "--out", str(tmp_path / "ca"), "--anchor-lifetime", "24h",
                       "--issuer-lifetime", "48h")
    assert code == 2 and "--issuer-lifetime" in err


# -- one default control plane ---------------------------------------------------------------------


def test_every_command_defaults_to_the_same_control_plane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["identity", "create-ca", "--out", str(tmp_path / "ca")]) == 0
    issuer = parse_certificates((tmp_path / "ca/tls.crt").read_bytes(), "tls.crt")[0]
    assert issuer.subject.rfc4514_string() == f"CN=identity.{DEFAULT_CONTROL_PLANE_NS}.{DEFAULT_TRUST_DOMAIN}"
    capsys.readouterr()
    for path in (("identity", "create-ca"), ("identity", "create-issuer"), ("controller", "identity"),
                 ("workload", "register"), ("workload", "list")):
        assert main([*path, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"default: {DEFAULT_CONTROL_PLANE_NS}]" in text, path
        assert f"default: {DEFAULT_TRUST_DOMAIN}]" in text, path


def test_the_local_mesh_uses_the_same_defaults(tmp_path: Path) -> None:
    from tether.testing.mesh import LocalMesh

    mesh = LocalMesh(tmp_path)
    assert mesh.identity_name("web", "default") == (
        f"web.default.serviceaccount.identity.{DEFAULT_CONTROL_PLANE_NS}.{DEFAULT_TRUST_DOMAIN}")


# -- check -----------------------------------------------------------------------------------------


def test_check_unknown_category_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--category", "linkerd-identiy")
    assert code == 2 and out == ""
    assert "--category" in err and "linkerd-identiy" in err and "linkerd-identity" in err
    assert len(err.strip().splitlines()) == 1


def test_check_pre_says_it_checks_nothing_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check", "--pre", "--state-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert "the local platform has no pre-installation checks" in err and "--platform kubernetes" in err
    assert "nothing was checked" in err


def test_check_proxy_runs_the_data_plane_categories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain_code, plain, _ = run(capsys, "check", "--state-dir", str(tmp_path), "-o", "json")
    proxy_code, proxy, _ = run(capsys, "check", "--proxy", "--category", "linkerd-data-plane", "--state-dir",
                               str(tmp_path), "-o", "json")
    assert plain_code == proxy_code == 1
    plain_doc, proxy_doc = json.loads(plain), json.loads(proxy)
    assert [c["categoryName"] for c in plain_doc["categories"]] == ["linkerd-existence"]  # fatal: nothing runs
    assert [c["categoryName"] for c in proxy_doc["categories"]] == ["linkerd-data-plane"]
    check = proxy_doc["categories"][0]["checks"][0]
    assert check["result"] == "error" and "has a proxyAdmin address" in check["error"]
    assert proxy_doc["success"] is False


# -- proxy-init ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [
    ("--proxy-uid", "-1"),
    ("--incoming-proxy-port", "99999"),
    ("--outgoing-proxy-port", "0"),
    ("--subnets-to-ignore", "10.0.0.0/33"),
    ("--inbound-ports-to-ignore", "4190,70000"),
    ("--outbound-ports-to-ignore", "x"),
])
def test_proxy_init_refuses_values_iptables_would_reject(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "proxy-init", "--dry-run", flag, value)
    assert code == 2 and out == ""
    assert f"'{flag}'" in err and len(err.strip().splitlines()) == 1


def test_proxy_init_dry_run_prints_the_binary_of_the_mode(capsys: pytest.CaptureFixture[str]) -> None:
    for mode, binary in (("nft", "iptables-nft"), ("legacy", "iptables-legacy"), ("auto", "iptables")):
        code, out, _ = run(capsys, "proxy-init", "--dry-run", "--iptables-mode", mode)
        assert code == 0
        assert {line.split()[0] for line in out.splitlines()} == {binary}


# -- demo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [("--rps", "0"), ("--connections", "0"), ("--duration", "0")])
def test_demo_refuses_values_that_crashed_it(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "demo", flag, value)
    assert code == 2 and f"'{flag}'" in err


def test_demo_refuses_a_used_workdir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.log").write_text("x")
    code, _, err = run(capsys, "demo", "--workdir", str(tmp_path))
    assert code == 2 and "--workdir" in err and "not an empty directory" in err


def test_demo_formats_nothing_measured_as_a_dash() -> None:
    from tether.cli.demo_cmd import _num

    assert _num(float("nan"), 8, "%").strip() == "-"
    assert _num(99.5, 8, "%").strip() == "99.50%"


# -- proxy settings: durations, sizes, env.json ----------------------------------------------------


def test_env_json_has_no_python_reprs() -> None:
    env = ProxyConfig().env_dict()
    assert "None" not in env.values() and "False" not in env.values() and "True" not in env.values()
    assert "TETHER_PROXY_IDENTITY_NAME" not in env  # unset settings are left out
    assert env["TETHER_PROXY_DETECT_TIMEOUT"] == "10s"
    assert env["TETHER_PROXY_EWMA_DEFAULT_RTT"] == "30ms"
    assert env["TETHER_PROXY_MAX_HEADER_BYTES"] == "64Ki"
    assert env["TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN"] == "false"
    assert env["TETHER_PROXY_FAILURE_ACCRUAL_JITTER"] == "0.5"


def test_env_json_reads_back_to_the_same_config() -> None:
    cfg = ProxyConfig()
    for name, text in (("response_timeout", "1500ms"), ("body_buffer_high", "1Mi"), ("idle_timeout", "2m"),
                       ("identity_name", "web.default.serviceaccount.identity.linkerd.cluster.local"),
                       ("admin_addr", "[::1]:4191")):
        cfg.set(name, text, name)
    again = ProxyConfig.from_env(cfg.env_dict())
    assert again == cfg


@pytest.mark.parametrize(("flag", "value", "field", "expected"), [
    ("--max-header-bytes", "32Ki", "max_header_bytes", 32768),
    ("--body-buffer-high", "1Mi", "body_buffer_high", 1 << 20),
    ("--detect-timeout", "500ms", "detect_timeout", 0.5),
    ("--idle-timeout", "2m", "idle_timeout", 120.0),
])
def test_proxy_flags_read_units(flag: str, value: str, field: str, expected: object) -> None:
    from tether.cli.proxy_cmd import config_from_flags

    assert getattr(config_from_flags({field: value}), field) == expected


def test_check_names_a_stale_control_plane_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tether.platform.local.controlplane import ControlPlaneRecord, write_record
    from tether.testing.procs import free_port

    port = free_port()  # nothing listens there: the process that wrote the record is gone
    write_record(tmp_path, ControlPlaneRecord("identity", 999999, "0.1.0", f"127.0.0.1:{free_port()}",
                                              f"127.0.0.1:{port}", "linkerd", "cluster.local"))
    code, out, _ = run(capsys, "check", "--state-dir", str(tmp_path), "--timeout", "1s")
    assert code == 1
    assert "\u00d7 control plane processes are running" in out
    assert "no identity service replica answers" in out and "identity-999999.json" in out
    assert "Server version: unavailable (identity service not reachable" in run(
        capsys, "version", "--state-dir", str(tmp_path), "--timeout", "1s")[1]


def test_a_bad_proxy_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TETHER_PROXY_DETECT_TIMEOUT", "10x")
    code, out, err = run(capsys, "proxy", "--admin-addr", "127.0.0.1:0")  # the fast path: nothing is bound
    assert code == 2 and out == ""
    assert err.startswith("tether proxy: TETHER_PROXY_DETECT_TIMEOUT: '10x' is not a duration")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flag", "value", "minimum"), [
    ("--identity-tls-session-cache-entries", "0", "1"),
    ("--identity-tls-verified-chain-cache-entries", "-1", "0"),
])
def test_a_count_below_its_floor_is_refused_naming_the_flag(
    flag: str, value: str, minimum: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "proxy", flag, value)
    assert code == 2 and out == ""
    assert f"'{flag}': '{value}' is below the minimum, {minimum}" in err
    assert len(err.strip().splitlines()) == 1
