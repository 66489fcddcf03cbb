"""The few certificate fields a proxy needs, read by a small strict DER reader (no cryptography).

A meshed proxy reads its own leaf (expiry, SANs, key usage, public key) and its trust anchors (CA or
not, fingerprint, names for messages); signatures are verified by OpenSSL through ``ssl``. Loading
the cryptography package for this cost a proxy ~8 MiB of RSS (docs/notes/issue-16.md).

The reader accepts DER only (definite, minimal lengths; no trailing bytes) and raises
``CertificateError`` for anything else, so a hostile answer can never raise something unexpected.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CertView",
    "CertificateError",
    "TrustAnchors",
    "certificates_pem",
    "check_leaf_profile",
    "describe",
    "fmt_time",
    "parse_der",
    "parse_pem",
    "validity_problem",
]


class CertificateError(ValueError):
    """A certificate, key or bundle is unusable; the message names it and says how to fix it."""


def not_a_ca_anchor(source: str, described: str) -> str:
    """The refusal of a trust anchor that is not a CA (one text for both certificate readers)."""
    return (f"{source}: {described} is not a CA (basicConstraints cA is not true); "
            "a trust anchor must be a CA certificate (`step certificate create --profile root-ca`)")


# Universal tags (X.690) and the context tags X.509 uses.
_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x01, 0x02, 0x03, 0x04, 0x06
_UTF8, _PRINTABLE, _T61, _IA5, _UTC_TIME, _GEN_TIME, _UNIVERSAL, _BMP = 0x0C, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1C, 0x1E
_SEQUENCE, _SET = 0x30, 0x31
_EXPLICIT_0, _EXPLICIT_1_IMPLICIT, _EXPLICIT_2_IMPLICIT, _EXPLICIT_3 = 0xA0, 0x81, 0x82, 0xA3
_GN_DNS, _GN_URI = 0x82, 0x86

_SAN, _BASIC_CONSTRAINTS, _KEY_USAGE, _EKU = "2.5.29.17", "2.5.29.19", "2.5.29.15", "2.5.29.37"
SERVER_AUTH, CLIENT_AUTH = "1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"
# keyUsage bit numbers (RFC 5280 4.2.1.3).
_DIGITAL_SIGNATURE, _KEY_CERT_SIGN, _CRL_SIGN = 0, 5, 6
# RFC 4514's short names for the attribute types certificates here use.
_ATTR_NAMES = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.9": "STREET",
               "2.5.4.10": "O", "2.5.4.11": "OU", "0.9.2342.19200300.100.1.25": "DC",
               "0.9.2342.19200300.100.1.1": "UID"}
_MAX_CERT_BYTES = 64 * 1024

PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----", re.S)


class _Bad(Exception):
    """Malformed DER; turned into a CertificateError naming the input by the caller."""


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER element at ``pos``: (tag, start of contents, end of contents)."""
    if pos + 2 > end:
        raise _Bad("truncated element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _Bad("high tag numbers are not used in certificates")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0:
            raise _Bad("indefinite length (BER, not DER)")
        if n > 4 or pos + n > end:
            raise _Bad("length out of range")
        length = int.from_bytes(buf[pos : pos + n], "big")
        if buf[pos] == 0 or length < 0x80:
            raise _Bad("length not minimally encoded (BER, not DER)")
        pos += n
    if pos + length > end:
        raise _Bad("element runs past its container")
    return tag, pos, pos + length


def _expect(buf: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    got, start, stop = _tlv(buf, pos, end)
    if got != tag:
        raise _Bad(f"{what}: expected tag 0x{tag:02x}, found 0x{got:02x}")
    return start, stop


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _tlv(buf, pos, end)
        out.append((tag, s, e))
        pos = e
    return out


def _oid(raw: bytes) -> str:
    if not raw or raw[-1] & 0x80:
        raise _Bad("malformed object identifier")
    arcs: list[int] = []
    value = 0
    for i, b in enumerate(raw):
        if value == 0 and b == 0x80 and (i == 0 or raw[i - 1] & 0x80 == 0):
            raise _Bad("object identifier arc not minimally encoded")
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _time(tag: int, raw: bytes) -> dt.datetime:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Bad("time is not ASCII") from None
    if tag == _UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text  # RFC 5280 4.1.2.5.1
    elif not (tag == _GEN_TIME and re.fullmatch(r"\d{14}Z", text)):
        raise _Bad(f"time {text!r} is not in the form RFC 5280 requires")
    # The fields by position, not strptime: _strptime brings calendar and its locale tables (~0.15
    # MiB of a meshed proxy's RSS) for one fixed format whose digits the match above already checked.
    try:
        return dt.datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[8:10]), int(text[10:12]),
                           int(text[12:14]), tzinfo=dt.UTC)
    except ValueError:
        raise _Bad(f"time {text!r} is not a date") from None


