"""The plain proxy's memory: RSS of one `tether proxy` idle, and with many idle client connections.

Run by hand: .venv/bin/python bench/proxy_memory.py [--connections 1000] [--tether PATH]

One proxy (no identity, destinations from a file) in front of a fortio echo server, on loopback:

- idle: VmRSS once /ready answers and one request went through (the pool holds one connection);
- HTTP/1 held: N client connections, each made one keep-alive request and stays open, idle;
  then a second N on top: what each costs once the first N have settled (a connection's serving
  task ends after a tick of its idle timer, 2.5 s by default, and the memory it freed is reused);
- HTTP/1 in flight: N requests left waiting for the backend (fortio delays each answer), so the
  proxy holds N server connections, N client connections to the backend and N requests;
- HTTP/2 held: N client connections with prior knowledge, each made one request and stays open.

Each figure is from a fresh proxy so that one does not inherit the last one's heap. RSS is read
from /proc/PID/status; the proxy's own metrics are not consulted.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness as h
import http1

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _start_proxy(tether: Path, work: Path, backend_port: int) -> tuple[h.Proc, int]:
    port, admin = h.free_port(), h.free_port()
    dst = work / "destinations.yaml"
    dst.write_text(f'destinations: {{"{http1.AUTHORITY}": ["127.0.0.1:{backend_port}"]}}\n')
    proc = h.start("tether", [str(tether), "proxy", "--outbound-addr", f"127.0.0.1:{port}",
                              "--admin-addr", f"127.0.0.1:{admin}", "--destinations-file", str(dst),
                              "--inbound-addr", f"127.0.0.1:{h.free_port()}", "--log-level", "warn",
                              "--pool-max-idle-per-endpoint", "2000"], work)
    h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "tether /ready")
    return proc, port


def _one_request(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(http1.request_bytes())
        if not http1.read_response(s):
            raise RuntimeError("the first request through the proxy failed")


def _settle(pid: int, seconds: float = 1.0) -> int:
    """RSS once it stops moving for `seconds` (at most 10 s)."""
    deadline = time.monotonic() + 10
    last = _rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(seconds)  # a sampling interval, not synchronisation
        now = _rss_kib(pid)
        if now == last:
            break
        last = now
    return last


def _h2_request(authority: str, path: str) -> bytes:
    # SETTINGS (empty), then HEADERS on stream 1 with END_STREAM|END_HEADERS, literal without indexing.
    def lit(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    block = b"\x82\x86" + lit(b":path", path.encode()) + lit(b":authority", authority.encode())
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    headers = len(block).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + block
    return H2_PREFACE + settings + headers


def _h2_read_end(s: socket.socket) -> bool:
    """Read frames until a frame with END_STREAM on stream 1; True when seen."""
    buf = b""
    while True:
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + length:]
            if stream == 1 and ftype in (0, 1) and flags & 0x1:
                return True
            if ftype == 7:
                return False
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk


@contextlib.contextmanager
def _held(port: int, n: int, h2: bool) -> Iterator[int]:
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 120
    try:
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            if h2:
                s.sendall(_h2_request(http1.AUTHORITY, http1.PATH))
                if not _h2_read_end(s):
                    break
            else:
                s.sendall(http1.request_bytes())
                if not http1.read_response(s):
                    break
        yield h.still_open(socks)
    finally:
        for s in socks:
            s.close()


def measure(tether: Path, connections: int) -> list[tuple[str, int, int | None]]:
    fortio = h.go_tool("fortio")
    h.raise_nofile(4 * connections + 1024)
    rows: list[tuple[str, int, int | None]] = []
    with tempfile.TemporaryDirectory(prefix="tether-bench-mem-") as tmp:
        work = Path(tmp)
        backend_port = h.free_port()
        backend = h.start("backend", [str(fortio), "server", "-quiet", "-max-echo-delay", "60s", "-http-port",
                                      f"127.0.0.1:{backend_port}", "-grpc-port", "disabled", "-redirect-port",
                                      "disabled", "-tcp-port", "disabled", "-udp-port", "disabled"], work)
        h.wait_ready(backend, h.tcp_accepting(backend_port), 15, "fortio server")

        def fresh(label: str, hold: Callable[[int], contextlib.AbstractContextManager[int]] | None,
                  again: str | None = None) -> None:
            proc, port = _start_proxy(tether, work, backend_port)
            with h.running(proc):
                _one_request(port)
                idle = _settle(proc.pid)
                if hold is None:
                    rows.append((label, idle, None))
                    return
                with hold(port) as held:
                    rss = _settle(proc.pid, 3.0)
                    rows.append((f"{label} ({held} of {connections})", rss, idle))
                    if again is not None:
                        with hold(port) as held2:
                            rows.append((f"{again} ({held2} of {connections})", _settle(proc.pid, 3.0), rss))

        with h.running(backend):
            fresh("idle", None)
            fresh("HTTP/1 keep-alive connections held", lambda p: _held(p, connections, h2=False),
                  "HTTP/1 keep-alive: a second batch on top")
            fresh("HTTP/1 requests in flight",
                  lambda p: h.requests_in_flight(p, connections, "/echo?size=128&delay=50s", http1.AUTHORITY))
            fresh("HTTP/2 connections held", lambda p: _held(p, connections, h2=True))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--tether", type=Path, default=h.TETHER, help="the tether console script to run")
    a = ap.parse_args(argv)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"one plain tether proxy ({a.tether}); load {load} at start")
    for label, rss, idle in measure(a.tether, a.connections):
        extra = "" if idle is None else (f"  ({idle / 1024:.1f} MiB before: "
                                         f"+{(rss - idle) / a.connections:.1f} KiB per connection)")
        print(f"{label:<58} {rss / 1024:6.1f} MiB{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
