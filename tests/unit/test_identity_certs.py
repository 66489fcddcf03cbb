"""CSRs, leaf issuance and issuer/anchor checks: the pure identity core, with time passed in."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import (
    CertificateError,
    IssuerCredentials,
    TrustBundle,
    certificates_pem,
    chain_to_anchor,
    check_leaf_profile,
    load_issuer,
    validate_issuer,
)
from tether.core.identity.csr import CsrError, build_csr, generate_key, validate_csr
from tether.core.identity.issuance import IssuancePolicy, issue_leaf
from tether.core.identity.names import WorkloadIdentity

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
WEB = WorkloadIdentity("web", "shop", "linkerd", "cluster.local")
DB = WorkloadIdentity("db", "shop", "linkerd", "cluster.local")
PEM = serialization.Encoding.PEM


def make_ca(
    now: dt.datetime = NOW, issuer_lifetime: dt.timedelta = dt.timedelta(days=365)
) -> tuple[x509.Certificate, IssuerCredentials]:
    anchor, anchor_key = create_anchor("root.linkerd.cluster.local", now)
    cert, key = create_issuer("identity.linkerd.cluster.local", anchor, anchor_key, now, issuer_lifetime)
    return anchor, IssuerCredentials(cert, key)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# -- CSR -------------------------------------------------------------------------------------------


def test_csr_for_own_identity_is_accepted() -> None:
    key = generate_key()
    csr = validate_csr(build_csr(key, WEB), WEB)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


def test_csr_for_someone_elses_identity_is_refused() -> None:
    with pytest.raises(CsrError, match=r"CSR asks for DNS:db\.shop.*'web\.shop.*' is issued exactly"):
        validate_csr(build_csr(generate_key(), DB), WEB)


def _csr(key: object, sans: list[x509.GeneralName], cn: str | None = WEB.dns_name, ca: bool = False) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


GOOD_SANS: list[x509.GeneralName] = [
    x509.DNSName(WEB.dns_name),
    x509.UniformResourceIdentifier(WEB.spiffe_id),
]


def test_dns_only_csr_as_linkerds_proxy_sends_is_accepted() -> None:
    # linkerd2's identity service refuses URIs in a CSR, so Linkerd's proxies send the DNS name only.
    csr = validate_csr(_csr(generate_key(), GOOD_SANS[:1]), WEB)
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [WEB.dns_name]


@pytest.mark.parametrize(
    "der, reason",
    [
        (lambda: _csr(rsa.generate_private_key(65537, 2048), GOOD_SANS), "only ECDSA P-256"),
        (lambda: _csr(ec.generate_private_key(ec.SECP384R1()), GOOD_SANS), "secp384r1"),
        (lambda: _csr(generate_key(), GOOD_SANS[1:]), "issued exactly"),
        (lambda: _csr(generate_key(), [*GOOD_SANS, x509.DNSName("evil.example")]), "evil.example"),
        (lambda: _csr(generate_key(), [*GOOD_SANS, x509.DNSName(WEB.dns_name)]), "issued exactly"),
        (lambda: _csr(generate_key(), []), "no SANs"),
        (lambda: _csr(generate_key(), GOOD_SANS, cn="admin"), "subject CN"),
        (lambda: _csr(generate_key(), GOOD_SANS, ca=True), "CA certificate"),
        (lambda: b"not a csr", "not a DER PKCS#10"),
        (lambda: b"x" * 9000, "more than"),
    ],
)
def test_bad_csrs_are_refused(der: object, reason: str) -> None:
    with pytest.raises(CsrError, match=reason):
        validate_csr(der(), WEB)  # type: ignore[operator]


def test_csr_with_bad_signature_is_refused() -> None:
    der = bytearray(build_csr(generate_key(), WEB))
    der[-5] ^= 0xFF  # inside the signature
    with pytest.raises(CsrError):
        validate_csr(bytes(der), WEB)


def test_csr_whose_key_is_not_a_curve_point_is_refused() -> None:
    # Found by the csr fuzz target: the envelope parses, but the key can't be loaded; that was a
    # bare ValueError out of validate_csr instead of a refusal.
    key = generate_key()
    der = bytearray(build_csr(key, WEB))
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    at = bytes(der).index(point)
    der[at + 10] ^= 0x01  # the x coordinate: no longer on P-256
    with pytest.raises(CsrError, match="cannot be read"):
        validate_csr(bytes(der), WEB)


def test_csr_with_an_unknown_version_is_refused() -> None:
    # Found by the csr fuzz target: cryptography's InvalidVersion is not a ValueError.
    der = bytearray(build_csr(generate_key(), WEB))
    at = bytes(der).index(b"\x02\x01\x00")  # CertificationRequestInfo.version = 0 (v1)
    der[at + 2] = 125
    with pytest.raises(CsrError, match="not a DER PKCS#10"):
        validate_csr(bytes(der), WEB)


@pytest.mark.parametrize("name", [
    "a49c6ac421e0dbfc750baa41d2f6e707f3483479",  # a subject attribute of the wrong string type (TypeError)
    "ece82cdb52071c69e78435cbc2956b38ea233d96",  # an x400Address SAN (UnsupportedGeneralNameType)
])
def test_csrs_the_fuzzer_found_unreadable_are_refused(name: str) -> None:
    from pathlib import Path

    der = (Path(__file__).parents[1] / "fuzz" / "corpus" / "csr" / name).read_bytes()
    with pytest.raises(CsrError, match="cannot be read"):
        validate_csr(der, WEB)


# -- issuance --------------------------------------------------------------------------------------


def issue(creds: IssuerCredentials, now: dt.datetime = NOW, **kw: object) -> x509.Certificate:
    csr = validate_csr(build_csr(generate_key(), WEB), WEB)
    leaf = issue_leaf(creds, csr, WEB, now, **kw)  # type: ignore[arg-type]
    return x509.load_der_x509_certificate(leaf.leaf_der)


def test_leaf_follows_the_svid_profile() -> None:
    anchor, creds = make_ca()
    leaf = issue(creds)
    assert leaf.not_valid_before_utc == NOW - dt.timedelta(seconds=20)
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [WEB.dns_name]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.spiffe_id]
    check_leaf_profile(leaf)
    assert chain_to_anchor(leaf, [creds.certificate], TrustBundle((anchor,)), NOW, "leaf")[-1] == anchor


def test_lifetime_and_skew_are_configurable() -> None:
    _, creds = make_ca()
    leaf = issue(creds, policy=IssuancePolicy(dt.timedelta(minutes=5), dt.timedelta(seconds=1)))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(minutes=5, seconds=1)


def test_leaf_never_outlives_its_issuer() -> None:
    _, creds = make_ca(issuer_lifetime=dt.timedelta(hours=2))
    leaf = issue(creds)
    assert leaf.not_valid_after_utc == creds.certificate.not_valid_after_utc
    assert issue(creds, limit=NOW + dt.timedelta(minutes=30)).not_valid_after_utc == NOW + dt.timedelta(minutes=30)


def test_expired_or_future_issuer_cannot_issue() -> None:
    _, creds = make_ca(issuer_lifetime=dt.timedelta(hours=1))
    with pytest.raises(CertificateError, match=r"issuer 'CN=identity\.linkerd\.cluster\.local'.*valid .* to"):
        issue(creds, now=NOW + dt.timedelta(hours=2))
    with pytest.raises(CertificateError, match="is not valid then"):
        issue(creds, now=NOW - dt.timedelta(hours=1))


def test_rsa_issuer_signs_ecdsa_leaves() -> None:
    anchor, anchor_key = create_anchor("root", NOW)
    rsa_key = rsa.generate_private_key(65537, 2048)
    ic = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-issuer")]))
        .issuer_name(anchor.subject)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(anchor_key, hashes.SHA256())
    )
    leaf = issue(IssuerCredentials(ic, rsa_key))
    assert chain_to_anchor(leaf, [ic], TrustBundle((anchor,)), NOW, "leaf")


# -- issuer and anchors ----------------------------------------------------------------------------


def test_valid_issuer_passes() -> None:
    anchor, creds = make_ca()
    validate_issuer(creds, TrustBundle((anchor,)), NOW)


def test_expired_issuer_message_names_it_and_the_fix() -> None:
    anchor, creds = make_ca(issuer_lifetime=dt.timedelta(days=1))
    later = NOW + dt.timedelta(days=2)
    with pytest.raises(CertificateError) as e:
        validate_issuer(creds, TrustBundle((anchor,)), later)
    msg = str(e.value)
    assert "CN=identity.linkerd.cluster.local" in msg
    assert "expired at 2026-06-02T12:00:00Z" in msg
    assert "Fix:" in msg and "intermediate-ca" in msg


def test_not_yet_valid_issuer_is_refused() -> None:
    anchor, creds = make_ca()
    with pytest.raises(CertificateError, match=r"not valid yet.*clock"):
        validate_issuer(creds, TrustBundle((anchor,)), NOW - dt.timedelta(days=1))


def test_issuer_from_another_anchor_is_refused() -> None:
    _, creds = make_ca()
    other, _ = create_anchor("other-root", NOW)
    with pytest.raises(CertificateError, match=r"is not signed by any trust anchor.*other-root.*Fix"):
        validate_issuer(creds, TrustBundle((other,)), NOW)


def test_issuer_under_an_expired_anchor_is_refused() -> None:
    anchor, anchor_key = create_anchor("root", NOW - dt.timedelta(days=10), lifetime=dt.timedelta(days=5))
    cert, key = create_issuer("issuer", anchor, anchor_key, NOW)
    with pytest.raises(CertificateError, match=r"trust anchor 'CN=root'.*expired"):
        validate_issuer(IssuerCredentials(cert, key), TrustBundle((anchor,)), NOW)


def test_leaf_issuer_is_not_a_ca() -> None:
    anchor, creds = make_ca()
    leaf = issue(creds)
    with pytest.raises(CertificateError, match="is not a CA"):
        validate_issuer(IssuerCredentials(leaf, generate_key()), TrustBundle((anchor,)), NOW)


def test_issuer_through_an_intermediate_chain() -> None:
    root, root_key = create_anchor("root", NOW)
    mid, mid_key = create_issuer("mid", root, root_key, NOW)
    # mid has pathlen 0 in create_issuer; OpenSSL would refuse a deeper chain, but the structural
    # walk here only checks signatures and dates.
    issuer, issuer_key = create_issuer("issuer", mid, mid_key, NOW)
    creds = load_issuer(certificates_pem([issuer, mid]), key_pem(issuer_key), "tls.crt", "tls.key")
    validate_issuer(creds, TrustBundle((root,)), NOW)


def test_key_that_does_not_match_is_refused() -> None:
    _, creds = make_ca()
    with pytest.raises(CertificateError, match="does not hold the key of issuer"):
        load_issuer(creds.certificate.public_bytes(PEM), key_pem(generate_key()), "tls.crt", "tls.key")


def test_bundle_of_several_anchors_deduplicated() -> None:
    a, _ = create_anchor("a", NOW)
    b, _ = create_anchor("b", NOW)
    bundle = TrustBundle.from_pem(certificates_pem([a, b, a]))
    assert bundle.anchors == (a, b)


def test_bundle_errors() -> None:
    with pytest.raises(CertificateError, match="no PEM certificate"):
        TrustBundle.from_pem(b"hello", "ca.crt")
    _, creds = make_ca()
    leaf = issue(creds)
    with pytest.raises(CertificateError, match="is not a CA"):
        TrustBundle.from_pem(leaf.public_bytes(PEM), "ca.crt")


def test_expired_leaf_is_refused_by_chain_check() -> None:
    anchor, creds = make_ca()
    leaf = issue(creds)
    with pytest.raises(CertificateError, match=r"leaf 'CN=web.shop.*expired at"):
        chain_to_anchor(leaf, [creds.certificate], TrustBundle((anchor,)), NOW + dt.timedelta(days=2), "leaf")


def test_identity_longer_than_a_common_name_goes_in_the_san_only() -> None:
    long = WorkloadIdentity("linkerd-identity", "linkerd", "linkerd", "cluster.local")
    assert len(long.dns_name) > 64
    csr = validate_csr(build_csr(generate_key(), long), long)
    _, creds = make_ca()
    leaf = x509.load_der_x509_certificate(issue_leaf(creds, csr, long, NOW).leaf_der)
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long.dns_name]
    check_leaf_profile(leaf)