def _string(tag: int, raw: bytes) -> str:
    try:
        if tag == _BMP:
            return raw.decode("utf-16-be")
        if tag == _UNIVERSAL:
            return raw.decode("utf-32-be")
        if tag == _T61:
            return raw.decode("latin-1")
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("undecodable string in a name") from None


def _escape_rdn_value(v: str) -> str:
    out = re.sub(r'([\\,+"<>;=])', r"\\\1", v)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


def _name(buf: bytes, start: int, end: int) -> str:
    """An X.501 Name as RFC 4514 prints it (last RDN first)."""
    rdns = []
    for tag, s, e in _children(buf, start, end):
        if tag != _SET:
            raise _Bad("name: expected a SET of attributes")
        parts = []
        for atag, a_s, a_e in _children(buf, s, e):
            if atag != _SEQUENCE:
                raise _Bad("name: expected an attribute SEQUENCE")
            kids = _children(buf, a_s, a_e)
            if len(kids) != 2 or kids[0][0] != _OID:
                raise _Bad("name: malformed attribute")
            oid = _oid(buf[kids[0][1] : kids[0][2]])
            vtag, v_s, v_e = kids[1]
            label = _ATTR_NAMES.get(oid, oid)
            if vtag in (_UTF8, _PRINTABLE, _T61, _IA5, _BMP, _UNIVERSAL):
                parts.append(f"{label}={_escape_rdn_value(_string(vtag, buf[v_s:v_e]))}")
            else:
                parts.append(f"{label}=#{_element(buf, v_s, v_e).hex()}")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns))


def _boolean(raw: bytes) -> bool:
    if raw == b"\xff":
        return True
    if raw == b"\x00":
        return False
    raise _Bad("BOOLEAN is not 0x00 or 0xff (BER, not DER)")


