"""The HTTP/2 codec's interface, as the proxy's layers and listeners see it.

Two roles: a server codec serves one accepted connection by calling a Service per stream; a client
codec multiplexes requests to one endpoint over one connection. Errors are typed here so layers can
decide (retry, status code, RST propagation) without knowing which codec produced them. The
implementation is :class:`~tether.proxy.http.h2server.H2ServerProtocol` and
:class:`~tether.proxy.http.h2client.H2ClientConnection`, over the sans-I/O protocol state in
:mod:`tether.core.http.h2proto` (with :mod:`~tether.core.http.hpack` and
:mod:`~tether.core.http.h2frames`).
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

from tether.proxy.http.message import Request, Response

# RFC 9113 section 7 error codes (the subset named in messages and decisions).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
ENHANCE_YOUR_CALM: Final = 0xB
ERROR_NAMES: Final = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}


class H2Error(Exception):
    """Base of the HTTP/2 codec's errors; ``retryable`` means the peer never processed the request."""

    retryable = False

    def renewed(self) -> H2Error:
        """This error as a new exception, to raise where a kept one (a stream's reset, the
        connection's close error) would be raised again: a raised exception keeps the raising
        frames, and those frames keep the connection that keeps the exception (a reference cycle
        that only a full collection frees)."""
        e = H2Error(*self.args)
        e.__cause__ = self.__cause__
        return e


class H2StreamReset(H2Error):
    """A stream was reset (by the peer, or by us for a reason given in the message)."""

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        who = "peer" if remote else "proxy"
        name = ERROR_NAMES.get(error_code, str(error_code))
        super().__init__(f"stream {stream_id} reset by {who}: {name}")
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote
        # REFUSED_STREAM: the peer promises it did no work on the stream (RFC 9113 section 8.7).
        self.retryable = remote and error_code == REFUSED_STREAM

    def renewed(self) -> H2Error:
        e = H2StreamReset(self.stream_id, self.error_code, self.remote)
        e.__cause__ = self.__cause__
        return e


class H2ConnectionClosed(H2Error):
    """The connection ended (lost, protocol error, or GOAWAY) before the stream completed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    def renewed(self) -> H2Error:
        e = type(self)(str(self), self.retryable)
        e.__cause__ = self.__cause__
        return e


def error_code_for(exc: BaseException) -> int:
    """The RST_STREAM code to send when a body fails with ``exc`` (propagates an upstream reset)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, H2StreamReset):
            return seen.error_code
        seen = seen.__cause__
    return INTERNAL_ERROR


class H2ServerCodec(Protocol):
    """Serves HTTP/2 on one accepted connection (an asyncio Protocol)."""

    def start(self, transport: asyncio.Transport, initial: bytes = b"") -> None:
        """Take over ``transport``; ``initial`` is what protocol detection already read."""

    async def drain(self, grace: float | None = None) -> None:
        """GOAWAY, let in-flight streams finish within ``grace`` seconds, close."""

    async def wait_closed(self) -> None:
        """Return once the connection has closed."""

    @property
    def active_streams(self) -> int: ...


class H2ClientCodec(Protocol):
    """A multiplexed HTTP/2 connection to one endpoint (an asyncio Protocol)."""

    def start(self, transport: asyncio.Transport) -> None:
        """Take over an already-connected transport (plain TCP or TLS with ALPN h2)."""

    async def send(self, req: Request, /) -> Response:
        """Send a request; return at the response head (body streams, trailers at its end)."""

    def close(self) -> None:
        """Close now (not a coroutine); in-flight streams fail."""

    @property
    def usable(self) -> bool:
        """False after GOAWAY, an error or close(): the pool should open a new connection."""

    @property
    def active_streams(self) -> int: ...
