"""Making trust anchors and issuers, for trying tether out, for tests and for anchor rotation.

Production users bring their own PKI (step, cert-manager, Vault); these follow the same profiles as
``step certificate create --profile root-ca`` and ``--profile intermediate-ca``.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.identity.certs import PrivateKey

DEFAULT_ANCHOR_LIFETIME = dt.timedelta(days=365 * 10)
DEFAULT_ISSUER_LIFETIME = dt.timedelta(days=365)
# Certificates we create start slightly in the past so a peer whose clock is a little behind accepts them.
BACKDATE = dt.timedelta(minutes=5)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def create_anchor(
    common_name: str,
    now: dt.datetime,
    lifetime: dt.timedelta = DEFAULT_ANCHOR_LIFETIME,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed root CA (ECDSA P-256) for ``common_name``, e.g. ``root.linkerd.cluster.local``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = not_before if not_before is not None else now - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def create_issuer(
    common_name: str,
    anchor: x509.Certificate,
    anchor_key: PrivateKey,
    now: dt.datetime,
    lifetime: dt.timedelta = DEFAULT_ISSUER_LIFETIME,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An intermediate CA signed by ``anchor``, e.g. ``identity.linkerd.cluster.local``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    start = not_before if not_before is not None else now - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(anchor.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(anchor.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(anchor_key, hashes.SHA256())
    )
    return cert, key
