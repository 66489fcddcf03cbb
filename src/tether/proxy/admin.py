"""The admin server (default 127.0.0.1:4191): metrics, readiness, log level, shutdown.

A small HTTP/1.1 server with keep-alive, bounded header block and body, and timeouts on every
read. Endpoints follow linkerd2-proxy's admin server:

- ``GET /metrics``: Prometheus text (version 0.0.4), rendered off the event loop.
- ``GET /ready``: 200 ``ready`` once the readiness callable says so, else 503.
- ``GET /live``: 200 ``live``.
- ``GET /env.json``: the effective settings (``ProxyConfig.env_dict()``).
- ``GET /proxy-log-level``: the current spec; ``PUT`` (loopback peers only) sets a new one.
- ``POST /shutdown``: loopback only, and only when ``enable_admin_shutdown`` is set.
- ``GET /identity.json``: whatever the identity callable returns, as JSON.

Every error response carries its reason in the body, one line of text.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from tether.proxy.config import ProxyConfig
from tether.proxy.listen import listening_socket
from tether.proxy.logging import LogControl, LogSpecError
from tether.proxy.malloc import trim_malloc
from tether.proxy.metrics import MetricsRegistry

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_BACKLOG = 100  # asyncio.start_server's default: the admin port serves probes and scrapes
_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"
_BIG_SCRAPE = 1 << 20  # /metrics bytes after which the C heap is trimmed
_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


@dataclass(slots=True)
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: bytes = _TEXT
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # A large body in pieces (the metrics exposition), written without joining them first.
    chunks: list[bytes] | None = None
    # Run after the response has been written (e.g. the shutdown callback).
    after: Callable[[], object] | None = None


def _text(status: int, message: str) -> AdminResponse:
    return AdminResponse(status, (message.rstrip("\n") + "\n").encode())


def _method_not_allowed(allowed: str) -> AdminResponse:
    rsp = _text(405, f"method not allowed; use {allowed}")
    rsp.headers.append((b"allow", allowed.encode()))
    return rsp


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class AdminServer:
    """The admin listener. ``await start()`` binds it; ``await close()`` stops it."""

    def __init__(
        self,
        config: ProxyConfig,
        registry: MetricsRegistry,
        log_control: LogControl,
        *,
        ready: Callable[[], bool] = lambda: True,
        shutdown: Callable[[], object] | None = None,
        identity: Callable[[], object] | None = None,
        max_connections: int = 64,
        max_body: int = 64 * 1024,
        callable_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self.registry = registry
        self.log_control = log_control
        self.ready = ready
        self.shutdown = shutdown
        self.identity = identity
        self.max_connections = max_connections
        self.max_body = max_body
        self.callable_timeout = callable_timeout
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._after: set[asyncio.Task[object]] = set()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        """Bind and listen on ``config.admin_addr``; returns the bound address (port 0 resolved)."""
        host, port = self.config.admin_addr
        sock = listening_socket((host, port), _BACKLOG)  # not the loop's resolver: see tether.proxy.listen
        if sock is not None:
            self._server = await asyncio.start_server(self._serve_conn, sock=sock, limit=self.config.max_header_bytes,
                                                      backlog=_BACKLOG)
        else:
            self._server = await asyncio.start_server(
                self._serve_conn, host, port, limit=self.config.max_header_bytes, reuse_address=True,
                backlog=_BACKLOG)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server is not started")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and end open connections."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- connections ----------------------------------------------------------------------------
    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            if len(self._conns) >= self.max_connections:
                await self._write(writer, _text(503, "too many admin connections"), close=True)
                return
            self._conns.add(task)
            await self._serve_requests(reader, writer, str(peer[0]))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("admin connection from %s failed", peer[0])
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        first = True
        while True:
            # The first request has the header timeout; later ones may wait the idle timeout.
            wait = self.config.header_read_timeout if first else self.config.idle_timeout
            first = False
            try:
                async with asyncio.timeout(wait):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                return
            except asyncio.IncompleteReadError as e:
                if e.partial.strip():
                    await self._write(writer, _text(400, "incomplete request head"), close=True)
                return
            except asyncio.LimitOverrunError:
                limit = self.config.max_header_bytes
                await self._write(writer, _text(431, f"request head larger than {limit} bytes"), close=True)
                return
            try:
                method, path, version, headers = _parse_head(head)
                body = await self._read_body(reader, headers)
            except _BadRequest as e:
                await self._write(writer, _text(e.status, e.reason), close=True)
                return
            keep_alive = _keep_alive(version, headers)
            try:
                rsp = await self.handle(method, path, body, peer)
            except Exception as e:
                log.exception("admin %s %s failed", method, path)
                rsp = _text(500, f"internal error: {type(e).__name__}")
            await self._write(writer, rsp, close=not keep_alive, head_only=method == "HEAD")
            after = rsp.after
            del rsp  # the body is freed before what runs after it
            if after is not None:
                self._run_after(after)
            if not keep_alive:
                return

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "transfer-encoding" in headers:
            raise _BadRequest(501, "chunked request bodies are not supported; send Content-Length")
        cl = headers.get("content-length")
        if cl is None:
            return b""
        if not cl.isdigit():
            raise _BadRequest(400, f"invalid Content-Length {cl!r}")
        n = int(cl)
        if n > self.max_body:
            raise _BadRequest(413, f"request body larger than {self.max_body} bytes")
        try:
            async with asyncio.timeout(self.config.header_read_timeout):
                return await reader.readexactly(n)
        except TimeoutError:
            raise _BadRequest(408, "request body not received in time") from None

    async def _write(
        self, writer: asyncio.StreamWriter, rsp: AdminResponse, *, close: bool, head_only: bool = False
    ) -> None:
        chunks = rsp.chunks if rsp.chunks is not None else [rsp.body]
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (rsp.status, _REASONS.get(rsp.status, b"")),
            b"content-length: %d\r\n" % sum(len(c) for c in chunks),
        ]
        if rsp.status != 204:
            lines.append(b"content-type: " + rsp.content_type + b"\r\n")
        lines.extend(k + b": " + v + b"\r\n" for k, v in rsp.headers)
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        async with asyncio.timeout(self.config.idle_timeout):
            writer.write(b"".join(lines))
            if not head_only and rsp.status != 204:
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
            await writer.drain()

    def _run_after(self, fn: Callable[[], object]) -> None:
        try:
            out = fn()
        except Exception:
            log.exception("admin callback failed")
            return
        if inspect.isawaitable(out):
            task: asyncio.Task[object] = asyncio.ensure_future(out)
            self._after.add(task)
            task.add_done_callback(self._after.discard)

    async def _call(self, fn: Callable[[], object]) -> object:
        out = fn()
        if inspect.isawaitable(out):
            async with asyncio.timeout(self.callable_timeout):
                return await out
        return out

    # -- routes ---------------------------------------------------------------------------------
    async def handle(self, method: str, path: str, body: bytes, peer: str) -> AdminResponse:
        """Answer one request (no I/O beyond the callables); ``peer`` is the client's IP."""
        path = path.split("?", 1)[0]
        get = method in ("GET", "HEAD")
        if path == "/metrics":
            if not get:
                return _method_not_allowed("GET")
            chunks = await self.registry.render_chunks_async()
            # A large exposition (thousands of series, as after a burst of destinations) leaves its
            # freed pieces in the C heap, formatted in another thread's arena: give them back once
            # it is written.
            big = sum(len(c) for c in chunks) >= _BIG_SCRAPE
            return AdminResponse(200, b"", METRICS_CONTENT_TYPE, chunks=chunks, after=trim_malloc if big else None)
        if path == "/ready":
            if not get:
                return _method_not_allowed("GET")
            return _text(200, "ready") if self.ready() else _text(503, "not ready")
        if path == "/live":
            if not get:
                return _method_not_allowed("GET")
            return _text(200, "live")
        if path == "/env.json":
            if not get:
                return _method_not_allowed("GET")
            return AdminResponse(200, json.dumps(self.config.env_dict(), indent=2).encode() + b"\n", _JSON)
        if path == "/proxy-log-level":
            return self._log_level(method, body, peer)
        if path == "/shutdown":
            return self._shutdown(method, peer)
        if path == "/identity.json":
            if not get:
                return _method_not_allowed("GET")
            return await self._identity()
        return _text(404, f"not found: {path}")

    def _log_level(self, method: str, body: bytes, peer: str) -> AdminResponse:
        if method in ("GET", "HEAD"):
            return _text(200, self.log_control.spec)
        if method != "PUT":
            return _method_not_allowed("GET, PUT")
        if not is_loopback(peer):
            return _text(403, "log level changes are accepted from localhost only")
        try:
            spec = body.decode("utf-8").strip()
        except UnicodeDecodeError:
            return _text(400, "log level spec is not UTF-8")
        try:
            self.log_control.set(spec)
        except LogSpecError as e:
            return _text(400, str(e))
        log.info("log level set to %s by %s", self.log_control.spec, peer)
        return AdminResponse(204)

    def _shutdown(self, method: str, peer: str) -> AdminResponse:
        if not self.config.enable_admin_shutdown:
            return _text(404, "shutdown endpoint is not enabled (TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN=true)")
        if method != "POST":
            return _method_not_allowed("POST")
        if not is_loopback(peer):
            return _text(403, "shutdown is accepted from localhost only")
        if self.shutdown is None:
            return _text(404, "shutdown endpoint has no handler in this process")
        log.info("shutdown requested through the admin server by %s", peer)
        return AdminResponse(200, b"shutdown\n", after=self.shutdown)

    async def _identity(self) -> AdminResponse:
        if self.identity is None:
            return _text(404, "identity is not configured in this proxy")
        try:
            out = await self._call(self.identity)
        except TimeoutError:
            return _text(503, "identity did not answer in time")
        if out is None:
            return _text(503, "identity is not established yet")
        if isinstance(out, bytes):
            body = out
        elif isinstance(out, str):
            body = out.encode()
        else:
            body = json.dumps(out, indent=2, default=str).encode()
        return AdminResponse(200, body if body.endswith(b"\n") else body + b"\n", _JSON)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers; names lower-cased, later duplicates joined with ', '."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise _BadRequest(400, "request head is not text") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    method, path, version = parts
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, f"malformed method {method[:20]!r}")
    if not path.startswith("/"):
        raise _BadRequest(400, "request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise _BadRequest(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        if key == "content-length" and key in headers:
            raise _BadRequest(400, "duplicate Content-Length")
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return method, path, version, headers


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens

