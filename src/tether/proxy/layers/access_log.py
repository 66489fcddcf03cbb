"""Access log layer: one line per inbound HTTP request (``config.linkerd.io/access-log: apache|json``).

The fields are linkerd2-proxy's: ``client.addr``, ``client.id``, ``timestamp``, ``method``, ``uri``,
``version``, ``trace_id``, ``request_bytes``, ``status``, ``response_bytes``, ``total_ns``,
``processing_ns``, ``user_agent``, ``host``; ``apache`` prints the Apache common-log part of them
(``10.42.0.1:43682 - - [2022-08-23T20:28:23.049685223Z] "GET /ping HTTP/1.1" 200``).

The layer only queues a tuple of facts; a writer thread formats and writes the lines. The queue is
bounded: when the writer falls behind, lines are dropped and counted
(``tether_access_log_lines_dropped_total``), so a slow disk never slows requests or grows memory.
``processing_ns`` is the request's whole time in the proxy, as ``total_ns``: under asyncio the proxy
cannot tell its own running time for one request from its waiting.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import sys
import threading
import time
from typing import IO, Any, Final

from tether.proxy.http.message import Request, Response, Service

log = logging.getLogger(__name__)

FORMATS: Final = ("apache", "json")
_TRACE_HEADERS: Final = (b"x-b3-traceid", b"x-request-id", b"x-amzn-trace-id")
_STOP: Final = object()


def timestamp(ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds: 2022-08-23T20:28:20.071809491Z."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return ""


# A queued entry: (client_addr, client_id, start_ns (wall), req, status, response_bytes, total_ns)
Entry = tuple[str, str, int, Request, int, str, int]


def fields(e: Entry) -> dict[str, Any]:
    """The line's fields, in linkerd2-proxy's order."""
    addr, client_id, start, req, status, response_bytes, total = e
    h = req.headers
    version = "HTTP/2.0" if req.version == "2" else f"HTTP/{req.version}"
    path = req.path.decode("latin-1")
    uri = f"{req.scheme.decode('latin-1')}://{req.authority.decode('latin-1')}{path}" if req.version == "2" else path
    trace_id = ""
    for name in _TRACE_HEADERS:
        trace_id = _header(h, name)
        if trace_id:
            break
    return {
        "client.addr": addr,
        "client.id": client_id,
        "timestamp": timestamp(start),
        "method": req.method.decode("latin-1"),
        "uri": uri,
        "version": version,
        "trace_id": trace_id,
        "request_bytes": _header(h, b"content-length"),
        "status": status,
        "response_bytes": response_bytes,
        "total_ns": str(total),
        "processing_ns": str(total),
        "user_agent": _header(h, b"user-agent"),
        "host": _header(h, b"host") or req.authority.decode("latin-1"),
    }


def format_line(fmt: str, e: Entry) -> str:
    f = fields(e)
    if fmt == "json":
        return json.dumps(f, separators=(",", ":"))
    return f'{f["client.addr"]} {f["client.id"]} - [{f["timestamp"]}] "{f["method"]} {f["uri"]} {f["version"]}" ' \
           f'{f["status"]}'


class AccessLogWriter:
    """The bounded queue of access log entries and the thread that writes them."""

    def __init__(self, fmt: str, path: str | None, max_lines: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r} is not apache or json")
        self.fmt = fmt
        self.path = path
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_lines)
        self.dropped = 0
        self.written = 0
        self._thread: threading.Thread | None = None
        self._out: IO[str] | None = None

    def start(self) -> None:
        self._out = open(self.path, "a", encoding="utf-8") if self.path else sys.stderr  # noqa: SIM115
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def emit(self, entry: Entry) -> None:
        """Queue an entry; never waits (a full queue drops it and counts it)."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        out = self._out
        assert out is not None
        while True:
            item = self._queue.get()
            lines: list[str] = []
            while True:
                if item is _STOP:
                    self._flush(out, lines)
                    return
                lines.append(format_line(self.fmt, item))  # type: ignore[arg-type]
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._flush(out, lines)

    def _flush(self, out: IO[str], lines: list[str]) -> None:
        if lines:
            try:
                out.write("\n".join(lines) + "\n")
                out.flush()
                self.written += len(lines)
            except OSError as e:
                self.dropped += len(lines)
                log.warning("access log write failed: %s", e)

    def close(self, timeout: float = 2.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._out is not None and self._out is not sys.stderr:
            self._out.close()

    def lines(self) -> list[str]:
        return ["# HELP tether_access_log_lines_total Access log lines written.",
                "# TYPE tether_access_log_lines_total counter",
                f"tether_access_log_lines_total {self.written}",
                "# HELP tether_access_log_lines_dropped_total Access log lines dropped: the writer fell behind.",
                "# TYPE tether_access_log_lines_dropped_total counter",
                f"tether_access_log_lines_dropped_total {self.dropped}"]


class AccessLog:
    """Layer: each request, with its response's status, becomes an access log entry."""

    __slots__ = ("client_id", "inner", "writer")

    def __init__(self, inner: Service, writer: AccessLogWriter, client_id: str | None) -> None:
        self.inner = inner
        self.writer = writer
        self.client_id = client_id or "-"

    async def __call__(self, req: Request) -> Response:
        start_wall = time.time_ns()
        start = time.perf_counter_ns()
        rsp = await self.inner(req)
        total = time.perf_counter_ns() - start
        conn = req.conn
        addr = f"{conn.peer[0]}:{conn.peer[1]}" if conn is not None else "-"
        length = rsp.header(b"content-length")
        size = length.decode("latin-1") if length is not None else \
            (str(rsp.body.length) if rsp.body.length is not None else "")
        self.writer.emit((addr, self.client_id, start_wall, req, rsp.status, size, total))
        return rsp
