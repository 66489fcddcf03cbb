"""`tether identity create-ca | create-issuer | bundle`: the files they write and what they refuse."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest

from tether.cli.main import main
from tether.core.identity.certs import TrustBundle, load_issuer, parse_certificates, validate_issuer


def anchors(path: Path) -> list[str]:
    return [a.subject.rfc4514_string() for a in TrustBundle.from_pem(path.read_bytes()).anchors]


def test_create_ca_writes_a_usable_issuer_dir(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert main(["identity", "create-ca", "--out", str(d), "--trust-domain", "example.org"]) == 0
    assert {p.name for p in d.iterdir()} == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    for key in ("ca.key", "tls.key"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    creds = load_issuer((d / "tls.crt").read_bytes(), (d / "tls.key").read_bytes(), "tls.crt", "tls.key")
    validate_issuer(creds, TrustBundle.from_pem((d / "ca.crt").read_bytes()), dt.datetime.now(dt.UTC))
    assert creds.certificate.subject.rfc4514_string() == "CN=identity.linkerd.example.org"
    # Refuses to overwrite without --force.
    assert main(["identity", "create-ca", "--out", str(d)]) == 2


def test_bundle_merges_dedupes_and_removes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("old", "new"):
        assert main(["identity", "create-ca", "--out", str(tmp_path / name)]) == 0
    old, new, out = tmp_path / "old/ca.crt", tmp_path / "new/ca.crt", tmp_path / "bundle.pem"
    assert main(["identity", "bundle", str(old), str(new), str(old), "--out", str(out)]) == 0
    assert len(anchors(out)) == 2
    assert main(["identity", "bundle", str(out), "--remove", str(old), "--out", str(out)]) == 0
    assert TrustBundle.from_pem(out.read_bytes()).anchors == tuple(parse_certificates(new.read_bytes(), "new"))
    assert main(["identity", "bundle", str(old), "--remove", str(old)]) == 2
    assert "would be empty" in capsys.readouterr().err


def test_create_issuer_requires_the_anchor_in_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("old", "new"):
        assert main(["identity", "create-ca", "--out", str(tmp_path / name)]) == 0
    new = tmp_path / "new"
    args = ["identity", "create-issuer", "--anchor-cert", str(new / "ca.crt"), "--anchor-key", str(new / "ca.key")]
    assert main([*args, "--trust-anchors", str(tmp_path / "old/ca.crt"), "--out", str(tmp_path / "i")]) == 2
    assert "is not in the bundle" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "i")]) == 0
    assert anchors(tmp_path / "i/ca.crt") == ["CN=root.linkerd.cluster.local"]
