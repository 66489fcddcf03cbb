"""The mesh transport header: what an outbound proxy tells the peer proxy inside mTLS.

A connection to a peer proxy's inbound port (the ``opaque_transport`` protocol hint) starts with
this header, so the peer knows the application port it is for and how to handle what follows:
opaque bytes, or HTTP/1 or HTTP/2 served to that port (the session protocol). Linkerd's proxies
write and read the same bytes (``transport.l5d.io/v1``): the preface, a 4-byte big-endian length,
then that many bytes of the protobuf message ``transport.l5d.io.Header``::

    Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3; }
    SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; } }   (both empty messages)

tether releases before 0.2.0 wrote a JSON object instead (``{"port": N, "name": "...", "protocol":
"opaque"}``): it is still read (its first byte, ``{``, is no protobuf field of this message), and
written to a peer the destination service marks as such a release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PREFACE = b"transport.l5d.io/v1\r\n\r\n"
# The ALPN a client offers on a connection it starts with the header (wire form: length, name).
# Linkerd's inbound reads a header only on a connection that agreed on it.
ALPN = b"\x13transport.l5d.io/v1"
MAX_HEADER = 4096
OPAQUE, HTTP1, HTTP2 = "opaque", "http1", "http2"
# SessionProtocol's oneof: field number -> protocol
_SESSION_FIELDS = {1: HTTP1, 2: HTTP2}


class TransportHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class TransportHeader:
    port: int
    name: str = ""
    protocol: str = OPAQUE  # or HTTP1 / HTTP2: the session protocol that follows the header


def encode(h: TransportHeader, legacy: bool = False) -> bytes:
    """The header's bytes; ``legacy``: the JSON body tether releases before 0.2.0 read."""
    if legacy:
        body = json.dumps({"port": h.port, "name": h.name, "protocol": OPAQUE}, separators=(",", ":")).encode()
    else:
        body = _field_varint(1, h.port)
        if h.name:
            body += _field_bytes(2, h.name.encode())
        if h.protocol != OPAQUE:
            number = 1 if h.protocol == HTTP1 else 2
            body += _field_bytes(3, _field_bytes(number, b""))
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
    body = data[len(PREFACE) + 4 : end]
    header = _decode_json(body) if body[:1] == b"{" else _decode_proto(body)
    if not 0 < header.port <= 65535:
        raise TransportHeaderError(f"transport header port {header.port} out of range")
    return header, end


def is_prefix(data: bytes) -> bool:
    n = min(len(data), len(PREFACE))
    return n > 0 and data[:n] == PREFACE[:n]


def _decode_json(body: bytes) -> TransportHeader:
    try:
        obj = json.loads(body)
        port = int(obj["port"])
        name, protocol = str(obj.get("name", "")), str(obj.get("protocol", OPAQUE))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TransportHeaderError(f"malformed transport header: {e}") from None
    if protocol != OPAQUE:
        raise TransportHeaderError(f"transport header protocol {protocol!r} is not opaque")
    return TransportHeader(port, name, OPAQUE)


def _decode_proto(body: bytes) -> TransportHeader:
    port, name, protocol = 0, "", OPAQUE
    for number, value in _fields(body, "transport header"):
        if number == 1:
            if not isinstance(value, int):
                raise TransportHeaderError("transport header: port is not a varint")
            port = value - (1 << 64) if value >= 1 << 63 else value  # int32, sign-extended
        elif number == 2:
            if not isinstance(value, bytes):
                raise TransportHeaderError("transport header: name is not a string")
            try:
                name = value.decode()
            except UnicodeDecodeError:
                raise TransportHeaderError("transport header: name is not UTF-8") from None
        elif number == 3:
            if not isinstance(value, bytes):
                raise TransportHeaderError("transport header: session_protocol is not a message")
            protocol = OPAQUE
            for inner, _ in _fields(value, "session protocol"):
                protocol = _SESSION_FIELDS.get(inner, protocol)  # the last of the oneof wins
    return TransportHeader(port, name, protocol)


def _fields(data: bytes, what: str) -> list[tuple[int, int | bytes]]:
    """(field number, varint or bytes) of a protobuf message; fixed-size fields are skipped."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i, what)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise TransportHeaderError(f"{what}: field number 0")
        if wire == 0:
            value, i = _varint(data, i, what)
            out.append((number, value))
        elif wire == 2:
            length, i = _varint(data, i, what)
            if i + length > len(data):
                raise TransportHeaderError(f"{what}: field {number} runs past the end")
            out.append((number, data[i : i + length]))
            i += length
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > len(data):
                raise TransportHeaderError(f"{what}: field {number} runs past the end")
        else:
            raise TransportHeaderError(f"{what}: unsupported wire type {wire}")
    return out


def _varint(data: bytes, i: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise TransportHeaderError(f"{what}: bad varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value & ((1 << 64) - 1), i
        shift += 7


def _field_varint(number: int, value: int) -> bytes:
    return _encode_varint(number << 3) + _encode_varint(value & ((1 << 64) - 1))


def _field_bytes(number: int, value: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(value)) + value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
