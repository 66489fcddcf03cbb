"""Header conversion between the HTTP/2 field block and the proxy's version-neutral message head.

Pure functions: pseudo-headers in and out, connection-specific fields removed (RFC 9113 section
8.2.2), cookies split and joined (section 8.2.3). No I/O; the HTTP/2 codecs call these.
"""

from __future__ import annotations

from typing import Final

Headers = list[tuple[bytes, bytes]]

# RFC 9113 section 8.2.2: fields that only make sense on one HTTP/1 connection. "te" is allowed
# with the single value "trailers" (gRPC needs it), so it is handled separately.
CONNECTION_SPECIFIC: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        # Not connection-specific by the RFC, but hop-by-hop for a proxy (RFC 9110 section 7.6.1).
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


class H2HeaderError(ValueError):
    """A field block that cannot form a valid request or response head (sent by the peer)."""


class RequestHead:
    """A request's pseudo-headers and regular headers.

    A plain class (not a dataclass): compiled, its constructor is a native call, where a dataclass's
    costs ~2k instructions per request."""

    __slots__ = ("authority", "headers", "method", "path", "scheme")

    def __init__(self, method: bytes, scheme: bytes, authority: bytes, path: bytes, headers: Headers) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.headers = headers

    def __repr__(self) -> str:
        return (f"RequestHead(method={self.method!r}, scheme={self.scheme!r}, authority={self.authority!r}, "
                f"path={self.path!r}, headers={self.headers!r})")


def strip_connection_specific(headers: Headers) -> Headers:
    """Drop fields that may not appear in HTTP/2, keeping ``te: trailers`` only."""
    # The common head (a gRPC call's: ``te: trailers`` and no connection field) needs no copy;
    # it is found with one set lookup per field and no per-call set or token split.
    named: set[bytes] | None = None
    needs_filter = False
    for k, v in headers:
        if k in CONNECTION_SPECIFIC or (k == b"te" and v != b"trailers") or (len(k) and k[0] == 0x3A):
            needs_filter = True
            if k == b"connection":
                if named is None:
                    named = set()
                named.update(t.strip().lower() for t in v.split(b","))
    if not needs_filter:
        return headers
    out: Headers = []
    for k, v in headers:
        if k in CONNECTION_SPECIFIC or (named is not None and k in named) or (len(k) and k[0] == 0x3A):
            continue
        if k == b"te" and v != b"trailers":
            if b"trailers" not in (t.strip().lower() for t in v.split(b",")):
                continue
            v = b"trailers"
        out.append((k, v))
    return out


def parse_request(fields: Headers) -> RequestHead:
    """Split a decoded request field block into pseudo-headers and regular headers."""
    method = scheme = authority = path = None
    headers: Headers = []
    host: bytes | None = None
    for k, v in fields:
        if len(k) and k[0] == 0x3A:  # ":" (a one-byte slice is an allocation)
            if headers:
                raise H2HeaderError("pseudo-header after a regular header")
            if k == b":method":
                method = v
            elif k == b":scheme":
                scheme = v
            elif k == b":authority":
                authority = v
            elif k == b":path":
                path = v
            elif k == b":protocol":
                continue  # extended CONNECT (RFC 8441); not proxied as such
            else:
                raise H2HeaderError(f"unknown pseudo-header {k!r}")
        else:
            if k == b"host" and host is None:
                host = v
            headers.append((k, v))
    if method is None:
        raise H2HeaderError("missing :method")
    if method == b"CONNECT":
        if authority is None:
            raise H2HeaderError("CONNECT without :authority")
        return RequestHead(method, scheme or b"", authority, authority, headers)
    if path is None or path == b"":
        raise H2HeaderError("missing :path")
    if scheme is None:
        raise H2HeaderError("missing :scheme")
    return RequestHead(method, scheme, authority or host or b"", path, headers)


def request_fields(method: bytes, scheme: bytes, authority: bytes, path: bytes, headers: Headers) -> Headers:
    """The HTTP/2 field block for a request: pseudo-headers first, ``host`` folded into ``:authority``."""
    out: Headers = [(b":method", method)]
    if method == b"CONNECT":
        out.append((b":authority", authority))
    else:
        out.append((b":scheme", scheme or b"http"))
        if authority:
            out.append((b":authority", authority))
        out.append((b":path", path or b"/"))
    for k, v in strip_connection_specific(headers):
        if k == b"host":
            if not authority:
                out.insert(2, (b":authority", v))
            continue
        out.append((k, v))
    return out


def response_fields(status: int, headers: Headers) -> Headers:
    """The HTTP/2 field block for a response head."""
    out: Headers = [(b":status", b"200" if status == 200 else str(status).encode())]
    out.extend(strip_connection_specific(headers))
    return out


def _three_digits(v: bytes) -> int:
    """The number three ASCII digits spell, -1 for anything else (``isdigit()`` and ``int()`` are
    generic calls when compiled: ~1k instructions per response)."""
    if len(v) != 3:
        return -1
    a = v[0] - 48
    b = v[1] - 48
    c = v[2] - 48
    if a < 0 or a > 9 or b < 0 or b > 9 or c < 0 or c > 9:
        return -1
    return a * 100 + b * 10 + c


def parse_response(fields: Headers) -> tuple[int, Headers]:
    """Split a response field block into the status code and regular headers."""
    status: int | None = None
    headers: Headers = []
    for k, v in fields:
        if k == b":status":
            status = _three_digits(v)
            if status < 0:
                raise H2HeaderError(f"bad :status {v!r}")
        elif len(k) and k[0] == 0x3A:
            raise H2HeaderError(f"unexpected pseudo-header {k!r} in a response")
        else:
            headers.append((k, v))
    if status is None:
        raise H2HeaderError("missing :status")
    return status, headers


