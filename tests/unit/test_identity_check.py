"""`tether check` linkerd-identity: passes, warns within 60 days, fails (exit 1) when expired or unsigned."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tether.cli.check import IDENTITY, CheckContext, CheckOptions, run_checks
from tether.cli.main import main
from tether.core.identity.authority import create_anchor, create_issuer

PEM = serialization.Encoding.PEM
NOW = dt.datetime.now(dt.UTC)


def write(d: Path, issuer_start: dt.datetime, issuer_life: dt.timedelta, foreign: bool = False) -> Path:
    anchor, anchor_key = create_anchor("root.linkerd.cluster.local", NOW - dt.timedelta(days=400))
    signer, signer_key = create_anchor("someone-else", NOW) if foreign else (anchor, anchor_key)
    issuer, _ = create_issuer("identity.linkerd.cluster.local", signer, signer_key, issuer_start, issuer_life)
    (d / "ca.crt").write_bytes(anchor.public_bytes(PEM))
    (d / "tls.crt").write_bytes(issuer.public_bytes(PEM))
    return d


def run(d: Path) -> tuple[str, bool, int]:
    options = CheckOptions(state_dir=str(d), identity_issuer_dir=str(d))
    out = io.StringIO()
    _, ok = run_checks([IDENTITY], CheckContext(options, NOW), out)
    status = main(["check", "--category", "linkerd-identity", "--identity-issuer-dir", str(d)])
    return out.getvalue(), ok, status


def test_valid_certificates_pass(tmp_path: Path) -> None:
    out, ok, status = run(write(tmp_path, NOW, dt.timedelta(days=365)))
    assert ok and status == 0
    assert "\u221a issuer cert is issued by the trust anchor" in out
    assert "\u00d7" not in out and "\u203c" not in out


def test_issuer_expiring_within_60_days_warns_but_exits_zero(tmp_path: Path) -> None:
    out, ok, status = run(write(tmp_path, NOW, dt.timedelta(days=30)))
    assert ok and status == 0
    assert "\u203c issuer cert is valid for at least 60 days" in out
    assert "expires in 29 days" in out
    assert "l5d-identity-issuer-cert-not-expiring-soon" in out


def test_expired_issuer_is_an_error_and_exits_nonzero(tmp_path: Path) -> None:
    out, ok, status = run(write(tmp_path, NOW - dt.timedelta(days=40), dt.timedelta(days=30)))
    assert not ok and status == 1
    assert "\u00d7 issuer cert is within its validity period" in out
    assert "expired at" in out and "create-issuer" in out


def test_issuer_not_signed_by_anchor_is_an_error(tmp_path: Path) -> None:
    out, ok, status = run(write(tmp_path, NOW, dt.timedelta(days=365), foreign=True))
    assert not ok and status == 1
    assert "\u00d7 issuer cert is issued by the trust anchor" in out
    assert "is not signed by any trust anchor" in out


def test_missing_config_is_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", "--category", "linkerd-identity", "--state-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert status == 1
    assert "\u00d7 certificate config is valid" in out and "trust anchors" not in out.split("config is valid")[1]
