"""Leaf issuance policy: what a workload certificate looks like and how long it lives.

Pure: ``now`` is a parameter, the serial number may be passed in, and the result is bytes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from tether.core.identity.certs import CertificateError, IssuerCredentials, describe, fmt_time
from tether.core.identity.csr import subject_for
from tether.core.identity.names import WorkloadIdentity

DEFAULT_LIFETIME = dt.timedelta(hours=24)
DEFAULT_CLOCK_SKEW = dt.timedelta(seconds=20)
# Below this a leaf is useless: the proxy would spend its life renewing it.
MIN_USEFUL_LIFETIME = dt.timedelta(seconds=1)


@dataclass(frozen=True, slots=True)
class IssuancePolicy:
    """Leaf lifetime and the clock-skew allowance by which its start is backdated."""

    lifetime: dt.timedelta = DEFAULT_LIFETIME
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW

    def __post_init__(self) -> None:
        if self.lifetime < MIN_USEFUL_LIFETIME:
            raise ValueError(f"issuance lifetime {self.lifetime} is shorter than {MIN_USEFUL_LIFETIME}")
        if self.clock_skew < dt.timedelta(0):
            raise ValueError("clock skew allowance must not be negative")


@dataclass(frozen=True, slots=True)
class IssuedLeaf:
    """A signed leaf and the intermediates a peer needs to chain it to an anchor."""

    leaf_der: bytes
    intermediates_der: tuple[bytes, ...]
    not_after: dt.datetime


def _hash_for(key: object) -> hashes.HashAlgorithm | None:
    # Ed25519 signs the message itself; every other key type signs a SHA-256 digest.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def issue_leaf(
    issuer: IssuerCredentials,
    csr: x509.CertificateSigningRequest,
    identity: WorkloadIdentity,
    now: dt.datetime,
    policy: IssuancePolicy = IssuancePolicy(),
    serial: int | None = None,
    limit: dt.datetime | None = None,
) -> IssuedLeaf:
    """Sign a leaf for ``identity`` with the CSR's (already validated) public key.

    The leaf starts ``clock_skew`` before ``now`` and ends at ``now + lifetime`` or the issuer's own
    expiry (or ``limit``, the earliest expiry in the issuer's chain), whichever is first: it never
    outlives its issuer.
    """
    ic = issuer.certificate
    if now < ic.not_valid_before_utc or now >= ic.not_valid_after_utc:
        raise CertificateError(
            f"cannot issue at {fmt_time(now)}: {describe(ic, 'issuer')} is not valid then. Fix: replace the "
            "issuer with one valid now"
        )
    not_before = max(now - policy.clock_skew, ic.not_valid_before_utc)
    not_after = min(now + policy.lifetime, ic.not_valid_after_utc)
    if limit is not None:
        not_after = min(not_after, limit)
    if not_after - now < MIN_USEFUL_LIFETIME:
        raise CertificateError(f"{describe(ic, 'issuer')} expires too soon to issue a useful leaf")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertificateError("leaf keys must be ECDSA P-256")
    issuer_ski = ic.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value if _has_ski(ic) else None
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
        if issuer_ski is not None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    )
    subject = subject_for(identity)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ic.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # SPIFFE X.509-SVID: digitalSignature required; keyCertSign and cRLSign forbidden.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(identity.dns_name), x509.UniformResourceIdentifier(identity.spiffe_id)]
            ),
            critical=len(subject) == 0,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    leaf = builder.sign(issuer.key, _hash_for(issuer.key))  # type: ignore[arg-type]
    der = serialization.Encoding.DER
    return IssuedLeaf(
        leaf.public_bytes(der),
        (ic.public_bytes(der), *(c.public_bytes(der) for c in issuer.chain)),
        not_after,
    )


def _has_ski(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return False
    return True
