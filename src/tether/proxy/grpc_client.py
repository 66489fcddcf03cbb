"""gRPC calls from the proxy to the control plane, over tether's own HTTP/2 client (no grpcio).

The proxy talks to the identity service (unary Certify) and the destination service (server
streams: Get, GetProfile). grpcio's runtime costs ~20 MiB of RSS and a handful of threads per
process; the proxy already carries an HTTP/2 client, so a call is only the gRPC framing on top
(gRPC over HTTP/2: a 5-byte prefix per message, status in the trailers). Messages stay bytes:
callers encode and decode them (linkerd2-proxy-api protobuf).

    channel = GrpcChannel("127.0.0.1:8086", client_settings)
    reply = await channel.unary("/io.linkerd.proxy.identity.Identity/Certify", request_bytes, timeout=10)
    async for msg in channel.server_stream("/io.linkerd.proxy.destination.Destination/Get", req):
        ...
    channel.close()

Every failure is a :class:`GrpcError` with a gRPC status code: UNAVAILABLE when the connection
could not be made or broke, DEADLINE_EXCEEDED when the call's timeout passed, and the server's own
status otherwise. One channel keeps one HTTP/2 connection and redials when it is no longer usable.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from tether.proxy.config import H2Settings
from tether.proxy.http.body import Body, BodyError, BytesBody
from tether.proxy.http.h2client import H2ClientConnection
from tether.proxy.http.h2conn import H2Error
from tether.proxy.http.message import Headers, Request

__all__ = ["CONTROL_H2", "ChannelTls", "GrpcChannel", "GrpcError", "Status", "frame_message", "status_name"]


class Status:
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK: Final = 0
    CANCELLED: Final = 1
    UNKNOWN: Final = 2
    INVALID_ARGUMENT: Final = 3
    DEADLINE_EXCEEDED: Final = 4
    NOT_FOUND: Final = 5
    ALREADY_EXISTS: Final = 6
    PERMISSION_DENIED: Final = 7
    RESOURCE_EXHAUSTED: Final = 8
    FAILED_PRECONDITION: Final = 9
    ABORTED: Final = 10
    OUT_OF_RANGE: Final = 11
    UNIMPLEMENTED: Final = 12
    INTERNAL: Final = 13
    UNAVAILABLE: Final = 14
    DATA_LOSS: Final = 15
    UNAUTHENTICATED: Final = 16


_NAMES: Final = {v: k for k, v in vars(Status).items() if isinstance(v, int)}

# gRPC's mapping of an HTTP status that carries no grpc-status (grpc/doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC: Final = {400: Status.INTERNAL, 401: Status.UNAUTHENTICATED, 403: Status.PERMISSION_DENIED,
                        404: Status.UNIMPLEMENTED, 429: Status.UNAVAILABLE, 502: Status.UNAVAILABLE,
                        503: Status.UNAVAILABLE, 504: Status.UNAVAILABLE}

# The HTTP/2 settings of a control-plane connection: a few long-lived streams, small messages.
CONTROL_H2: Final = H2Settings(
    h2_max_concurrent_streams=100, h2_max_resets_per_window=1000, h2_reset_window=30.0,
    h2_initial_window=65535, max_header_bytes=64 * 1024, idle_timeout=0.0, shutdown_grace_period=0.0,
    failfast_timeout=10.0, h2_rapid_reset_age=0.0, write_stall_timeout=60.0, h2_max_continuation_frames=16,
)


def status_name(code: int) -> str:
    """The status code's name (UNAVAILABLE), or its number when it is not a known code."""
    return _NAMES.get(code, str(code))


class GrpcError(Exception):
    """A call that did not end with status OK: ``code`` is the gRPC status, ``details`` why."""

    def __init__(self, code: int, details: str) -> None:
        super().__init__(f"{status_name(code)}: {details}")
        self.code = code
        self.details = details

    @property
    def name(self) -> str:
        return status_name(self.code)


def frame_message(msg: bytes) -> bytes:
    """One length-prefixed message (uncompressed), as it travels in a gRPC body."""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


