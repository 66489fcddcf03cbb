"""HTTP messages as the proxy's layers see them, whatever the wire version.

A request or response is a head plus a streamed :class:`Body`. Header names are lower-case
bytes; pseudo-headers never appear in ``headers`` (method, scheme, authority and path have
their own fields). Layers read and rewrite these objects; codecs (HTTP/1, HTTP/2) turn them
into bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from tether.proxy.http.body import Body, EmptyBody

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Connection:
    """What the proxy knows about the connection a request arrived on."""

    direction: str  # "inbound" | "outbound"
    peer: tuple[str, int]  # the client's address
    local: tuple[str, int]  # the listener address it was accepted on
    orig_dst: tuple[str, int] | None = None  # SO_ORIGINAL_DST or the explicit target
    tls: bool = False
    client_id: str | None = None  # the peer proxy's verified identity (inbound mTLS)
    protocol: str = "http/1"  # "http/1" | "h2" | "tcp"
    target_port: int | None = None  # the application port a peer proxy named (transport header)


@dataclass(slots=True)
class Request:
    method: bytes
    path: bytes  # origin-form target ("/x?y"), "*" or authority-form for CONNECT
    authority: bytes  # host[:port]
    scheme: bytes = b"http"
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=EmptyBody)
    version: str = "1.1"  # "1.0" | "1.1" | "2"
    conn: Connection | None = None
    # Per-request facts layers pass down the stack (route name, dst labels, ...).
    extensions: dict[str, object] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        """First value of a header (``name`` lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def remove_header(self, name: bytes) -> None:
        self.headers = [(k, v) for k, v in self.headers if k != name]


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=EmptyBody)
    # Set by the endpoint: the upgraded byte stream after a 101 (WebSocket and friends).
    upgrade: object | None = None
    extensions: dict[str, object] = field(default_factory=dict)

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Service(Protocol):
    """One layer of a stack: a function from request to an awaitable response (usually ``async def``)."""

    def __call__(self, req: Request, /) -> Awaitable[Response]: ...


ServiceFn = Callable[[Request], Awaitable[Response]]

# Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded as they are.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop hop-by-hop headers and any header the Connection header names."""
    for k, _ in headers:
        if k in HOP_BY_HOP:
            break
    else:
        return headers  # the common case: one scan, nothing to copy
    named: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]