def trailer_fields(trailers: Headers) -> Headers:
    """Trailers as sent on HTTP/2: no pseudo-headers, no connection-specific fields."""
    return [(k, v) for k, v in strip_connection_specific(trailers) if k != b"te"]


def join_cookies(headers: Headers) -> Headers:
    """Join split ``cookie`` fields into one with ``; `` (RFC 9113 section 8.2.3), for HTTP/1."""
    cookies = [v for k, v in headers if k == b"cookie"]
    if len(cookies) < 2:
        return headers
    out: Headers = []
    placed = False
    for k, v in headers:
        if k == b"cookie":
            if not placed:
                out.append((b"cookie", b"; ".join(cookies)))
                placed = True
            continue
        out.append((k, v))
    return out


# -- validation of received field blocks (RFC 9113 section 8.2 and 8.3) -------------------------

FIELDS_REQUEST: Final = 0
FIELDS_RESPONSE: Final = 1
FIELDS_TRAILERS: Final = 2

_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
# RFC 9113 section 8.2.2: these make a message malformed ("te" is allowed as "te: trailers").
_FORBIDDEN: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})


class FieldCheck:
    """What :func:`check_fields` found: ``error`` (None when valid), the content length (-1 when
    absent), the :status of a response (0 otherwise), whether a request is HEAD."""

    __slots__ = ("content_length", "error", "head", "status")

    def __init__(self) -> None:
        self.error: str | None = None
        self.content_length = -1
        self.status = 0
        self.head = False


# Names and values already found valid, so the common fields (the same few on every gRPC call) are
# checked by one set lookup. Bounded: short strings only, and cleared when full.
_CACHE_LIMIT: Final = 4096
_CACHE_MAX_LEN: Final = 128
_good_names: Final[set[bytes]] = set()
_good_values: Final[set[bytes]] = set()


def _name_ok(name: bytes) -> bool:
    """RFC 9113 section 8.2.1: no 0x00-0x20, no uppercase (0x41-0x5A), no 0x7F-0xFF, no colon."""
    if name in _good_names:
        return True
    if not name:
        return False
    for ch in name:  # noqa: SIM110 - a plain loop compiles (mypyc) to a tight C loop
        if ch <= 0x20 or 0x41 <= ch <= 0x5A or ch >= 0x7F or ch == 0x3A:
            return False
    return True


def _remember_name(name: bytes) -> None:
    if len(name) <= _CACHE_MAX_LEN:
        if len(_good_names) >= _CACHE_LIMIT:
            _good_names.clear()
        _good_names.add(name)


def _value_ok(value: bytes) -> bool:
    """RFC 9113 section 8.2.1: no NUL, CR or LF in a field value."""
    if value in _good_values:
        return True
    for ch in value:
        if ch == 0x0D or ch == 0x0A or ch == 0x00:
            return False
    if len(value) <= _CACHE_MAX_LEN:
        if len(_good_values) >= _CACHE_LIMIT:
            _good_values.clear()
        _good_values.add(value)
    return True


def check_fields(fields: Headers, kind: int) -> FieldCheck:
    """Check a received field block against RFC 9113's rules for a request, response or trailers."""
    out = FieldCheck()
    seen_regular = False
    pseudo: set[bytes] = set()
    method = b""
    path: bytes | None = None
    for name, value in fields:
        if not _value_ok(value):
            out.error = f"invalid character in the value of {name!r}"
            return out
        if len(name) and name[0] == 0x3A:
            if seen_regular:
                out.error = "pseudo-header after a regular field"
                return out
            if kind == FIELDS_TRAILERS:
                out.error = f"pseudo-header {name!r} in trailers"
                return out
            if name in pseudo:
                out.error = f"duplicate pseudo-header {name!r}"
                return out
            pseudo.add(name)
            if kind == FIELDS_REQUEST:
                if name not in _REQUEST_PSEUDO:
                    out.error = f"pseudo-header {name!r} in a request"
                    return out
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
            else:
                if name != b":status":
                    out.error = f"pseudo-header {name!r} in a response"
                    return out
                if len(value) != 3 or not value.isdigit():
                    out.error = f"bad :status {value!r}"
                    return out
                out.status = int(value)
            continue
        seen_regular = True
        if name in _good_names:
            continue
        if not _name_ok(name):
            out.error = f"invalid field name {name!r}"
            return out
        if name in _FORBIDDEN:
            out.error = f"connection-specific field {name!r}"
            return out
        if name == b"te":
            if value != b"trailers":
                out.error = "te other than trailers"
                return out
        elif name == b"content-length":
            if not value.isdigit():
                out.error = f"bad content-length {value!r}"
                return out
            n = int(value)
            if out.content_length >= 0 and out.content_length != n:
                out.error = "conflicting content-length values"
                return out
            out.content_length = n
        else:
            _remember_name(name)
    if kind == FIELDS_REQUEST:
        if not method:
            out.error = "missing :method"
        elif method == b"CONNECT" and b":protocol" not in pseudo:
            if b":scheme" in pseudo or b":path" in pseudo:
                out.error = "CONNECT with :scheme or :path"
            elif b":authority" not in pseudo:
                out.error = "CONNECT without :authority"
        elif b":scheme" not in pseudo:
            out.error = "missing :scheme"
        elif not path:
            out.error = "missing or empty :path"
        out.head = method == b"HEAD"
    elif kind == FIELDS_RESPONSE and not out.status:
        out.error = "missing :status"
    return out
