"""The proxy's metrics: plain counters on the hot path, Prometheus text at scrape time.

Callers bind a label set once (``registry.http(...)``, ``registry.tcp(...)``) and keep the returned
object; counting is then an attribute increment (``m.requests += 1``), with no lock, no label
lookup and no clock read. A scrape sweeps the series on the event loop in slices
(:meth:`MetricsRegistry.snapshot_async`, well under 1 us a series) and formats the text in a
worker thread in small blocks (:meth:`MetricsRegistry.render_chunks_async`), so a large scrape
never holds the loop for long. bench/metrics_render.py measures both.

Names, label keys and buckets follow linkerd2-proxy (``linkerd/http/metrics``,
``linkerd/transport-metrics``, ``linkerd/metrics/src/latency.rs``). A series whose numbers have
not moved for ``retain_idle`` seconds (10 minutes by default) and that nobody holds any more is
dropped, as Linkerd does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import tether
from tether.core.sidecar import runtime_labels
from tether.proxy.counters import (
    LE,
    NBUCKETS,
    HttpMetrics,
    TcpMetrics,
    escape_label,
)

log = logging.getLogger(__name__)

DEFAULT_RETAIN_IDLE = 600.0

_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

ExtraLabels = tuple[tuple[str, str], ...]
# (direction, target_addr, authority, tls, client_id, server_id, no_tls_reason, extra)
HttpKey = tuple[
    str, "tuple[str, int] | None", "str | None", bool, "str | None", "str | None", "str | None", ExtraLabels
]
# A source of extra exposition text: returns complete lines (str or an iterable of str).
TextSource = Callable[[], "str | Iterable[str]"]


def _addr_labels(target_addr: tuple[str, int] | None) -> str:
    if target_addr is None:
        return ""
    host, port = target_addr
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f',target_addr="{escape_label(shown)}",target_ip="{escape_label(host)}",target_port="{port}"'


def _tls_labels(tls: bool, client_id: str | None, server_id: str | None, no_tls_reason: str | None) -> str:
    # Linkerd: tls="true" with the peer's identity, "no_identity" with a reason, else "disabled".
    if tls:
        out = ',tls="true"'
        if server_id is not None:
            out += f',server_id="{escape_label(server_id)}"'
        if client_id is not None or server_id is None:
            out += f',client_id="{escape_label(client_id or "")}"'
        return out
    if no_tls_reason is not None:
        return f',tls="no_identity",no_tls_reason="{escape_label(no_tls_reason)}"'
    return ',tls="disabled"'


def _extra_labels(extra: ExtraLabels) -> str:
    out = ""
    for k, v in extra:
        if not _LABEL_NAME.match(k):
            raise ValueError(f"metric label name {k!r} is not [A-Za-z_][A-Za-z0-9_]*")
        out += f',{k}="{escape_label(v)}"'
    return out


# --------------------------------------------------------------------------------------------
# Per-label-set objects: plain attributes, bound once by the caller.


def _series_labels(
    head: str,
    target_addr: tuple[str, int] | None,
    authority: str | None,
    tls: bool,
    client_id: str | None,
    server_id: str | None,
    no_tls_reason: str | None,
    extra: ExtraLabels,
) -> str:
    """The label text shared by the HTTP and TCP series after their leading labels."""
    label = head
    if authority is not None:
        label += f',authority="{escape_label(authority)}"'
    return label + _addr_labels(target_addr) + _tls_labels(tls, client_id, server_id, no_tls_reason) + \
        _extra_labels(extra)


# --------------------------------------------------------------------------------------------
# Snapshot: which series a scrape shows, taken on the loop; their numbers are read by the formatter.


@dataclass(slots=True)
class Snapshot:
    """The series of one scrape, swept on the loop.

    The formatter reads the live objects' numbers from its worker thread. Each read it makes
    (an int attribute, ``list.copy()``, ``list(dict.values())``) is one C call under the GIL, so
    it is atomic with respect to the loop; a scrape racing a request may show that request in
    request_total and not yet in response_total, as any live scrape may. Reading in place,
    rather than copying every number on the loop, keeps the scrape from allocating thousands of
    long-lived objects (which made the garbage collector stall the loop for tens of ms).
    """

    http: list[HttpMetrics]
    tcp: list[TcpMetrics]
    tcp_errors: list[tuple[str, str, int]]  # (direction, labels, count)
    build_info: str
    start_time: float | None
    process: bool
    extra: list[str]


# sys.getrefcount of a series inside _expired when only the registry holds it: the dict, the
# items list the sweep iterates, the sweep's loop variable, the _snap_* and _expired arguments,
# and getrefcount's own argument. tests/unit/test_metrics.py checks both sweep paths.
_HELD_BY_REGISTRY_ONLY = 6


class MetricsRegistry:
    """All of the proxy's metric series; one per process, shared by every listener."""

    def __init__(
        self,
        *,
        retain_idle: float = DEFAULT_RETAIN_IDLE,
        build_info: dict[str, str] | None = None,
        process_metrics: bool = True,
        executor: Executor | None = None,
    ) -> None:
        self.retain_idle = retain_idle
        self._http: dict[HttpKey, HttpMetrics] = {}
        self._tcp: dict[tuple[object, ...], TcpMetrics] = {}
        self._tcp_errors: dict[tuple[str, str, tuple[str, int] | None], int] = {}
        self._sources: list[TextSource] = []
        self._process = process_metrics
        self._executor = executor
        self._start_time = _process_start_time() if process_metrics else None
        info = {
            "version": tether.__version__,
            "git_sha": "",
            "profile": "release",
            "vendor": "tether",
            "date": "",
            **runtime_labels(),
        }
        info.update(build_info or {})
        labels = ",".join(f'{k}="{escape_label(v)}"' for k, v in info.items() if _LABEL_NAME.match(k))
        self._build_info = f"proxy_build_info{{{labels}}} 1\n"

    # -- binding (once per label set, not per request) ---------------------------------------
    def http(
        self,
        direction: str,
        target_addr: tuple[str, int] | None,
        *,
        authority: str | None = None,
        tls: bool = False,
        client_id: str | None = None,
        server_id: str | None = None,
        no_tls_reason: str | None = None,
        extra: ExtraLabels = (),
    ) -> HttpMetrics:
        """The HTTP series of one label set, created on first use and shared thereafter."""
        return self.http_for(
            (direction, target_addr, authority, tls, client_id, server_id, no_tls_reason, extra)
        )

    def http_for(self, key: HttpKey) -> HttpMetrics:
        """:meth:`http` with its arguments as one tuple, in order (the metrics layer's fast path)."""
        m = self._http.get(key)
        if m is None:
            direction, target_addr, authority, tls, client_id, server_id, no_tls_reason, extra = key
            m = self._http[key] = HttpMetrics(_series_labels(
                f'direction="{escape_label(direction)}"',
                target_addr, authority, tls, client_id, server_id, no_tls_reason, extra))
        return m

    def tcp(
        self,
        direction: str,
        peer: str,
        target_addr: tuple[str, int] | None,
        *,
        authority: str | None = None,
        tls: bool = False,
        client_id: str | None = None,
        server_id: str | None = None,
        no_tls_reason: str | None = None,
        extra: ExtraLabels = (),
    ) -> TcpMetrics:
        """The TCP series of one label set; ``peer`` is "src" (accepted) or "dst" (connected)."""
        if peer not in ("src", "dst"):
            raise ValueError(f"peer must be 'src' or 'dst', not {peer!r}")
        key = (direction, peer, target_addr, authority, tls, client_id, server_id, no_tls_reason, extra)
        m = self._tcp.get(key)
        if m is None:
            m = self._tcp[key] = TcpMetrics(_series_labels(
                f'direction="{escape_label(direction)}",peer="{peer}"',
                target_addr, authority, tls, client_id, server_id, no_tls_reason, extra))
        return m

    def tcp_error(self, direction: str, error: str, target_addr: tuple[str, int] | None = None) -> None:
        """Count a connection the proxy could not serve (inbound_/outbound_tcp_errors_total)."""
        if direction not in ("inbound", "outbound"):
            raise ValueError(f"direction must be 'inbound' or 'outbound', not {direction!r}")
        key = (direction, error, target_addr)
        self._tcp_errors[key] = self._tcp_errors.get(key, 0) + 1

    def add_source(self, source: TextSource) -> None:
        """Add a text source (e.g. the identity client's ``metrics_lines``), called at each scrape
        on the event loop; it returns complete exposition lines, HELP/TYPE included."""
        self._sources.append(source)

    def remove_source(self, source: TextSource) -> None:
        if source in self._sources:
            self._sources.remove(source)

    # -- scraping -----------------------------------------------------------------------------
    def snapshot(self, now: float) -> Snapshot:
        """Sweep idle, unheld series and list the rest (``now``: monotonic seconds).

        Costs well under 1 us a series; the proxy uses :meth:`render_chunks_async`, which sweeps
        in slices so the loop never waits long.
        """
        http = [m for k, m in list(self._http.items()) if self._keep_http(k, m, now)]
        tcp = [m for k, m in list(self._tcp.items()) if self._keep_tcp(k, m, now)]
        return self._finish(http, tcp)

    async def snapshot_async(self, now: float, slice_size: int = 1024) -> Snapshot:
        """:meth:`snapshot` in slices of ``slice_size`` series, yielding to the loop between them."""
        http: list[HttpMetrics] = []
        tcp: list[TcpMetrics] = []
        http_items = list(self._http.items())
        for i in range(0, len(http_items), slice_size):
            if i:
                await asyncio.sleep(0)
            http.extend(m for k, m in http_items[i : i + slice_size] if self._keep_http(k, m, now))
        tcp_items = list(self._tcp.items())
        for i in range(0, len(tcp_items), slice_size):
            if i:
                await asyncio.sleep(0)
            tcp.extend(m for k, m in tcp_items[i : i + slice_size] if self._keep_tcp(k, m, now))
        return self._finish(http, tcp)

    def _keep_http(self, key: HttpKey, hm: HttpMetrics, now: float) -> bool:
        if self._expired(hm, hm.requests, now):
            if self._http.get(key) is hm:
                del self._http[key]
            return False
        return True

    def _keep_tcp(self, key: tuple[object, ...], tm: TcpMetrics, now: float) -> bool:
        closed = sum(tm.closes.values())
        activity = tm.open_total + closed + tm.read_bytes + tm.write_bytes
        if tm.open_total == closed and self._expired(tm, activity, now):
            if self._tcp.get(key) is tm:
                del self._tcp[key]
            return False
        return True

    def _finish(self, http: list[HttpMetrics], tcp: list[TcpMetrics]) -> Snapshot:
        # A series bound ahead of use (a destination's, before any request failed short of an
        # endpoint) is not shown until it counts something, as Linkerd shows no empty series.
        http = [m for m in http if m.requests or m.by_status]
        errors = []
        for (direction, error, addr), n in self._tcp_errors.items():
            errors.append((direction, f'error="{escape_label(error)}"{_addr_labels(addr)}', n))
        extra: list[str] = []
        for source in list(self._sources):
            try:
                out = source()
                text = out if isinstance(out, str) else "\n".join(out)
            except Exception:
                log.exception("metrics source %r failed; left out of this scrape", source)
                continue
            if text:
                extra.append(text if text.endswith("\n") else text + "\n")
        return Snapshot(http, tcp, errors, self._build_info, self._start_time, self._process, extra)

    def _expired(self, m: HttpMetrics | TcpMetrics, activity: int, now: float) -> bool:
        # Idle: no count moved since the last scrape that saw a change.
        if activity != m._seen:
            m._seen = activity
            m._idle_since = now
            return False
        if now - m._idle_since < self.retain_idle:
            return False
        # Held by a caller (a live connection, a body in flight): keep it, they may count into it.
        return sys.getrefcount(m) <= _HELD_BY_REGISTRY_ONLY

    def render(self, now: float | None = None) -> str:
        """Snapshot and format in the calling thread (tests, tools; not the proxy's loop)."""
        return format_snapshot(self.snapshot(time.monotonic() if now is None else now))

    async def render_async(self) -> str:
        """Snapshot on the loop, format in a worker thread."""
        snap = await self.snapshot_async(time.monotonic())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, format_snapshot, snap)

    async def render_chunks_async(self) -> list[bytes]:
        """Like :meth:`render_async`, as bytes chunks to write as they are: what /metrics serves."""
        snap = await self.snapshot_async(time.monotonic())
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, format_chunks, snap)

    def series_count(self) -> int:
        """Live label sets (HTTP and TCP), for tests and the benchmark."""
        return len(self._http) + len(self._tcp)


