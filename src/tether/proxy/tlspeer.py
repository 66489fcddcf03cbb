"""What a TLS session proved about its peer: light enough for the hot path (no grpc, no cryptography).

``peer_identity`` reads the verified peer certificate's DNS SAN from the ssl module's own view.
``peer_certificate`` is that view, decoded once per certificate: the ssl module builds its dict anew
at every ``getpeercert()`` (~9 us, ~55k instructions), and each new mesh connection asked two or
three times (the inbound's client identity, the resumed-session check) for one of a few certificates.
"""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["IdentityNotReady", "peer_certificate", "peer_identity", "peer_spiffe_id"]

# DER -> what getpeercert() decodes from it. Peers are few (one certificate per workload, renewed at
# 70% of its lifetime), so a small cache dropped whole when full stays warm.
_decoded: dict[bytes, dict[str, Any]] = {}
_DECODED_MAX = 64


class IdentityNotReady(RuntimeError):
    """No certificate yet: the proxy cannot do mTLS until the first Certify succeeds."""


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """``ssl_object.getpeercert()``, decoded once per certificate: treat it as read-only.

    The same answer as the ssl module's: {} without a peer certificate or when the context does not
    verify one (its verify mode, as getpeercert decides); the decoded certificate otherwise.
    """
    der = ssl_object.getpeercert(True)
    if der is None or ssl_object.context.verify_mode == ssl.CERT_NONE:
        return {}
    cert = _decoded.get(der)
    if cert is None:
        cert = ssl_object.getpeercert() or {}
        if len(_decoded) >= _DECODED_MAX:
            _decoded.clear()
        _decoded[der] = cert
    return cert


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer's DNS-like identity (its first DNS SAN), or None without a verified cert."""
    if ssl_object is None:
        return None
    for kind, value in _peer_sans(ssl_object):
        if kind == "DNS":
            return value
    return None


def _peer_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in peer_certificate(ssl_object).get("subjectAltName", ())]


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer's SPIFFE id (its URI SAN), or None."""
    if ssl_object is None:
        return None
    for kind, value in _peer_sans(ssl_object):
        if kind == "URI" and value.startswith("spiffe://"):
            return value
    return None
