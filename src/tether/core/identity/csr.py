"""Certificate signing requests: what a proxy sends and what the identity service accepts.

A CSR is accepted only if it asks for exactly what would be issued: an ECDSA P-256 key, the
identity's DNS-like name and SPIFFE id as the only SANs, and (if present) that name as the CN.
"""

from __future__ import annotations

import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.identity.names import MAX_COMMON_NAME, WorkloadIdentity

# Anything bigger than this is not a CSR for one P-256 key and two names.
MAX_CSR_BYTES = 8 * 1024

# What cryptography raises for a CSR, or a part of one, it cannot read (several are not
# ValueErrors; the csr fuzz target found each of them).
_UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
               x509.UnsupportedGeneralNameType)


class CsrError(ValueError):
    """The CSR was refused; the message says what it asked for and what would be issued."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key (it never leaves the process that made it)."""
    return ec.generate_private_key(ec.SECP256R1())


def subject_for(identity: WorkloadIdentity) -> x509.Name:
    """CN=<identity name>, or an empty subject when the name is longer than a CN may be."""
    if len(identity.dns_name) > MAX_COMMON_NAME:
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.dns_name)])


def build_csr(key: ec.EllipticCurvePrivateKey, identity: WorkloadIdentity) -> bytes:
    """A DER CSR for ``identity``: CN and the one DNS SAN are the DNS-like name.

    No URI SAN: Linkerd's identity service refuses a CSR with URIs ("cannot validate URIs"), and the
    issuer adds the SPIFFE id to the leaf itself, so asking for it would only break that pairing.
    """
    subject = subject_for(identity)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(identity.dns_name)]),
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            critical=len(subject) == 0,
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def validate_csr(der: bytes, identity: WorkloadIdentity) -> x509.CertificateSigningRequest:
    """Parse a DER CSR and refuse it unless it asks for exactly what we would issue to ``identity``."""
    if len(der) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(der)} bytes, more than the {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_der_x509_csr(der)
    except _UNREADABLE as e:
        raise CsrError(f"CSR is not a DER PKCS#10 request: {e}") from None
    # A well-formed envelope may still carry a key, signature, extension or subject that can't be
    # read: cryptography raises only when they are used.
    try:
        key = csr.public_key()
        signature_ok = csr.is_signature_valid
        extensions = list(csr.extensions)
        with warnings.catch_warnings():
            # cryptography warns of a CN over X.520's 64 characters; identity names may be longer
            # (Linkerd's are too), and the CN is compared with the identity below, not trusted.
            warnings.simplefilter("ignore", UserWarning)
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except _UNREADABLE as e:
        raise CsrError(f"CSR cannot be read: {e}") from None
    if not signature_ok:
        raise CsrError("CSR signature does not verify with its own public key")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise CsrError(f"CSR key is {kind}; only ECDSA P-256 (secp256r1) keys are issued")
    # Linkerd's proxies ask for the DNS name only; older tether proxies also asked for the SPIFFE id.
    # Either way the leaf carries both (the issuer sets its SANs from the identity, not the CSR).
    dns_only = {("DNS", identity.dns_name)}
    with_uri = {("DNS", identity.dns_name), ("URI", identity.spiffe_id)}
    got: set[tuple[str, str]] = set()
    count = 0
    for ext in extensions:
        if isinstance(ext.value, x509.SubjectAlternativeName):
            for gn in ext.value:
                count += 1
                if isinstance(gn, x509.DNSName):
                    got.add(("DNS", gn.value))
                elif isinstance(gn, x509.UniformResourceIdentifier):
                    got.add(("URI", gn.value))
                else:
                    got.add((type(gn).__name__, str(gn.value)))
        elif isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise CsrError("CSR asks for a CA certificate (basicConstraints cA=true); only leaves are issued")
    if got not in (dns_only, with_uri) or count != len(got):
        asked = ", ".join(f"{k}:{v}" for k, v in sorted(got)) or "no SANs"
        raise CsrError(
            f"CSR asks for {asked}; identity {identity.dns_name!r} is issued exactly "
            f"DNS:{identity.dns_name}, URI:{identity.spiffe_id} (a CSR names the DNS name, optionally the URI)"
        )
    if cns and [a.value for a in cns] != [identity.dns_name]:
        raise CsrError(f"CSR subject CN {[a.value for a in cns]} is not the identity {identity.dns_name!r}")
    return csr
