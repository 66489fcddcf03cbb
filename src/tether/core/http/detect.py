"""Protocol detection from a connection's first bytes (sans-I/O).

``detect(prefix, limit)`` says what the bytes so far are: HTTP/2 prior knowledge (the
connection preface), HTTP/1, a TLS ClientHello, opaque TCP, or that more bytes are needed.

What "looks like HTTP/1" means (after the empty lines RFC 9112 section 2.2 lets a server skip):

- a registered method in upper case (``GET``, ``POST``, ... see ``_METHODS``) followed by a space
  or a tab: no other protocol a client speaks first opens that way;
- or any token followed by whitespace and the start of a request target: ``/``, ``*`` or
  ``http://`` / ``https://`` (any case);
- or a first line, complete within ``limit`` bytes, that carries `` HTTP/`` (a version).

Such bytes are HTTP even when the request line is malformed: the HTTP/1 server then answers 400
(or 505), instead of forwarding them to the application as they are. Anything else is opaque TCP
once its first line is complete or ``limit`` bytes have come, as in linkerd2-proxy. Ports marked
opaque never reach detection, so their bytes are never judged as HTTP.
"""

from __future__ import annotations

import enum
from typing import Final

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 token characters (for the method).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_MAX_METHOD = 32
# RFC 9110 section 9 and the IANA method registry entries clients actually send (WebDAV, PATCH).
_METHODS: Final = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH", b"QUERY", b"PURGE",
})
_TARGET_STARTS: Final = (b"/", b"*", b"http://", b"https://")
# At most this many empty lines before the request line are skipped (RFC 9112 2.2: at least one).
_MAX_EMPTY_LINES = 4


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
    """True when ``prefix`` may still become an HTTP/1 request line (detection needs more)."""
    return bool(prefix) and detect(prefix) is Detected.NEED_MORE


def _skip_empty_lines(data: bytes) -> int | None:
    """The offset after leading empty lines; None when the bytes so far are all line ends."""
    pos = 0
    for _ in range(_MAX_EMPTY_LINES):
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
        else:
            break
    if pos == len(data) or data[pos:] == b"\r":
        return None
    return pos


def _detect_http1(data: bytes, at_limit: bool) -> Detected:
    start = _skip_empty_lines(data)
    if start is None:
        return Detected.OPAQUE if at_limit else Detected.NEED_MORE
    if data[start] not in _TCHAR and data[start] not in b" \t":
        return Detected.OPAQUE  # neither a token nor whitespace first: not a request line
    # The method: a token, then whitespace.
    end = start
    stop = min(len(data), start + _MAX_METHOD + 1)
    while end < stop and data[end] in _TCHAR:
        end += 1
    if end - start > _MAX_METHOD:
        return Detected.OPAQUE  # longer than any method
    method = data[start:end]
    if end < len(data) and method and data[end] in b" \t":
        if method in _METHODS:
            return Detected.HTTP1
        rest = data[end + 1 : end + 9].lower()
        if any(rest.startswith(t) for t in _TARGET_STARTS):
            return Detected.HTTP1
        if any(t.startswith(rest) for t in _TARGET_STARTS):
            return Detected.OPAQUE if at_limit else Detected.NEED_MORE
    # Otherwise only a version on the first line makes it HTTP (a malformed request line).
    eol = data.find(b"\n", start)
    line = data[start:] if eol < 0 else data[start:eol]
    if b" HTTP/" in line:
        return Detected.HTTP1
    if eol >= 0 or at_limit:
        return Detected.OPAQUE
    return Detected.NEED_MORE


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


def client_hello_extensions(data: bytes) -> frozenset[int] | None:
    """The extension types of a complete TLS ClientHello record, None if it is not one."""
    if len(data) < 5 or data[0] != 0x16 or data[1] != 0x03:
        return None
    rec_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + rec_len:
        return None
    try:
        pos, end, hs = _extensions_start(data[5 : 5 + rec_len])
    except (IndexError, ValueError):
        return None
    types = set()
    while pos + 4 <= end:
        types.add(int.from_bytes(hs[pos : pos + 2], "big"))
        pos += 4 + int.from_bytes(hs[pos + 2 : pos + 4], "big")
    if pos != end:
        return None
    return frozenset(types)


def _extensions_start(hs: bytes) -> tuple[int, int, bytes]:
    """(offset of the first extension, offset of their end, hs) in a ClientHello handshake message."""
    if hs[0] != 0x01:  # ClientHello
        raise ValueError("not a ClientHello")
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    pos += 1 + hs[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(hs[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + hs[pos]  # legacy_compression_methods
    if pos == len(hs):
        return pos, pos, hs
    ext_total = int.from_bytes(hs[pos : pos + 2], "big")
    pos += 2
    if pos + ext_total > len(hs):
        raise ValueError("extensions overrun")
    return pos, pos + ext_total, hs


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