# --------------------------------------------------------------------------------------------
# Formatting: pure, thread-safe (reads only the snapshot and /proc).


def format_snapshot(snap: Snapshot) -> str:
    """The Prometheus text exposition (version 0.0.4) of one snapshot."""
    return "".join(iter_exposition(snap))


def format_chunks(snap: Snapshot) -> list[bytes]:
    """The exposition as bytes chunks of about 64 KiB, to write without one big join."""
    chunks = []
    for block in iter_exposition(snap):
        chunks.append(block.encode())
        # Hand the GIL back now rather than at the next 5 ms switch interval: the event loop,
        # which waits for it after every poll, gets it within one block's formatting time.
        time.sleep(0)
    return chunks


# Lines per block: small joins, so the formatting thread never holds the GIL for long at once
# (one str.join of a 10,000-series scrape held it for ~100 ms and stalled the event loop).
_BLOCK_LINES = 256


_FAMILY_HELP = {
    "request_total": "Total count of HTTP requests.",
    "response_latency_ms": "Elapsed times between a request's headers being received and its response headers"
                           " being sent.",
    "response_total": "Total count of HTTP responses.",
}


def http_family(series: list[HttpMetrics], prefix: str = "") -> Iterator[str]:
    """request_total, response_latency_ms and response_total of ``series`` (names after ``prefix``:
    ``route_`` for ``route_request_total`` and so on), in blocks of a few hundred lines."""
    out: list[str] = []
    a = out.append
    req, lat, rsp = f"{prefix}request_total", f"{prefix}response_latency_ms", f"{prefix}response_total"
    a(f"# HELP {req} {_FAMILY_HELP['request_total']}\n# TYPE {req} counter\n")
    for hm in series:
        a(f"{req}{{{hm.label}}} {hm.requests}\n")
        if len(out) >= _BLOCK_LINES:
            yield "".join(out)
            out.clear()
    a(f"# HELP {lat} {_FAMILY_HELP['response_latency_ms']}\n# TYPE {lat} histogram\n")
    les = LE
    for hm in series:
        for st in list(hm.by_status.values()):
            base = hm.label + st.label
            counts = st.latency.counts.copy()
            cum = 0
            for i in range(NBUCKETS):
                cum += counts[i]
                a(f'{lat}_bucket{{{base},le="{les[i]}"}} {cum}\n')
            a(f"{lat}_sum{{{base}}} {_num(st.latency.sum_ms)}\n")
            a(f"{lat}_count{{{base}}} {cum}\n")
            if len(out) >= _BLOCK_LINES:
                yield "".join(out)
                out.clear()
    a(f"# HELP {rsp} {_FAMILY_HELP['response_total']}\n# TYPE {rsp} counter\n")
    for hm in series:
        for st in list(hm.by_status.values()):
            for rc in list(st.classes.values()):
                a(f"{rsp}{{{hm.label}{st.label}{rc.label}}} {rc.count}\n")
        if len(out) >= _BLOCK_LINES:
            yield "".join(out)
            out.clear()
    if out:
        yield "".join(out)


