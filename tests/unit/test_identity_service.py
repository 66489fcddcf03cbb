"""The identity service core against fakes, the rate limiter with a fake clock, the file issuer's
reload, and the local token store."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.control.identity.credentials import CredentialPaths, FileIssuer
from tether.control.identity.ratelimit import RateLimiter
from tether.control.identity.service import (
    IdentityService,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    TokenSubject,
    Unauthenticated,
    Unavailable,
)
from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import CertificateError
from tether.core.identity.csr import build_csr, generate_key
from tether.core.identity.issuance import IssuancePolicy
from tether.core.identity.names import WorkloadIdentity
from tether.platform.local.tokens import LocalTokenValidator, control_tokens_dir, ensure_control_token
from tether.platform.local.workloads import InvalidToken, Workload, WorkloadRegistry

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
WEB = WorkloadIdentity("web", "shop", "linkerd", "cluster.local")
DB = WorkloadIdentity("db", "shop", "linkerd", "cluster.local")
PEM = serialization.Encoding.PEM


def write_ca(d: Path, now: dt.datetime = NOW, issuer_lifetime: dt.timedelta = dt.timedelta(days=30)) -> None:
    anchor, anchor_key = create_anchor("root.linkerd.cluster.local", now)
    write_issuer(d, anchor, anchor_key, now, issuer_lifetime)
    (d / "ca.crt").write_bytes(anchor.public_bytes(PEM))
    (d / "ca.key").write_bytes(
        anchor_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def write_issuer(
    d: Path, anchor: x509.Certificate, anchor_key: object, now: dt.datetime, lifetime: dt.timedelta
) -> x509.Certificate:
    cert, key = create_issuer("identity.linkerd.cluster.local", anchor, anchor_key, now, lifetime)  # type: ignore[arg-type]
    (d / "tls.key").write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "tls.crt").write_bytes(cert.public_bytes(PEM))
    return cert


class FakeValidator:
    def __init__(self, tokens: dict[bytes, TokenSubject]) -> None:
        self.tokens = tokens

    async def validate(self, token: bytes) -> TokenSubject:
        if token not in self.tokens:
            raise Unauthenticated("invalid token: unknown")
        return self.tokens[token]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    write_ca(tmp_path)
    return tmp_path


def make_service(ca_dir: Path, rate: float = 100.0, burst: int = 100) -> IdentityService:
    issuer = FileIssuer(CredentialPaths.from_dir(ca_dir), IssuancePolicy(), lambda: NOW)
    validator = FakeValidator({b"web-token": TokenSubject("shop", "web", "local workload shop/web")})
    clock = [0.0]
    svc = IdentityService(
        validator, issuer, "cluster.local", "linkerd", RateLimiter(rate, burst, lambda: clock[0]), lambda: NOW
    )
    return svc


def certify(svc: IdentityService, identity: str, token: bytes, csr: bytes, caller: str = "10.0.0.1") -> object:
    return asyncio.run(svc.certify(identity, token, csr, caller))


def test_certify_issues_for_the_tokens_own_identity(ca_dir: Path) -> None:
    svc = make_service(ca_dir)
    leaf = certify(svc, WEB.dns_name, b"web-token", build_csr(generate_key(), WEB))
    cert = x509.load_der_x509_certificate(leaf.leaf_der)
    assert cert.subject.rfc4514_string() == f"CN={WEB.dns_name}"
    assert svc.counters.results == {"ok": 1}


def test_bad_token_is_unauthenticated(ca_dir: Path) -> None:
    svc = make_service(ca_dir)
    with pytest.raises(Unauthenticated, match="invalid token"):
        certify(svc, WEB.dns_name, b"nope", build_csr(generate_key(), WEB))
    with pytest.raises(Unauthenticated, match="no token"):
        certify(svc, WEB.dns_name, b"", build_csr(generate_key(), WEB))


def test_identity_of_another_workload_is_denied(ca_dir: Path) -> None:
    svc = make_service(ca_dir)
    with pytest.raises(PermissionDenied, match=r"belongs to local workload shop/web.*may not request identity 'db"):
        certify(svc, DB.dns_name, b"web-token", build_csr(generate_key(), DB))


def test_csr_for_someone_else_under_own_identity_is_invalid(ca_dir: Path) -> None:
    svc = make_service(ca_dir)
    with pytest.raises(InvalidArgument, match="CSR asks for DNS:db"):
        certify(svc, WEB.dns_name, b"web-token", build_csr(generate_key(), DB))


def test_foreign_trust_domain_is_invalid(ca_dir: Path) -> None:
    svc = make_service(ca_dir)
    other = WorkloadIdentity("web", "shop", "linkerd", "example.org")
    with pytest.raises(InvalidArgument, match=r"not issued here.*linkerd\.cluster\.local"):
        certify(svc, other.dns_name, b"web-token", build_csr(generate_key(), other))
    with pytest.raises(InvalidArgument, match="is not of the form"):
        certify(svc, "web", b"web-token", b"")


def test_rate_limit_per_caller(ca_dir: Path) -> None:
    svc = make_service(ca_dir, rate=1.0, burst=2)
    csr = build_csr(generate_key(), WEB)
    certify(svc, WEB.dns_name, b"web-token", csr)
    certify(svc, WEB.dns_name, b"web-token", csr)
    with pytest.raises(ResourceExhausted, match=r"too many Certify calls from 10\.0\.0\.1"):
        certify(svc, WEB.dns_name, b"web-token", csr)
    # Another caller has its own bucket.
    certify(svc, WEB.dns_name, b"web-token", csr, caller="10.0.0.2")
    assert svc.counters.results == {"ok": 3, "rate_limited": 1}


def test_rate_limiter_refills_and_bounds_its_table() -> None:
    t = [0.0]
    rl = RateLimiter(2.0, 1, lambda: t[0], max_keys=2)
    assert rl.allow("a") and not rl.allow("a")
    t[0] = 0.5
    assert rl.allow("a")
    assert rl.allow("b")
    # Table full of busy buckets: a third caller is refused rather than growing memory.
    assert not rl.allow("c")
    t[0] = 10.0  # everyone refilled: idle buckets are dropped to make room
    assert rl.allow("c") and len(rl) == 1


def test_issuer_unavailable_once_expired(tmp_path: Path) -> None:
    write_ca(tmp_path, issuer_lifetime=dt.timedelta(hours=1))
    now = [NOW]
    issuer = FileIssuer(CredentialPaths.from_dir(tmp_path), IssuancePolicy(), lambda: now[0])
    csr = x509.load_der_x509_csr(build_csr(generate_key(), WEB))
    leaf = issuer.issue(csr, WEB, NOW + dt.timedelta(minutes=30))
    assert leaf.not_after == issuer.current.issuer.certificate.not_valid_after_utc
    with pytest.raises(Unavailable, match=r"no valid issuer.*Fix"):
        issuer.issue(csr, WEB, NOW + dt.timedelta(hours=2))


def test_file_issuer_refuses_to_start_on_expired_issuer(tmp_path: Path) -> None:
    write_ca(tmp_path, now=NOW - dt.timedelta(days=60), issuer_lifetime=dt.timedelta(days=30))
    with pytest.raises(CertificateError, match=r"issuer 'CN=identity.*expired at .*Fix"):
        FileIssuer(CredentialPaths.from_dir(tmp_path), IssuancePolicy(), lambda: NOW)


def test_file_issuer_reloads_changed_files_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    write_ca(tmp_path)
    issuer = FileIssuer(CredentialPaths.from_dir(tmp_path), IssuancePolicy(), lambda: NOW)
    first = issuer.current.issuer.certificate
    assert not issuer.check_for_changes()
    # Half-written rotation: a new certificate whose key has not arrived yet.
    from tether.core.identity.certs import parse_certificates, parse_private_key

    anchor = parse_certificates((tmp_path / "ca.crt").read_bytes(), "ca")[0]
    anchor_key = parse_private_key((tmp_path / "ca.key").read_bytes(), "ca.key")
    old_key = (tmp_path / "tls.key").read_bytes()
    new = write_issuer(tmp_path, anchor, anchor_key, NOW, dt.timedelta(days=30))
    new_key = (tmp_path / "tls.key").read_bytes()
    (tmp_path / "tls.key").write_bytes(old_key)
    assert not issuer.check_for_changes()
    assert issuer.current.issuer.certificate == first and issuer.reload_errors == 1
    assert "does not hold the key" in (issuer.last_error or "")
    (tmp_path / "tls.key").write_bytes(new_key)
    assert issuer.check_for_changes()
    assert issuer.current.issuer.certificate == new and issuer.reloads_ok == 1
    # The bundle rewritten with the same bytes (as `tether identity create-issuer` does): no reload.
    bundle = tmp_path / "ca.crt"
    same = bundle.read_bytes()
    bundle.unlink()  # a new inode and mtime
    bundle.write_bytes(same)
    assert not issuer.check_for_changes()
    assert issuer.reloads_ok == 1 and issuer.reload_errors == 1


def test_secret_volume_symlink_swap_is_noticed(tmp_path: Path) -> None:
    # Kubernetes updates a mounted Secret by pointing ..data at a new directory.
    v1, v2, mount = tmp_path / "v1", tmp_path / "v2", tmp_path / "mount"
    for d in (v1, v2, mount):
        d.mkdir()
    write_ca(v1)
    for name in ("ca.crt", "ca.key"):
        (v2 / name).write_bytes((v1 / name).read_bytes())
    from tether.core.identity.certs import parse_certificates, parse_private_key

    anchor = parse_certificates((v1 / "ca.crt").read_bytes(), "ca")[0]
    new = write_issuer(v2, anchor, parse_private_key((v1 / "ca.key").read_bytes(), "k"), NOW, dt.timedelta(days=9))
    os.symlink(v1, mount / "..data")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        os.symlink(f"..data/{name}", mount / name)
    issuer = FileIssuer(CredentialPaths.from_dir(mount), IssuancePolicy(), lambda: NOW)
    os.symlink(v2, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert issuer.check_for_changes()
    assert issuer.current.issuer.certificate == new


# -- local workloads and tokens --------------------------------------------------------------------


def test_registered_workload_token_is_private_and_validates(tmp_path: Path) -> None:
    reg = WorkloadRegistry(tmp_path)
    token = reg.register(Workload("web", "shop", "web-sa", ("127.0.0.1",), labels={"app": "web"}))
    path = reg.token_path("shop", "web")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert token not in reg.workload_path("shop", "web").read_text()
    w = reg.validate_token(path.read_bytes())
    assert (w.namespace, w.service_account, dict(w.labels)) == ("shop", "web-sa", {"app": "web"})
    subject = asyncio.run(LocalTokenValidator(reg).validate(token.encode()))
    assert subject == TokenSubject("shop", "web-sa", "local workload shop/web")


def test_forged_stale_and_garbage_tokens_are_refused(tmp_path: Path) -> None:
    reg = WorkloadRegistry(tmp_path)
    old = reg.register(Workload("web", "shop", "web"))
    reg.register(Workload("web", "shop", "web"))  # re-registration rotates the token
    with pytest.raises(InvalidToken, match="does not match"):
        reg.validate_token(old)
    with pytest.raises(InvalidToken, match="not registered"):
        reg.validate_token("tether-local.shop.db.AAAA")
    with pytest.raises(InvalidToken, match="not a tether local bootstrap token"):
        reg.validate_token("eyJhbGciOi.x.y")
    with pytest.raises(Unauthenticated, match="invalid token"):
        asyncio.run(LocalTokenValidator(reg).validate(old.encode()))


def test_control_plane_tokens_name_a_service_account_of_the_controller_namespace(tmp_path: Path) -> None:
    reg = WorkloadRegistry(tmp_path)
    path = ensure_control_token(tmp_path, "linkerd-destination")
    token = path.read_text().strip()
    assert ensure_control_token(tmp_path, "linkerd-destination") == path and path.read_text().strip() == token
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(control_tokens_dir(tmp_path).stat().st_mode & 0o777) == "0o700"
    # Only the hash is what the identity service reads.
    assert token not in (control_tokens_dir(tmp_path) / "linkerd-destination.sha256").read_text()
    subject = asyncio.run(LocalTokenValidator(reg, "linkerd").validate(token.encode()))
    assert subject == TokenSubject("linkerd", "linkerd-destination",
                                   "local control-plane service account linkerd/linkerd-destination")
    # A forged secret, a service account without a token, a malformed one; and a validator that was
    # not told the controller namespace accepts none of them.
    for bad, why in ((token[:-4] + "AAAA", "does not match"), ("tether-control.linkerd-identity.x", "no control-plane"),
                     ("tether-control.Not_A_Name.x", "not a tether local control-plane token")):
        with pytest.raises(Unauthenticated, match=why):
            asyncio.run(LocalTokenValidator(reg, "linkerd").validate(bad.encode()))
    with pytest.raises(Unauthenticated, match="not a tether local bootstrap token"):
        asyncio.run(LocalTokenValidator(reg).validate(token.encode()))


def test_workload_files_round_trip(tmp_path: Path) -> None:
    reg = WorkloadRegistry(tmp_path)
    (tmp_path / "workloads" / "shop").mkdir(parents=True)
    (tmp_path / "workloads" / "shop" / "api.yaml").write_text(
        "name: api\nnamespace: shop\nserviceAccount: api\naddresses: [10.0.0.5]\n"
        "ports: [8080, {port: 9090, name: admin}]\nproxyAdmin: 127.0.0.1:4191\n"
    )
    w = reg.get("shop", "api")
    assert [p.port for p in w.ports] == [8080, 9090] and w.ports[1].name == "admin"
    assert w.proxy_admin == "127.0.0.1:4191"
    assert [x.key for x in reg.list()] == ["shop/api"]
