"""The proxy's DER certificate reader against cryptography as the oracle, and its strictness."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.identity import certs
from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import IssuerCredentials
from tether.core.identity.certview import (
    CertificateError,
    TrustAnchors,
    check_leaf_profile,
    describe,
    parse_der,
    parse_pem,
)
from tether.core.identity.csr import build_csr, generate_key, validate_csr
from tether.core.identity.issuance import issue_leaf
from tether.core.identity.names import parse_identity_name

DER, PEM = serialization.Encoding.DER, serialization.Encoding.PEM
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)


def _mesh() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    anchor, akey = create_anchor("root.linkerd.cluster.local", NOW)
    issuer, ikey = create_issuer("identity.linkerd.cluster.local", anchor, akey, NOW)
    ident = parse_identity_name(WEB)
    csr = validate_csr(build_csr(generate_key(), ident), ident)
    leaf = issue_leaf(IssuerCredentials(issuer, ikey), csr, ident, NOW)
    return anchor, issuer, x509.load_der_x509_certificate(leaf.leaf_der)


def _custom(name: x509.Name, not_after: dt.datetime, exts: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
         .not_valid_after(not_after))
    for ext, critical in exts:
        b = b.add_extension(ext, critical)
    return b.sign(key, hashes.SHA256())


def test_reads_what_cryptography_reads() -> None:
    odd = _custom(
        x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                   x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a, b+c"),
                   x509.NameAttribute(NameOID.COMMON_NAME, "#x ")]),
        dt.datetime(2051, 1, 1, tzinfo=dt.UTC),  # after 2049: GeneralizedTime
        [(x509.SubjectAlternativeName([x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                                       x509.UniformResourceIdentifier("spiffe://td/x")]), False),
         (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    )
    for cert in (*_mesh(), odd):
        view = parse_der(cert.public_bytes(DER), "test")
        dns, uris = certs.sans(cert)
        assert view.subject == cert.subject.rfc4514_string()
        assert view.issuer == cert.issuer.rfc4514_string()
        assert (view.not_valid_before_utc, view.not_valid_after_utc) == (cert.not_valid_before_utc,
                                                                         cert.not_valid_after_utc)
        assert (list(view.dns_names), list(view.uris)) == (dns, uris)
        assert view.is_ca == certs.is_ca(cert)
        assert view.fingerprint == certs.fingerprint(cert)
        assert view.spki_der == cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert describe(view, "leaf") == certs.describe(cert, "leaf")
        assert view.pem() == cert.public_bytes(PEM)
    assert parse_der(odd.public_bytes(DER), "t").other_names == 1


def test_leaf_profile_agrees_with_the_control_planes_check() -> None:
    _, _, leaf = _mesh()
    check_leaf_profile(parse_der(leaf.public_bytes(DER), "leaf"))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    later = NOW + dt.timedelta(days=1)
    uri = (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")]), False)
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    bad = {
        "no URI": [(x509.KeyUsage(True, False, False, False, False, False, False, False, False), True)],
        "CA": [uri, (x509.BasicConstraints(ca=True, path_length=None), True), (ku, True)],
        "no keyUsage": [uri],
        "keyUsage not critical": [uri, (ku, False)],
        "keyCertSign": [uri, (x509.KeyUsage(True, False, False, False, False, True, False, False, False), True)],
        "EKU without clientAuth": [uri, (ku, True), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)],
    }
    for why, exts in bad.items():
        cert = _custom(name, later, exts)
        with pytest.raises(certs.CertificateError) as theirs:
            certs.check_leaf_profile(cert)
        with pytest.raises(CertificateError) as ours:
            check_leaf_profile(parse_der(cert.public_bytes(DER), "leaf"))
        assert str(ours.value) == str(theirs.value), why


def test_trust_anchors_refuse_a_non_ca_and_keep_each_anchor_once() -> None:
    anchor, issuer, leaf = _mesh()
    pem = anchor.public_bytes(PEM)
    bundle = TrustAnchors.from_pem(pem + pem + issuer.public_bytes(PEM), "ca.crt")
    assert [a.fingerprint for a in bundle.anchors] == [certs.fingerprint(anchor), certs.fingerprint(issuer)]
    assert bundle.pem() == pem + issuer.public_bytes(PEM)
    with pytest.raises(CertificateError, match=r"ca\.crt: anchor .* is not a CA"):
        TrustAnchors.from_pem(leaf.public_bytes(PEM), "ca.crt")
    with pytest.raises(CertificateError, match="no PEM certificate found"):
        TrustAnchors.from_pem(b"garbage", "ca.crt")
    with pytest.raises(CertificateError, match="not base64"):
        parse_pem(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", "ca.crt")
    with pytest.raises(CertificateError, match="not closed"):
        parse_pem(pem[:-30], "ca.crt")


def test_refuses_what_is_not_der() -> None:
    der = _mesh()[2].public_bytes(DER)
    cases = {
        "trailing": der + b"\x00",
        "truncated": der[:-1],
        "indefinite length": b"\x30\x80" + der[4:] + b"\x00\x00",
        "non-minimal length": b"\x30\x83\x00" + der[2:],
        "empty": b"",
    }
    for data in cases.values():
        with pytest.raises(CertificateError, match=r"leaf: not a DER X\.509 certificate"):
            parse_der(data, "leaf")


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_certificates_raise_only_certificate_error(data: st.DataObject) -> None:
    der = bytearray(_LEAF_DER)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(der) - 1))
        der[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(der)))
    try:
        parse_der(bytes(der[:cut]), "leaf")
    except CertificateError:
        pass


_LEAF_DER = _mesh()[2].public_bytes(DER)