def iter_exposition(snap: Snapshot) -> Iterator[str]:
    """The exposition in blocks of at most a few hundred lines."""
    out: list[str] = []
    a = out.append
    if snap.http:
        yield from http_family(snap.http)
    if snap.tcp:
        rows = [
            (tm.label, tm.open_total, tm.read_bytes, tm.write_bytes, list(tm.closes.items()))
            for tm in snap.tcp
        ]
        a("# HELP tcp_open_total Total count of opened connections\n# TYPE tcp_open_total counter\n")
        a("".join(f"tcp_open_total{{{label}}} {opened}\n" for label, opened, _, _, _ in rows))
        a(
            "# HELP tcp_open_connections Number of currently-open connections\n"
            "# TYPE tcp_open_connections gauge\n"
        )
        a(
            "".join(
                f"tcp_open_connections{{{label}}} {opened - sum(n for _, n in closes)}\n"
                for label, opened, _, _, closes in rows
            )
        )
        a(
            "# HELP tcp_read_bytes_total Total count of bytes read from peers\n"
            "# TYPE tcp_read_bytes_total counter\n"
        )
        a("".join(f"tcp_read_bytes_total{{{label}}} {read}\n" for label, _, read, _, _ in rows))
        a(
            "# HELP tcp_write_bytes_total Total count of bytes written to peers\n"
            "# TYPE tcp_write_bytes_total counter\n"
        )
        a("".join(f"tcp_write_bytes_total{{{label}}} {written}\n" for label, _, _, written, _ in rows))
        a("# HELP tcp_close_total Total count of closed connections\n# TYPE tcp_close_total counter\n")
        for label, _, _, _, closes in rows:
            for (cls, err), n in closes:
                elabel = "" if err is None else f',error="{escape_label(err)}"'
                a(f'tcp_close_total{{{label},classification="{cls}"{elabel}}} {n}\n')
        yield "".join(out)
        out.clear()
    for direction in ("inbound", "outbound"):
        errors = [(label, n) for d, label, n in snap.tcp_errors if d == direction]
        if errors:
            name = f"{direction}_tcp_errors_total"
            a(
                f"# HELP {name} The total number of {direction} TCP connections that could not be"
                f" processed due to a proxy error.\n# TYPE {name} counter\n"
            )
            for label, n in errors:
                a(f"{name}{{{label}}} {n}\n")
    if snap.process:
        out.extend(_process_lines(snap.start_time))
    a("# HELP proxy_build_info Proxy build info\n# TYPE proxy_build_info gauge\n")
    a(snap.build_info)
    out.extend(snap.extra)
    yield "".join(out)


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


