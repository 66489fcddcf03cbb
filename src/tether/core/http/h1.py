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

from typing import Any, Final

from mypy_extensions import i64

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


def _digits(text: bytes) -> int:
    """The value of 1 to 18 ASCII digits; -1 when ``text`` is anything else."""
    n = len(text)
    if n == 0 or n > 18:
        return -1
    value = 0
    for i in range(n):
        c = text[i]
        if c < 0x30 or c > 0x39:
            return -1
        value = value * 10 + (c - 0x30)
    return value


def _content_length(values: list[bytes]) -> int:
    if len(values) == 1:
        n = _digits(values[0])
        if n >= 0:
            return n  # the common case
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
# The method is a token (RFC 9110 section 5.6.2); the target is visible ASCII without "#" (a
# fragment is never sent, RFC 9110 section 4.2.4). RFC 3986 host: an IP-literal in brackets or a
# reg-name/IPv4 (unreserved, pct-encoded, sub-delims), then an optional port; no userinfo ("@"),
# no path, no whitespace. Checked byte by byte against these tables: compiled, a loop over a short
# line costs a fraction of a regular expression's match (and of bytes.find's argument parsing).


def _table(allowed: bytes) -> bytes:
    t = bytearray(256)
    for c in allowed:
        t[c] = 1
    return bytes(t)


_ALNUM: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR: Final = _table(b"!#$%&'*+-.^_`|~" + _ALNUM)
_TARGET: Final = _table(bytes(c for c in range(0x21, 0x7F) if c != 0x23))
_REG_NAME: Final = _table(b"-._~%!$&'()*+,;=" + _ALNUM)
_IP_LITERAL: Final = _table(b"0123456789ABCDEFabcdef:.vV")
# Past this many bytes the end of a line is searched with bytes.find (memchr), not byte by byte.
_SCAN_LIMIT: Final = 256


def find_lf(data: bytes, start: int) -> int:
    """Index of the first LF at or after ``start`` (-1: none)."""
    n = len(data)
    end = min(n, start + _SCAN_LIMIT)
    i = start
    while i < end:
        if data[i] == 0x0A:
            return i
        i += 1
    return data.find(b"\n", end) if end < n else -1


# The common head, parsed here rather than by llhttp (each llhttp callback into Python costs as much
# as parsing a whole field line in compiled code). Only a subset of what llhttp accepts is taken:
# field lines "name:" OWS value CRLF, names of tchars, values of HTAB, SP, visible ASCII and
# obs-text, as llhttp reads them (leading OWS dropped, trailing kept). Anything else, and every
# field llhttp acts on itself, is left to llhttp: the fast path never judges a head llhttp would.
_FIELD_VALUE: Final = _table(b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)))
# Fields llhttp interprets (framing, connection management, upgrades).
LLHTTP_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding", b"connection", b"proxy-connection",
                                  b"upgrade"})
