"""Protocol detection from a connection's first bytes (sans-I/O).

``detect(prefix, limit)`` says what the bytes so far are: HTTP/2 prior knowledge (the
connection preface), HTTP/1 (a plausible request line), a TLS ClientHello, opaque TCP, or that
more bytes are needed. Like linkerd2-proxy, anything that is not recognisably HTTP within
``limit`` bytes is opaque.
"""

from __future__ import annotations

import enum

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 token characters (for the method).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_MAX_METHOD = 32


class Detected(enum.Enum):
    NEED_MORE = "need-more"
    HTTP1 = "http/1"
    H2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


def detect(prefix: bytes, limit: int = 1024) -> Detected:
    """Classify the first bytes of a connection."""
    if not prefix:
        return Detected.NEED_MORE
    n = min(len(prefix), len(H2_PREFACE))
    if prefix[:n] == H2_PREFACE[:n]:
        # "PRI * HTTP/2.0" is also a syntactically valid HTTP/1 request line; the full
        # preface decides.
        return Detected.H2 if n == len(H2_PREFACE) else Detected.NEED_MORE
    if prefix[0] == 0x16:
        if len(prefix) < 3:
            return Detected.NEED_MORE
        return Detected.TLS if prefix[1] == 0x03 else Detected.OPAQUE
    return _detect_http1(prefix[:limit], len(prefix) >= limit)


def looks_like_http1_prefix(prefix: bytes) -> bool:
    """True when ``prefix`` is an incomplete but so far valid HTTP/1 request line."""
    return bool(prefix) and prefix[0] in _TCHAR and detect(prefix) is Detected.NEED_MORE


def _detect_http1(data: bytes, at_limit: bool) -> Detected:
    # METHOD SP request-target SP HTTP/1.x CRLF
    sp = data.find(b" ", 0, _MAX_METHOD + 1)
    method = data if sp < 0 else data[:sp]
    if not all(c in _TCHAR for c in method) or (sp < 0 and len(data) > _MAX_METHOD):
        return Detected.OPAQUE
    if sp == 0:
        return Detected.OPAQUE
    eol = data.find(b"\n")
    if eol < 0:
        return Detected.OPAQUE if at_limit else Detected.NEED_MORE
    line = data[:eol].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        return Detected.OPAQUE
    version = parts[2]
    if version in (b"HTTP/1.1", b"HTTP/1.0"):
        return Detected.HTTP1
    return Detected.OPAQUE


def client_hello_sni(data: bytes) -> str | Detected | None:
    """The SNI server name of a TLS ClientHello, None if it has none, NEED_MORE if truncated.

    Returns ``Detected.OPAQUE`` when the bytes are not a well-formed ClientHello.
    """
    if len(data) < 5:
        return Detected.NEED_MORE
    if data[0] != 0x16 or data[1] != 0x03:
        return Detected.OPAQUE
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        return Detected.NEED_MORE
    body = data[5 : 5 + rec_len]
    try:
        return _parse_sni(body)
    except (IndexError, ValueError):
        return Detected.OPAQUE


def _parse_sni(hs: bytes) -> str | None:
    if hs[0] != 0x01:  # ClientHello
        raise ValueError("not a ClientHello")
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    sid_len = hs[pos]
    pos += 1 + sid_len
    cs_len = int.from_bytes(hs[pos : pos + 2], "big")
    pos += 2 + cs_len
    comp_len = hs[pos]
    pos += 1 + comp_len
    if pos == len(hs):
        return None
    ext_total = int.from_bytes(hs[pos : pos + 2], "big")
    pos += 2
    end = pos + ext_total
    if end > len(hs):
        raise ValueError("extensions overrun")
    while pos + 4 <= end:
        etype = int.from_bytes(hs[pos : pos + 2], "big")
        elen = int.from_bytes(hs[pos + 2 : pos + 4], "big")
        pos += 4
        if etype == 0:  # server_name
            lst = hs[pos : pos + elen]
            p = 2
            while p + 3 <= len(lst):
                ntype = lst[p]
                nlen = int.from_bytes(lst[p + 1 : p + 3], "big")
                name = lst[p + 3 : p + 3 + nlen]
                if len(name) != nlen:
                    raise ValueError("server name overruns")
                if ntype == 0:
                    return name.decode("ascii")
                p += 3 + nlen
            return None
        pos += elen
    return None