# --------------------------------------------------------------------------------------------
# process_* from /proc (Linux); absent values are left out rather than guessed.


def _process_start_time() -> float | None:
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name (which may hold spaces) start at field 3.
        fields = stat[stat.rindex(b")") + 2 :].split()
        start_ticks = int(fields[19])
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return int(line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return None


def _process_lines(start_time: float | None) -> list[str]:
    out: list[str] = []
    if start_time is not None:
        out.append(
            "# HELP process_start_time_seconds Time that the process started (in seconds since the"
            " UNIX epoch)\n# TYPE process_start_time_seconds gauge\n"
            f"process_start_time_seconds {int(start_time)}\n"
        )
    t = os.times()
    out.append(
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        f"# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {t.user + t.system:.2f}\n"
    )
    try:
        with open("/proc/self/statm", "rb") as f:
            vm_pages, rss_pages = (int(x) for x in f.read().split()[:2])
        page = os.sysconf("SC_PAGE_SIZE")
        out.append(
            "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
            f"# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {vm_pages * page}\n"
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
            "# TYPE process_resident_memory_bytes gauge\n"
            f"process_resident_memory_bytes {rss_pages * page}\n"
        )
    except (OSError, ValueError):
        pass
    try:
        fds = len(os.listdir("/proc/self/fd"))
        out.append(
            "# HELP process_open_fds Number of open file descriptors.\n"
            f"# TYPE process_open_fds gauge\nprocess_open_fds {fds}\n"
        )
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        out.append(
            "# HELP process_max_fds Maximum number of open file descriptors.\n"
            f"# TYPE process_max_fds gauge\nprocess_max_fds {soft}\n"
        )
    return out
