"""HTTP/1.1 message framing rules (RFC 9112), sans-I/O.

The byte-level parser is llhttp (through httptools); this module adds the rules a proxy must
enforce on top of it so that it never forwards an ambiguous message (request smuggling):
Content-Length with Transfer-Encoding, duplicate or invalid Content-Length, a final transfer
coding other than chunked, missing or duplicate Host, a Host or target with userinfo, and a
request line that is not exactly ``method SP request-target SP HTTP-version CRLF`` (llhttp
tolerates repeated spaces there; RFC 9112 section 3 does not). It also serialises heads and
chunks.
"""

from __future__ import annotations

import re
from typing import Final

Headers = list[tuple[bytes, bytes]]

REASONS: Final = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    411: b"Length Required",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    421: b"Misdirected Request",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class H1Error(Exception):
    """A message broke a framing rule. ``status`` is what the proxy answers (requests)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Framing:
    """How a message's body is delimited (immutable)."""

    __slots__ = ("chunked", "content_length")

    def __init__(self, content_length: int | None, chunked: bool) -> None:
        self.content_length: Final = content_length  # None: chunked, or (responses) read until close
        self.chunked: Final = chunked

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Framing) and other.content_length == self.content_length
                and other.chunked == self.chunked)

    def __hash__(self) -> int:
        return hash((self.content_length, self.chunked))

    def __repr__(self) -> str:
        return f"Framing(content_length={self.content_length}, chunked={self.chunked})"


NO_BODY: Final = Framing(0, False)


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])  # the common case
    # RFC 9112 6.3: a list of identical values may be treated as one; anything else is invalid.
    seen: set[bytes] = set()
    for v in values:
        for item in v.split(b","):
            seen.add(item.strip())
    if len(seen) != 1:
        raise H1Error(400, "conflicting Content-Length values")
    (text,) = seen
    if not text.isdigit() or len(text) > 18:
        raise H1Error(400, f"invalid Content-Length {text[:20]!r}")
    return int(text)


def _transfer_codings(values: list[bytes]) -> list[bytes]:
    codings: list[bytes] = []
    for v in values:
        codings.extend(c.strip().lower() for c in v.split(b",") if c.strip())
    return codings


# RFC 9112 section 3: request-line = method SP request-target SP HTTP-version, then CRLF.
# The target is visible ASCII without "#" (a fragment is never sent, RFC 9110 section 4.2.4).
_REQUEST_LINE: Final = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21\x22\x24-\x7e]+ HTTP/([0-9])\.([0-9])\r")
# RFC 3986 host: an IP-literal in brackets or a reg-name/IPv4 (unreserved, pct-encoded, sub-delims),
# then an optional port. No userinfo ("@"), no path, no whitespace.
_HOST: Final = re.compile(rb"(\[[0-9A-Fa-f:.vV]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?")


def check_request_line(line: bytes) -> None:
    """Validate one request line (without its LF) against RFC 9112 section 3; raise :class:`H1Error`.

    The line must end in CR (the LF was the delimiter): a bare LF is not a line ending here.
    """
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise H1Error(400, "malformed request line")
    if m.group(1) != b"1":
        raise H1Error(505, "HTTP version not supported")


def check_host(value: bytes) -> None:
    """Validate a Host value (RFC 9110 section 7.2): ``uri-host [ ":" port ]``, no userinfo."""
    if _HOST.fullmatch(value) is None:  # "@" is outside the pattern: userinfo never matches
        # (The userinfo test comes second: in compiled code `bytes in bytes` first tries the
        # operand as an index and raises and clears a TypeError, which costs more than the regex.)
        raise H1Error(400, "Host carries userinfo" if value.find(b"@") >= 0 else "invalid Host header")


