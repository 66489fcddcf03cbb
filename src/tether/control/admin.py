"""The control-plane services' admin port: GET /metrics, /ready, /live, /ping (and any extra read-only
views a service adds), one request per connection, answered and closed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

ADMIN_READ_TIMEOUT = 5.0
METRICS_TYPE = "text/plain; version=0.0.4"

# A view: () -> (body, content type).
View = Callable[[], tuple[str, str]]


async def serve_admin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, metrics: Callable[[], str],
                      ready: Callable[[], bool], views: Mapping[str, View] | None = None) -> None:
    """Answer one admin request: 405 for anything but GET, 404 for an unknown path; a client that
    sends no complete head within ADMIN_READ_TIMEOUT, or a malformed one, is closed unanswered."""
    try:
        async with asyncio.timeout(ADMIN_READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        path = path.split("?", 1)[0]
        ctype = "text/plain"
        if method != "GET":
            status, body = "405 Method Not Allowed", "only GET\n"
        elif path == "/metrics":
            status, body, ctype = "200 OK", metrics(), METRICS_TYPE
        elif path == "/ready":
            status, body = ("200 OK", "ready\n") if ready() else ("503 Service Unavailable", "not ready\n")
        elif path == "/live":
            status, body = "200 OK", "live\n"
        elif path == "/ping":  # the charts' liveness probe (Linkerd's controllers answer it so)
            status, body = "200 OK", "pong\n"
        elif views and path in views:
            status = "200 OK"
            body, ctype = views[path]()
        else:
            status, body = "404 Not Found", "not found\n"
        data = body.encode()
        writer.write(f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(data)}\r\n"
                     "connection: close\r\n\r\n".encode() + data)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
        pass
    finally:
        writer.close()