class _Messages:
    """Splits a gRPC body into messages, refusing compressed or oversized ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out: list[bytes] = []
        while len(self.buf) >= 5:
            if self.buf[0] != 0:
                # No grpc-accept-encoding was sent, so a compressed message breaks the protocol.
                raise GrpcError(Status.INTERNAL, "compressed message from a server that was not offered compression")
            size = int.from_bytes(self.buf[1:5], "big")
            if size > self.limit:
                raise GrpcError(Status.RESOURCE_EXHAUSTED, f"message of {size} bytes exceeds the {self.limit} limit")
            if len(self.buf) < 5 + size:
                break
            out.append(bytes(self.buf[5 : 5 + size]))
            del self.buf[: 5 + size]
        return out


def _status_of(headers: Headers) -> GrpcError | None:
    """The call's status from trailers (or a trailers-only response's head); None when it is OK."""
    code: int | None = None
    message = ""
    for k, v in headers:
        if k == b"grpc-status":
            code = int(v) if v.isdigit() else Status.UNKNOWN
        elif k == b"grpc-message":
            message = v.decode("utf-8", "replace")
            if "%" in message:  # percent-encoded (unquote returns any other text as it is)
                # Imported here: urllib.parse is ~0.1 MiB of an idle proxy's memory (issue 16).
                from urllib.parse import unquote

                message = unquote(message)
    if code is None:
        return GrpcError(Status.INTERNAL, "the server ended the call without a grpc-status")
    return None if code == Status.OK else GrpcError(code, message)


def _has_status(headers: Headers) -> bool:
    return any(k == b"grpc-status" for k, _ in headers)


def _timeout_header(seconds: float) -> bytes:
    # At most 8 digits (gRPC over HTTP/2): milliseconds while they fit, else seconds.
    ms = max(1, int(seconds * 1000))
    return f"{ms}m".encode() if ms < 100_000_000 else f"{min(int(seconds), 99_999_999)}S".encode()


def _take_outcome(lookup: asyncio.Future[object]) -> None:
    if not lookup.cancelled():
        lookup.exception()


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> str:
    """The first address of ``host``. A lookup outlived by its caller (a timeout) ends in its own time;
    its outcome is then taken, so a late failure is not reported as an exception nobody retrieved."""
    lookup: asyncio.Future[object] = asyncio.ensure_future(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
    try:
        infos = await asyncio.shield(lookup)
    except asyncio.CancelledError:
        lookup.add_done_callback(_take_outcome)
        raise
    # An explicit check, not an assert: the proxy runs -OO (tether.core.sidecar), where asserts are gone.
    if not isinstance(infos, list) or not infos:
        raise OSError(f"{host}:{port}: the resolver returned no address")
    return str(infos[0][4][0])


@dataclass(frozen=True)
class ChannelTls:
    """Mutual TLS to a control-plane service whose certificate names ``server_name``.

    ``context`` is awaited at every dial and gives the context to dial with: the proxy's current
    certificate (it waits for the first one), so a rotated certificate reaches the next connection.
    """

    server_name: str
    context: Callable[[], Awaitable[ssl.SSLContext]]


class GrpcChannel:
    """Calls to one control-plane address over one HTTP/2 connection (plaintext or TLS), redialled as needed."""

    def __init__(self, addr: str, settings: H2Settings = CONTROL_H2, *, connect_timeout: float = 5.0,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 tls: ChannelTls | None = None, max_message_bytes: int = 4 * 1024 * 1024) -> None:
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not a host:port address: {addr!r}")
        self.addr = addr
        self.host = host.strip("[]")
        self.port = int(port)
        self.settings = settings
        self.connect_timeout = connect_timeout
        if tls is not None and ssl_context is not None:
            raise ValueError("give either ssl_context or tls, not both")
        self.ssl_context = ssl_context
        self.server_hostname = tls.server_name if tls is not None else server_hostname
        self.tls = tls
        self.secure = ssl_context is not None or tls is not None
        self.max_message_bytes = max_message_bytes
        self._conn: H2ClientConnection | None = None
        self._dialing: asyncio.Lock | None = None

    async def _connection(self) -> H2ClientConnection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._dialing is None:
            self._dialing = asyncio.Lock()
        async with self._dialing:  # one dial at a time: concurrent callers share its connection
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            loop = asyncio.get_running_loop()
            ctx = self.ssl_context
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self.tls is not None:
                        ctx = await self.tls.context()
                    ip = await _resolve(loop, self.host, self.port)
                    _, proto = await loop.create_connection(
                        lambda: H2ClientConnection(self.settings), ip, self.port, ssl=ctx,
                        server_hostname=(self.server_hostname or self.host) if ctx is not None else None)
            except TimeoutError:
                if self.tls is not None and ctx is None:
                    raise GrpcError(Status.UNAVAILABLE, f"no certificate to dial {self.addr} with yet "
                                                        "(the proxy's identity is not ready)") from None
                raise GrpcError(Status.UNAVAILABLE, f"connect to {self.addr} timed out") from None
            except socket.gaierror as e:
                raise GrpcError(Status.UNAVAILABLE, f"cannot resolve {self.host}: {e.strerror or e}") from None
            except (OSError, ssl.SSLError) as e:
                raise GrpcError(Status.UNAVAILABLE, f"connect to {self.addr}: {e}") from None
            assert isinstance(proto, H2ClientConnection)
            self._conn = proto
            return proto

    async def _open(self, path: str, request: bytes, timeout: float | None) -> Body:
        """Start a call; return the response body (its messages, then trailers)."""
        conn = await self._connection()
        headers: Headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers"),
                            (b"user-agent", b"tether-proxy")]
        if timeout is not None:
            headers.append((b"grpc-timeout", _timeout_header(timeout)))
        scheme = b"https" if self.secure else b"http"
        req = Request(b"POST", path.encode(), self.addr.encode(), scheme, headers, BytesBody(frame_message(request)),
                      version="2")
        try:
            resp = await conn.send(req)
        except H2Error as e:
            raise GrpcError(Status.UNAVAILABLE, f"{self.addr}: {e}") from None
        if _has_status(resp.headers):  # trailers-only: the call ended before any message
            resp.body.discard()
            err = _status_of(resp.headers)
            if err is not None:
                raise err
            return resp.body
        if resp.status != 200:
            resp.body.discard()
            code = _HTTP_TO_GRPC.get(resp.status, Status.UNKNOWN)
            raise GrpcError(code, f"{self.addr} answered HTTP {resp.status}")
        return resp.body

    async def _messages(self, body: Body) -> AsyncIterator[bytes]:
        reader = _Messages(self.max_message_bytes)
        try:
            while chunk := await body.read():
                for msg in reader.feed(chunk):
                    yield msg
        except BodyError as e:
            raise GrpcError(Status.UNAVAILABLE, f"{self.addr}: stream broken: {e.__cause__ or e}") from None
        finally:
            if not body.is_end_known():
                body.discard()  # the caller stopped early: reset the stream
        if reader.buf:
            raise GrpcError(Status.INTERNAL, f"{self.addr}: the stream ended inside a message")
        err = _status_of(body.trailers or [])
        if err is not None:
            raise err

    async def unary(self, path: str, request: bytes, timeout: float) -> bytes:
        """One request, one response message, within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                body = await self._open(path, request, timeout)
                replies = [m async for m in self._messages(body)]
        except TimeoutError:
            raise GrpcError(Status.DEADLINE_EXCEEDED, f"{self.addr}: no answer within {timeout:g}s") from None
        if len(replies) != 1:
            raise GrpcError(Status.INTERNAL, f"{self.addr}: a unary call answered {len(replies)} messages")
        return replies[0]

    async def server_stream(self, path: str, request: bytes) -> AsyncGenerator[bytes, None]:
        """One request, then the server's messages until it ends the stream (status OK) or fails."""
        body = await self._open(path, request, None)
        async for msg in self._messages(body):
            yield msg

    async def probe_stream(self, path: str, request: bytes) -> None:
        """Start a server-streaming call and end it once the server accepted it (a response head
        without an error status): GrpcError when it refused or could not be reached."""
        body = await self._open(path, request, None)
        body.discard()

    def close(self) -> None:
        """Close the connection; calls in flight fail with UNAVAILABLE."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
