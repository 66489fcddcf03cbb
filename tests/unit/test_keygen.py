"""The proxy's key generator (a child process): what it hands back, and how it fails."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from tether.core.identity.csr import validate_csr
from tether.core.identity.names import parse_identity_name
from tether.proxy import keygen

WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"


def test_a_p256_key_its_public_key_and_a_csr_the_identity_service_accepts() -> None:
    m = keygen.generate(WEB, b"one-time")
    csr = validate_csr(m.csr_der, parse_identity_name(WEB))  # raises if the service would refuse it
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(serialization.Encoding.DER, spki) == m.spki_der
    plain = serialization.load_pem_private_key(m.key_pem, None)
    encrypted = serialization.load_pem_private_key(m.key_pem_encrypted, b"one-time")
    assert plain.public_key().public_bytes(serialization.Encoding.DER, spki) == m.spki_der
    assert encrypted.public_key().public_bytes(serialization.Encoding.DER, spki) == m.spki_der
    assert m.spki_der not in repr(m).encode() and b"PRIVATE" not in repr(m).encode()
    assert keygen.generate(WEB, b"x").spki_der != m.spki_der  # a fresh key each time


def test_a_failure_is_one_line_naming_the_cause() -> None:
    with pytest.raises(keygen.KeygenError, match=r"the key generator failed \(exit 1\): tether\.proxy\.keygen: .*"):
        keygen.generate("not an identity", b"x")
