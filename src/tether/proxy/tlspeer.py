"""What a TLS session proved about its peer: light enough for the hot path (no grpc, no cryptography).

``peer_identity`` reads the verified peer certificate's DNS SAN from the ssl module's own view.
"""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["IdentityNotReady", "peer_identity", "peer_spiffe_id"]


class IdentityNotReady(RuntimeError):
    """No certificate yet: the proxy cannot do mTLS until the first Certify succeeds."""


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer's DNS-like identity (its first DNS SAN), or None without a verified cert."""
    if ssl_object is None:
        return None
    for kind, value in _peer_sans(ssl_object):
        if kind == "DNS":
            return value
    return None


def _peer_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[tuple[str, str]]:
    cert: dict[str, Any] = dict(ssl_object.getpeercert() or {})
    return [(str(k), str(v)) for k, v in cert.get("subjectAltName", ())]


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The verified peer's SPIFFE id (its URI SAN), or None."""
    if ssl_object is None:
        return None
    for kind, value in _peer_sans(ssl_object):
        if kind == "URI" and value.startswith("spiffe://"):
            return value
    return None
