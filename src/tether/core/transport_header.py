"""The mesh transport header: what an outbound proxy tells the peer proxy inside mTLS.

Opaque TCP between meshed proxies goes to the peer's inbound port, so the original destination
port travels in a header sent first inside the TLS session (linkerd2-proxy's
``transport.l5d.io/v1`` has the same role). Layout: the preface, a 4-byte big-endian length, then
that many bytes of JSON ``{"port": N, "name": "...", "protocol": "opaque"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PREFACE = b"transport.l5d.io/v1\r\n\r\n"
MAX_HEADER = 4096


class TransportHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class TransportHeader:
    port: int
    name: str = ""
    protocol: str = "opaque"


def encode(h: TransportHeader) -> bytes:
    body = json.dumps({"port": h.port, "name": h.name, "protocol": h.protocol}, separators=(",", ":")).encode()
    return PREFACE + len(body).to_bytes(4, "big") + body


def decode(data: bytes) -> tuple[TransportHeader, int] | None:
    """(header, bytes consumed), or None when more bytes are needed."""
    n = min(len(data), len(PREFACE))
    if data[:n] != PREFACE[:n]:
        raise TransportHeaderError("not a transport header")
    if len(data) < len(PREFACE) + 4:
        return None
    size = int.from_bytes(data[len(PREFACE) : len(PREFACE) + 4], "big")
    if size > MAX_HEADER:
        raise TransportHeaderError(f"transport header of {size} bytes exceeds {MAX_HEADER}")
    end = len(PREFACE) + 4 + size
    if len(data) < end:
        return None
    try:
        obj = json.loads(data[len(PREFACE) + 4 : end])
        port = int(obj["port"])
    except (ValueError, KeyError, TypeError) as e:
        raise TransportHeaderError(f"malformed transport header: {e}") from None
    if not 0 < port <= 65535:
        raise TransportHeaderError(f"transport header port {port} out of range")
    return TransportHeader(port, str(obj.get("name", "")), str(obj.get("protocol", "opaque"))), end


def is_prefix(data: bytes) -> bool:
    n = min(len(data), len(PREFACE))
    return n > 0 and data[:n] == PREFACE[:n]