@dataclass(frozen=True, slots=True)
class CertView:
    """What a proxy reads from one X.509 certificate. Field names follow cryptography's, so the two read alike."""

    der: bytes
    subject: str
    issuer: str
    subject_der: bytes
    issuer_der: bytes
    not_valid_before_utc: dt.datetime
    not_valid_after_utc: dt.datetime
    spki_der: bytes
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    other_names: int  # SAN entries that are neither DNS nor URI
    is_ca: bool
    key_usage: frozenset[int] | None  # bit numbers, None without the extension
    key_usage_critical: bool
    extended_key_usage: frozenset[str] | None  # OIDs, None without the extension

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER encoding, hex, as ``openssl x509 -fingerprint -sha256`` shows it."""
        import hashlib  # here: hashlib loads OpenSSL's digests (~0.7 MiB of RSS) into the meshed proxy

        return hashlib.sha256(self.der).hexdigest()

    def pem(self) -> bytes:
        body = base64.encodebytes(self.der).replace(b"\n", b"")
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return PEM_CERT_BEGIN + b"\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def _extensions(buf: bytes, start: int, end: int) -> dict[str, tuple[bool, bytes]]:
    seq_s, seq_e = _expect(buf, start, end, _SEQUENCE, "extensions")
    if seq_e != end:
        raise _Bad("bytes after the extensions")
    out: dict[str, tuple[bool, bytes]] = {}
    for tag, s, e in _children(buf, seq_s, seq_e):
        if tag != _SEQUENCE:
            raise _Bad("extension: expected a SEQUENCE")
        kids = _children(buf, s, e)
        if len(kids) == 2:
            (otag, o_s, o_e), (vtag, v_s, v_e) = kids
            critical = False
        elif len(kids) == 3:
            (otag, o_s, o_e), (ctag, c_s, c_e), (vtag, v_s, v_e) = kids
            if ctag != _BOOLEAN:
                raise _Bad("extension: critical is not a BOOLEAN")
            critical = _boolean(buf[c_s:c_e])
            if not critical:
                raise _Bad("extension: critical FALSE must be omitted (DER)")
        else:
            raise _Bad("extension: malformed")
        if otag != _OID or vtag != _OCTET_STRING:
            raise _Bad("extension: malformed")
        oid = _oid(buf[o_s:o_e])
        if oid in out:
            raise _Bad(f"extension {oid} appears twice")
        out[oid] = (critical, buf[v_s:v_e])
    return out


def _sans(raw: bytes) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    s, e = _expect(raw, 0, len(raw), _SEQUENCE, "subjectAltName")
    if e != len(raw):
        raise _Bad("bytes after subjectAltName")
    dns: list[str] = []
    uris: list[str] = []
    others = 0
    for tag, a, b in _children(raw, s, e):
        if tag in (_GN_DNS, _GN_URI):
            try:
                value = raw[a:b].decode("ascii")
            except UnicodeDecodeError:
                raise _Bad("subjectAltName: a DNS name or URI is not IA5 (ASCII)") from None
            (dns if tag == _GN_DNS else uris).append(value)
        else:
            others += 1
    return tuple(dns), tuple(uris), others


def _basic_constraints_ca(raw: bytes) -> bool:
    s, e = _expect(raw, 0, len(raw), _SEQUENCE, "basicConstraints")
    if e != len(raw):
        raise _Bad("bytes after basicConstraints")
    kids = _children(raw, s, e)
    if kids and kids[0][0] == _BOOLEAN:
        ca = _boolean(raw[kids[0][1] : kids[0][2]])
        if not ca:
            raise _Bad("basicConstraints: cA FALSE must be omitted (DER)")
        return True
    return False


def _key_usage(raw: bytes) -> frozenset[int]:
    s, e = _expect(raw, 0, len(raw), _BIT_STRING, "keyUsage")
    if e != len(raw) or e - s < 1 or raw[s] > 7 or (e - s == 1 and raw[s] != 0):
        raise _Bad("keyUsage: malformed BIT STRING")
    bits = set()
    for i, byte in enumerate(raw[s + 1 : e]):
        for j in range(8):
            if byte & (0x80 >> j):
                bits.add(8 * i + j)
    return frozenset(bits)


def _eku(raw: bytes) -> frozenset[str]:
    s, e = _expect(raw, 0, len(raw), _SEQUENCE, "extendedKeyUsage")
    if e != len(raw):
        raise _Bad("bytes after extendedKeyUsage")
    oids = set()
    for tag, a, b in _children(raw, s, e):
        if tag != _OID:
            raise _Bad("extendedKeyUsage: expected object identifiers")
        oids.add(_oid(raw[a:b]))
    return frozenset(oids)


def _parse(der: bytes) -> CertView:
    if len(der) > _MAX_CERT_BYTES:
        raise _Bad(f"{len(der)} bytes, more than the {_MAX_CERT_BYTES} allowed")
    cs, ce = _expect(der, 0, len(der), _SEQUENCE, "certificate")
    if ce != len(der):
        raise _Bad("bytes after the certificate")
    top = _children(der, cs, ce)
    if len(top) != 3 or [t for t, _, _ in top] != [_SEQUENCE, _SEQUENCE, _BIT_STRING]:
        raise _Bad("not a Certificate (tbsCertificate, signatureAlgorithm, signatureValue)")
    _, ts, te = top[0]
    fields = _children(der, ts, te)
    i = 0
    version = 0
    if fields and fields[0][0] == _EXPLICIT_0:
        vs, ve = _expect(der, fields[0][1], fields[0][2], _INTEGER, "version")
        if ve != fields[0][2] or ve - vs != 1:
            raise _Bad("malformed version")
        version = der[vs]
        i = 1
    if version != 2:
        raise _Bad("not an X.509 v3 certificate")
    want = [_INTEGER, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE]
    if [t for t, _, _ in fields[i : i + 6]] != want:
        raise _Bad("tbsCertificate: serial, signature, issuer, validity, subject, subjectPublicKeyInfo expected")
    _serial, _sig, (_, is_, ie), (_, vs, ve), (_, ss, se), (_, ps, pe) = fields[i : i + 6]
    validity = _children(der, vs, ve)
    if len(validity) != 2 or any(t not in (_UTC_TIME, _GEN_TIME) for t, _, _ in validity):
        raise _Bad("validity: expected notBefore and notAfter")
    not_before = _time(validity[0][0], der[validity[0][1] : validity[0][2]])
    not_after = _time(validity[1][0], der[validity[1][1] : validity[1][2]])
    rest = fields[i + 6 :]
    exts: dict[str, tuple[bool, bytes]] = {}
    for tag, s, e in rest:
        if tag == _EXPLICIT_3:
            exts = _extensions(der, s, e)
        elif tag not in (_EXPLICIT_1_IMPLICIT, _EXPLICIT_2_IMPLICIT):
            raise _Bad(f"tbsCertificate: unexpected field 0x{tag:02x}")
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    others = 0
    if _SAN in exts:
        dns, uris, others = _sans(exts[_SAN][1])
    ku_critical, ku_raw = exts.get(_KEY_USAGE, (False, b""))
    return CertView(
        der=der,
        subject=_name(der, ss, se),
        issuer=_name(der, is_, ie),
        subject_der=der[ss:se],
        issuer_der=der[is_:ie],
        not_valid_before_utc=not_before,
        not_valid_after_utc=not_after,
        spki_der=_element(der, ps, pe),
        dns_names=dns,
        uris=uris,
        other_names=others,
        is_ca=_basic_constraints_ca(exts[_BASIC_CONSTRAINTS][1]) if _BASIC_CONSTRAINTS in exts else False,
        key_usage=_key_usage(ku_raw) if _KEY_USAGE in exts else None,
        key_usage_critical=ku_critical,
        extended_key_usage=_eku(exts[_EKU][1]) if _EKU in exts else None,
    )


def _element(buf: bytes, start: int, end: int) -> bytes:
    """The whole encoding (header included) of the element whose contents are buf[start:end]."""
    length = end - start
    header = 2 if length < 0x80 else 2 + (length.bit_length() + 7) // 8
    return buf[start - header : end]


def parse_der(der: bytes, source: str) -> CertView:
    """Read one DER certificate; ``source`` names it in errors."""
    try:
        return _parse(bytes(der))
    except _Bad as e:
        raise CertificateError(f"{source}: not a DER X.509 certificate: {e}") from None
    except (IndexError, ValueError) as e:  # belt and braces: malformed input never escapes as anything else
        raise CertificateError(f"{source}: not a DER X.509 certificate: {e}") from None


def parse_pem(data: bytes, source: str) -> list[CertView]:
    """Read every PEM certificate in ``data``; ``source`` names the input in errors."""
    if PEM_CERT_BEGIN not in data:
        raise CertificateError(f"{source}: no PEM certificate found (expected '-----BEGIN CERTIFICATE-----')")
    blocks = _PEM_BLOCK.findall(data)
    if len(blocks) != data.count(PEM_CERT_BEGIN):
        raise CertificateError(f"{source}: cannot parse PEM certificates: a certificate block is not closed")
    out = []
    for n, body in enumerate(blocks, 1):
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise CertificateError(f"{source}: cannot parse PEM certificates: certificate {n} is not base64") from None
        out.append(parse_der(der, f"{source} (certificate {n})"))
    return out


def certificates_pem(certs: Sequence[CertView]) -> bytes:
    return b"".join(c.pem() for c in certs)


def fmt_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(cert: CertView, role: str = "certificate") -> str:
    """One phrase naming a certificate: role, subject, fingerprint prefix and validity dates."""
    subject = cert.subject or "<empty subject>"
    return (
        f"{role} {subject!r} (sha256 {cert.fingerprint[:16]}, valid "
        f"{fmt_time(cert.not_valid_before_utc)} to {fmt_time(cert.not_valid_after_utc)})"
    )


def validity_problem(cert: CertView, now: dt.datetime, role: str) -> str | None:
    """Why ``cert`` is not valid at ``now`` (a full sentence), or None."""
    if now < cert.not_valid_before_utc:
        return f"{describe(cert, role)} is not valid yet at {fmt_time(now)}"
    if now >= cert.not_valid_after_utc:
        return f"{describe(cert, role)} expired at {fmt_time(cert.not_valid_after_utc)}"
    return None


def check_leaf_profile(cert: CertView) -> None:
    """Check a leaf against the SPIFFE X.509-SVID rules, as ``certs.check_leaf_profile`` does."""
    # Named only when refused: describe() hashes the certificate, and hashlib costs the meshed proxy
    # ~0.7 MiB of RSS (OpenSSL's digests) that a good leaf never needs.
    def name() -> str:
        return describe(cert, "leaf")

    if len(cert.uris) != 1:
        raise CertificateError(f"{name()} must carry exactly one URI SAN (its SPIFFE id), has {len(cert.uris)}")
    if cert.is_ca:
        raise CertificateError(f"{name()} has basicConstraints cA=true; a leaf SVID must not be a CA")
    if cert.key_usage is None:
        raise CertificateError(f"{name()} has no keyUsage extension; an SVID needs critical digitalSignature")
    if not cert.key_usage_critical or _DIGITAL_SIGNATURE not in cert.key_usage:
        raise CertificateError(f"{name()}: keyUsage must be critical and include digitalSignature")
    if cert.key_usage & {_KEY_CERT_SIGN, _CRL_SIGN}:
        raise CertificateError(f"{name()}: keyUsage must not include keyCertSign or cRLSign")
    eku = cert.extended_key_usage
    if eku is not None and not {SERVER_AUTH, CLIENT_AUTH} <= eku:
        raise CertificateError(f"{name()}: extendedKeyUsage must include serverAuth and clientAuth")


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """Trust anchors read without cryptography: one or more CA certificates, each once, in file order."""

    anchors: tuple[CertView, ...]

    @classmethod
    def from_pem(cls, data: bytes, source: str = "trust anchors") -> TrustAnchors:
        certs = parse_pem(data, source)
        for c in certs:
            if not c.is_ca:
                raise CertificateError(not_a_ca_anchor(source, describe(c, "anchor")))
        seen: set[bytes] = set()  # by DER, as a fingerprint would, without hashing each anchor
        unique = []
        for c in certs:
            if c.der not in seen:
                seen.add(c.der)
                unique.append(c)
        return cls(tuple(unique))

    def pem(self) -> bytes:
        return certificates_pem(self.anchors)

    def issuers_of(self, cert: CertView) -> list[CertView]:
        """Anchors whose subject is ``cert``'s issuer (by name: the signature is OpenSSL's to check)."""
        return [a for a in self.anchors if a.subject_der == cert.issuer_der]