def split_target(method: bytes, target: bytes) -> tuple[bytes, bytes]:
    """The authority (empty if the target has none) and the origin-form path of a request target.

    RFC 9112 section 3.2: origin-form for most requests, absolute-form (``http://host/path``,
    explicit proxy use), authority-form only for CONNECT, asterisk-form only for OPTIONS.
    """
    if method == b"CONNECT":
        if target[:1] == b"/" or b"/" in target or not target:
            raise H1Error(400, "CONNECT target is not host:port")
        check_host(target)
        return target, b""
    first = target[:1]
    if first == b"/":
        return b"", target
    if target == b"*":
        if method != b"OPTIONS":
            raise H1Error(400, "asterisk-form target is only for OPTIONS")
        return b"", target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise H1Error(400, "request target is neither origin-form nor absolute-form")
    end = len(rest)
    for delim in (b"/", b"?"):
        i = rest.find(delim)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        raise H1Error(400, "request target carries userinfo")
    if not authority:
        raise H1Error(400, "absolute-form target without a host")
    check_host(authority)
    if path[:1] != b"/":
        path = b"/" + path
    return authority, path


def check_request_head(version: str, headers: Headers) -> Framing:
    """Validate a request head; return its body framing or raise :class:`H1Error`."""
    hosts = 0
    cl: list[bytes] = []
    te: list[bytes] = []
    for k, v in headers:
        if k == b"host":
            hosts += 1
            check_host(v)
        elif k == b"content-length":
            cl.append(v)
        elif k == b"transfer-encoding":
            te.append(v)
    if version == "1.1" and hosts == 0:
        raise H1Error(400, "missing Host header")
    if hosts > 1:
        raise H1Error(400, "duplicate Host header")
    if te:
        if cl:
            raise H1Error(400, "both Content-Length and Transfer-Encoding")
        if version != "1.1":
            raise H1Error(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _transfer_codings(te)
        if not codings or codings[-1] != b"chunked":
            raise H1Error(400, "final transfer coding is not chunked")
        if codings.count(b"chunked") > 1:
            raise H1Error(400, "chunked applied more than once")
        return Framing(None, True)
    if cl:
        n = _content_length(cl)
        return Framing(n, False) if n else NO_BODY
    return NO_BODY


def check_response_head(status: int, headers: Headers, request_method: bytes) -> Framing:
    """Validate a response head from upstream; raise :class:`H1Error` (the proxy answers 502)."""
    cl: list[bytes] = []
    te: list[bytes] = []
    for k, v in headers:
        if k == b"content-length":
            cl.append(v)
        elif k == b"transfer-encoding":
            te.append(v)
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    if te:
        if cl:
            raise H1Error(502, "upstream sent both Content-Length and Transfer-Encoding")
        codings = _transfer_codings(te)
        if codings and codings[-1] == b"chunked":
            return Framing(None, True)
        return Framing(None, False)  # delimited by close
    if cl:
        try:
            return Framing(_content_length(cl), False)
        except H1Error as e:
            raise H1Error(502, "upstream " + e.reason) from None
    return Framing(None, False)


def _head(first_line: bytes, headers: Headers, extra: bytes) -> bytes:
    parts = [first_line]
    for k, v in headers:
        parts.append(k + b": " + v + b"\r\n")
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_request_head(
    method: bytes, target: bytes, version: str, headers: Headers, framing: Framing
) -> bytes:
    """Serialise a request head; ``headers`` must already be free of framing headers."""
    return _head(method + b" " + target + b" HTTP/" + version.encode() + b"\r\n", headers, _framing(framing))


def encode_response_head(status: int, version: str, headers: Headers, framing: Framing | None) -> bytes:
    """Serialise a response head; ``framing`` None writes no framing header (close-delimited)."""
    reason = REASONS.get(status, b"Status")
    first = b"HTTP/" + version.encode() + b" " + str(status).encode() + b" " + reason + b"\r\n"
    return _head(first, headers, b"" if framing is None else _framing(framing))


def _framing(f: Framing) -> bytes:
    if f.chunked:
        return b"transfer-encoding: chunked\r\n"
    if f.content_length is not None:
        return b"content-length: " + str(f.content_length).encode() + b"\r\n"
    return b""


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"


FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})
