"""Certificates as data: PEM bundles, trust anchors, issuer validation and chain verification.

Every error names the certificate (subject, SHA-256 fingerprint prefix), its validity dates and what
to do about it, because a certificate problem is usually found by someone reading a log at 3 a.m.
Time is always a parameter.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

# One error class for both readers: the proxy's (certview, no cryptography) and this one.
from tether.core.identity.certview import CertificateError as CertificateError
from tether.core.identity.certview import not_a_ca_anchor

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of the DER encoding, hex, as ``openssl x509 -fingerprint -sha256`` shows."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(cert: x509.Certificate, role: str = "certificate") -> str:
    """One phrase naming a certificate: role, subject, fingerprint prefix and validity dates."""
    subject = cert.subject.rfc4514_string() or "<empty subject>"
    return (
        f"{role} {subject!r} (sha256 {fingerprint(cert)[:16]}, valid "
        f"{fmt_time(cert.not_valid_before_utc)} to {fmt_time(cert.not_valid_after_utc)})"
    )


def parse_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    """Parse one or more PEM certificates; ``source`` names the input in errors."""
    if PEM_CERT_BEGIN not in data:
        raise CertificateError(f"{source}: no PEM certificate found (expected '-----BEGIN CERTIFICATE-----')")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{source}: cannot parse PEM certificates: {e}") from None
    return certs


def parse_private_key(data: bytes, source: str) -> PrivateKey:
    """Parse an unencrypted PEM private key of a type we can sign with."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"{source}: the private key is encrypted; write it unencrypted (step: --no-password --insecure)"
        ) from None
    except ValueError as e:
        raise CertificateError(f"{source}: cannot parse the PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise CertificateError(f"{source}: unsupported key type {type(key).__name__}; use ECDSA P-256")
    return key


def certificates_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s name matches and its key verifies ``cert``'s signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def validity_problem(cert: x509.Certificate, now: dt.datetime, role: str) -> str | None:
    """Why ``cert`` is not valid at ``now`` (a full sentence), or None."""
    if now < cert.not_valid_before_utc:
        return f"{describe(cert, role)} is not valid yet at {fmt_time(now)}"
    if now >= cert.not_valid_after_utc:
        return f"{describe(cert, role)} expired at {fmt_time(cert.not_valid_after_utc)}"
    return None


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """Trust anchors: one or more root certificates (more than one while an anchor is rotated)."""

    anchors: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(cls, data: bytes, source: str = "trust anchors") -> TrustBundle:
        certs = parse_certificates(data, source)
        for c in certs:
            if not is_ca(c):
                raise CertificateError(not_a_ca_anchor(source, describe(c, "anchor")))
        # Keep one copy of each anchor, in file order.
        seen: set[str] = set()
        unique = []
        for c in certs:
            fp = fingerprint(c)
            if fp not in seen:
                seen.add(fp)
                unique.append(c)
        return cls(tuple(unique))

    def pem(self) -> bytes:
        return certificates_pem(self.anchors)

    def find_signer(self, cert: x509.Certificate) -> x509.Certificate | None:
        for a in self.anchors:
            if signed_by(cert, a):
                return a
        return None

    def is_anchor(self, cert: x509.Certificate) -> bool:
        fp = fingerprint(cert)
        return any(fingerprint(a) == fp for a in self.anchors)


def chain_to_anchor(
    cert: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundle: TrustBundle,
    now: dt.datetime,
    role: str,
    max_depth: int = 8,
) -> list[x509.Certificate]:
    """Build and check the path ``cert`` -> intermediates -> anchor at ``now``; returns it (anchor last).

    Raises CertificateError naming the certificate where the path breaks.
    """
    path = [cert]
    current = cert
    for _ in range(max_depth):
        problem = validity_problem(current, now, role if current is cert else "intermediate")
        if problem:
            raise CertificateError(problem)
        if bundle.is_anchor(current):
            return path
        anchor = bundle.find_signer(current)
        if anchor is not None:
            problem = validity_problem(anchor, now, "trust anchor")
            if problem:
                raise CertificateError(
                    f"{problem}; {describe(cert, role)} chains to it. Fix: issue a new anchor and issuer "
                    "and distribute the new anchor to every proxy"
                )
            path.append(anchor)
            return path
        parent = next((i for i in intermediates if i is not current and signed_by(current, i)), None)
        if parent is None:
            anchors = ", ".join(describe(a, "anchor") for a in bundle.anchors)
            who = describe(current, role if current is cert else "intermediate")
            raise CertificateError(
                f"{who} is not signed by any trust "
                f"anchor ({anchors}); issued by {current.issuer.rfc4514_string()!r}. Fix: re-issue it from "
                "one of these anchors, or add its anchor to the trust bundle"
            )
        if not is_ca(parent):
            raise CertificateError(f"{describe(parent, 'intermediate')} is not a CA and cannot sign")
        path.append(parent)
        current = parent
    raise CertificateError(f"{describe(cert, role)}: chain longer than {max_depth} certificates")


def public_keys_match(cert: x509.Certificate, key: PrivateKey) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


@dataclass(frozen=True, slots=True)
class IssuerCredentials:
    """The identity service's signing material: issuer certificate, its key, and the chain above it."""

    certificate: x509.Certificate
    key: PrivateKey
    # Certificates between the issuer and an anchor (not the anchor), as the tls.crt file had them.
    chain: tuple[x509.Certificate, ...] = ()


def load_issuer(cert_pem: bytes, key_pem: bytes, cert_source: str, key_source: str) -> IssuerCredentials:
    """Parse the issuer from a PEM certificate file (issuer first, then optional intermediates) and key."""
    certs = parse_certificates(cert_pem, cert_source)
    key = parse_private_key(key_pem, key_source)
    issuer = certs[0]
    if not public_keys_match(issuer, key):
        raise CertificateError(
            f"{key_source} does not hold the key of {describe(issuer, 'issuer')} from {cert_source}. "
            "Fix: write the certificate and key of the same issuer (while both are replaced, wait for both)"
        )
    return IssuerCredentials(issuer, key, tuple(certs[1:]))


def validate_issuer(creds: IssuerCredentials, bundle: TrustBundle, now: dt.datetime) -> None:
    """Refuse an issuer that cannot issue now: not a CA, outside its dates, or not chaining to an anchor."""
    cert = creds.certificate
    if not is_ca(cert):
        raise CertificateError(
            f"{describe(cert, 'issuer')} is not a CA (basicConstraints cA is not true). Fix: create it as an "
            "intermediate CA, e.g. `step certificate create identity.linkerd.cluster.local issuer.crt "
            "issuer.key --profile intermediate-ca --ca ca.crt --ca-key ca.key`"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CertificateError(
                f"{describe(cert, 'issuer')} lacks the keyCertSign key usage. Fix: re-issue it as an "
                "intermediate CA (usages: cert sign, crl sign)"
            )
    except x509.ExtensionNotFound:
        pass
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{describe(cert, 'issuer')} is not valid yet at {fmt_time(now)}. Fix: check this host's clock, "
            "or re-issue the issuer with a start date in the past"
        )
    if now >= cert.not_valid_after_utc:
        raise CertificateError(
            f"{describe(cert, 'issuer')} expired at {fmt_time(cert.not_valid_after_utc)}. Fix: issue a new "
            "issuer from the trust anchor (`tether identity create-issuer` or `step certificate create "
            "... --profile intermediate-ca`) and replace the issuer files"
        )
    chain_to_anchor(cert, creds.chain, bundle, now, "issuer")


@dataclass(frozen=True, slots=True)
class Expiry:
    """How a certificate stands at a moment: seconds left (negative once expired)."""

    cert: x509.Certificate
    seconds_left: float
    not_yet_valid: bool

    @property
    def expired(self) -> bool:
        return self.seconds_left <= 0


def expiry(cert: x509.Certificate, now: dt.datetime) -> Expiry:
    left = (cert.not_valid_after_utc - now).total_seconds()
    return Expiry(cert, left, now < cert.not_valid_before_utc)


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The certificate's DNS and URI subject alternative names."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.UniformResourceIdentifier)


def check_leaf_profile(cert: x509.Certificate) -> None:
    """Check a leaf against the SPIFFE X.509-SVID rules (used on what we issue and what we receive)."""
    name = describe(cert, "leaf")
    _dns, uris = sans(cert)
    if len(uris) != 1:
        raise CertificateError(f"{name} must carry exactly one URI SAN (its SPIFFE id), has {len(uris)}")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise CertificateError(f"{name} has basicConstraints cA=true; a leaf SVID must not be a CA")
    except x509.ExtensionNotFound:
        pass
    try:
        ku_ext = cert.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
    except x509.ExtensionNotFound:
        raise CertificateError(f"{name} has no keyUsage extension; an SVID needs critical digitalSignature")
    ku = ku_ext.value
    assert isinstance(ku, x509.KeyUsage)
    if not ku_ext.critical or not ku.digital_signature:
        raise CertificateError(f"{name}: keyUsage must be critical and include digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise CertificateError(f"{name}: keyUsage must not include keyCertSign or cRLSign")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        missing = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} - set(eku)
        if missing:
            raise CertificateError(f"{name}: extendedKeyUsage must include serverAuth and clientAuth")
    except x509.ExtensionNotFound:
        pass