# ... less Content-Length, which a response's fast path reads itself (check_response_head).
LLHTTP_RESPONSE_FIELDS: Final = frozenset({b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade"})




def _field_names(names: tuple[bytes, ...]) -> list[list[tuple[bytes, bytes]]]:
    """Spellings of ``names`` (Title-Case, lower, upper) and their lower-case name, by length."""
    by_length: list[list[tuple[bytes, bytes]]] = [[] for _ in range(_NAME_MAX + 1)]
    for name in names:
        title = b"-".join(p.capitalize() for p in name.split(b"-"))
        for spelling in dict.fromkeys((title, name, name.upper(), b"ETag" if name == b"etag" else title)):
            by_length[len(spelling)].append((spelling, name))
    return by_length


# Common field names as clients and servers spell them, to their lower-case form, by length: a few
# byte compares instead of a .lower() call (or a dict lookup, which hashes the fresh slice), and the
# name is then a shared object whose hash is cached (the set lookups after it cost no hashing).
_NAME_MAX: Final = 20
_FIELD_NAMES: Final = _field_names((
    b"host", b"user-agent", b"accept", b"content-type", b"content-length", b"date", b"server",
    b"accept-encoding", b"accept-language", b"accept-ranges", b"authorization", b"cache-control",
    b"content-encoding", b"cookie", b"etag", b"expires", b"last-modified", b"location", b"origin", b"pragma",
    b"referer", b"set-cookie", b"vary", b"via", b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id",
    b"traceparent", b"tracestate", b"grpc-timeout", b"l5d-dst-override", b"connection", b"keep-alive", b"te",
    b"transfer-encoding", b"upgrade", b"expect", b"if-none-match", b"if-modified-since",
))


def field_name(data: bytes, start: int, end: int) -> bytes:
    """The lower-case name of the field name ``data[start:end]`` (a shared object when common)."""
    raw = data[start:end]
    n = end - start
    if n <= _NAME_MAX:
        for spelling, name in _FIELD_NAMES[n]:
            if spelling == raw:
                return name
    return raw.lower()


def _refusable(name: bytes) -> bool:
    """Could ``name`` (lower-case) be one of LLHTTP_FIELDS? Most names are ruled out without hashing."""
    n = len(name)
    c = name[0]
    return (c == 0x63 and (n == 10 or n == 14)) or (c == 0x70 and n == 16) or (c == 0x74 and n == 17) \
        or (c == 0x75 and n == 7)


def _bind_scan() -> Any:
    """The C scanner of field lines (``tether.core.http._h1scan``, built by scripts/build-native with
    the compiled modules) bound to the common names, or None: not built, or built from other
    sources (then the sources run interpreted too: ``tether.native``). Loaded by the first head
    parsed, not at import: a proxy that serves no HTTP/1 keeps its ~0.1 MiB."""
    global _scan
    from tether import native

    _scan = None
    if native.state != "compiled":
        return None
    try:
        from tether.core.http import _h1scan  # type: ignore[attr-defined]
    except ImportError:
        return None
    _h1scan.bind(_FIELD_NAMES)
    _scan = _h1scan
    return _h1scan


_scan: Any = False  # the bound scanner, None where there is none; False until the first head


def parse_fields(data: bytes, start: int, out: Headers, refused: frozenset[bytes]) -> int:
    """Append the field lines of ``data`` from ``start`` through the empty line to ``out`` (names
    lower-case); return the index after the empty line. -1: not the simple case (the head is for
    llhttp), including a field named in ``refused``. (On -1, ``out`` may hold the lines before.)"""
    scan = _scan
    if scan is False:
        scan = _bind_scan()
    if scan is not None:
        found: int = scan.parse_fields(data, start, out, refused)
        return found
    return parse_fields_reference(data, start, out, refused)


def parse_fields_reference(data: bytes, start: int, out: Headers, refused: frozenset[bytes]) -> int:
    """:func:`parse_fields` in Python: what runs where the C scanner (``_h1scan.c``) is not built,
    and the reference the tests hold it to."""
    # i64 indexes: compiled, a tagged int costs a call per addition (a third of the loop's cost).
    n: i64 = len(data)
    i: i64 = start
    while i + 1 < n:
        if data[i] == 0x0D:
            return i + 2 if data[i + 1] == 0x0A else -1
        j: i64 = i
        while j < n and _TCHAR[data[j]]:
            j += 1
        if j == i or j >= n or data[j] != 0x3A:
            return -1
        name = field_name(data, i, j)
        if _refusable(name) and name in refused:
            return -1
        j += 1
        while j < n and (data[j] == 0x20 or data[j] == 0x09):
            j += 1
        v: i64 = j
        while j < n and _FIELD_VALUE[data[j]]:
            j += 1
        if j + 1 >= n or data[j] != 0x0D or data[j + 1] != 0x0A:
            return -1
        out.append((name, data[v:j]))
        i = j + 2
    return -1


def simple_content_length(headers: Headers) -> int:
    """The Content-Length of a response head with exactly one, of 1 to 18 digits (what llhttp reads
    without objection); -1 otherwise (none, several, or any other value): the head is for llhttp."""
    length = -1
    for k, v in headers:
        if k == b"content-length":
            if length >= 0:
                return -1
            length = _digits(v)
            if length < 0:
                return -1
    return length


def parse_status_line(data: bytes) -> tuple[int, int]:
    """The status code of a response that starts ``HTTP/1.1 NNN SP reason CRLF`` (a status of 200
    to 999 that may have a body: not 204 or 304; a reason of field-value bytes) and the index after
    that CRLF; (-1, -1) otherwise: the head is for llhttp."""
    n: i64 = len(data)
    if n < 15 or data[0] != 0x48 or data[1] != 0x54 or data[2] != 0x54 or data[3] != 0x50 or data[4] != 0x2F \
            or data[5] != 0x31 or data[6] != 0x2E or data[7] != 0x31 or data[8] != 0x20 or data[12] != 0x20:
        return -1, -1
    status = 0
    for k in range(9, 12):
        c = data[k]
        if c < 0x30 or c > 0x39:
            return -1, -1
        status = status * 10 + (c - 0x30)
    if status < 200 or status == 204 or status == 304:
        return -1, -1
    i: i64 = 13
    while i < n and _FIELD_VALUE[data[i]]:
        i += 1
    if i + 1 >= n or data[i] != 0x0D or data[i + 1] != 0x0A:
        return -1, -1
    return status, i + 2


def check_request_line(line: bytes) -> int:
    """Validate one request line (without its LF) against RFC 9112 section 3; raise :class:`H1Error`.
    Returns the method's length.

    The line must end in CR (the LF was the delimiter): a bare LF is not a line ending here.
    """
    n = len(line)
    i = 0
    while i < n and _TCHAR[line[i]]:
        i += 1
    if i == 0 or i == n or line[i] != 0x20:
        raise H1Error(400, "malformed request line")
    method_length = i
    i += 1
    target = i
    while i < n and _TARGET[line[i]]:
        i += 1
    # What is left must be exactly " HTTP/" DIGIT "." DIGIT CR.
    if i == target or n - i != 10 or line[i:i + 6] != b" HTTP/" or not 0x30 <= line[i + 6] <= 0x39 \
            or line[i + 7] != 0x2E or not 0x30 <= line[i + 8] <= 0x39 or line[i + 9] != 0x0D:
        raise H1Error(400, "malformed request line")
    if line[i + 6] != 0x31:
        raise H1Error(505, "HTTP version not supported")
    return method_length


# Methods llhttp knows (it refuses any other token) that the fast path takes; CONNECT is llhttp's.
_LLHTTP_METHODS: Final = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"})


def fast_request_target(method: bytes, target: bytes) -> bool:
    """May the fast path take a request with this method and target (llhttp accepts both)? An
    origin-form target and one of the usual methods; anything else is llhttp's to judge."""
    return target[:1] == b"/" and (method == b"GET" or method in _LLHTTP_METHODS)


def request_line_end(data: bytes) -> tuple[int, int]:
    """For a read that starts with a whole, valid ``method SP target SP HTTP/1.x CRLF`` line: the
    method's length and the index of the line's LF, in one scan. (0, -1) for anything else (an
    incomplete line, a malformed one, another version): check_request_line judges those."""
    n: i64 = len(data)
    i: i64 = 0
    while i < n and _TCHAR[data[i]]:
        i += 1
    if i == 0 or i >= n or data[i] != 0x20:
        return 0, -1
    method_length = i
    i += 1
    target: i64 = i
    while i < n and _TARGET[data[i]]:
        i += 1
    if i == target or n - i < 11 or data[i] != 0x20 or data[i + 1] != 0x48 or data[i + 2] != 0x54 \
            or data[i + 3] != 0x54 or data[i + 4] != 0x50 or data[i + 5] != 0x2F or data[i + 6] != 0x31 \
            or data[i + 7] != 0x2E or not 0x30 <= data[i + 8] <= 0x39 or data[i + 9] != 0x0D or data[i + 10] != 0x0A:
        return 0, -1
    return method_length, i + 10


def check_host(value: bytes) -> None:
    """Validate a Host value (RFC 9110 section 7.2): ``uri-host [ ":" port ]``, no userinfo."""
    n = len(value)
    i = 0
    ok = True
    if n and value[0] == 0x5B:  # "[": an IP-literal
        i = 1
        while i < n and _IP_LITERAL[value[i]]:
            i += 1
        ok = 1 < i < n and value[i] == 0x5D
        i += 1
    else:
        while i < n and _REG_NAME[value[i]]:
            i += 1
    if ok and i < n:
        ok = value[i] == 0x3A  # ":" port
        i += 1
        while i < n and 0x30 <= value[i] <= 0x39:
            i += 1
        ok = ok and i == n
    if not ok:
        # (Not `b"@" in value`: in compiled code `bytes in bytes` first tries the operand as an
        # index and raises and clears a TypeError.)
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


# Status lines of HTTP/1.1 responses, built once (a response head is written per request).
_STATUS_LINES: Final = {status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in REASONS.items()}


def _head(parts: list[bytes], headers: Headers, framing: Framing | None) -> bytes:
    # One piece per line, joined once: compiled, a "%b" format builds a line in one allocation,
    # cheaper than four pieces (each a list append, a buffer export and release in the join).
    for k, v in headers:
        parts.append(b"%b: %b\r\n" % (k, v))
    if framing is not None and framing.chunked:
        parts.append(b"transfer-encoding: chunked\r\n\r\n")
    elif framing is not None and framing.content_length is not None:
        parts.append(b"content-length: %d\r\n\r\n" % framing.content_length)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_request_head(
    method: bytes, target: bytes, version: str, headers: Headers, framing: Framing, host: bytes | None = None
) -> bytes:
    """Serialise a request head; ``headers`` must already be free of framing headers. ``host``:
    a Host header written first."""
    if version == "1.1":
        first = b"%b %b HTTP/1.1\r\n" % (method, target)
    else:
        first = b"%b %b HTTP/%b\r\n" % (method, target, version.encode())
    parts = [first] if host is None else [first, b"host: %b\r\n" % host]
    return _head(parts, headers, framing)


def encode_response_head(status: int, version: str, headers: Headers, framing: Framing | None) -> bytes:
    """Serialise a response head; ``framing`` None writes no framing header (close-delimited)."""
    first = _STATUS_LINES.get(status) if version == "1.1" else None
    if first is None:
        reason = REASONS.get(status, b"Status")
        first = b"HTTP/" + version.encode() + b" " + str(status).encode() + b" " + reason + b"\r\n"
    return _head([first], headers, framing)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"


FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})
