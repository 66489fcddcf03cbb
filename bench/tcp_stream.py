"""Opaque TCP bulk streams side by side: direct, haproxy (mode tcp), tether with zero-copy splice
(os.splice) and tether copying through Python (TETHER_PROXY_TCP_ZERO_COPY=false).

Each stream asks the backend for N bytes and reads them to the end. Reported per target: throughput
(one stream, and 8 at once), the proxy's CPU seconds per GiB moved, and its peak RSS (VmHWM).

Run by hand: .venv/bin/python bench/tcp_stream.py   (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import harness as h

# The backend: a separate process (no GIL shared with the client) answering "send me N bytes" with
# N bytes from a buffer, then closing its side.
BACKEND = r"""
import socket, struct, sys, threading
block = b"x" * (1 << 20)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(64)
def serve(c):
    with c:
        (n,) = struct.unpack("!Q", c.recv(8, socket.MSG_WAITALL))
        view = memoryview(block)
        while n:
            k = min(n, len(block)); c.sendall(view[:k]); n -= k
        c.shutdown(socket.SHUT_WR)
        c.recv(1)
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

TARGETS = ("direct", "haproxy", "tether-zero-copy", "tether-copy")


def stream(port: int, n: int) -> int:
    """Ask for n bytes through `port`, read them all; returns the bytes read."""
    buf = bytearray(1 << 20)
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(struct.pack("!Q", n))
        while k := s.recv_into(buf):
            got += k
    return got


def run_streams(port: int, streams: int, total: int) -> float:
    """Seconds to move `total` bytes over `streams` parallel connections."""
    each = total // streams
    results: list[int] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda: results.append(stream(port, each))) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if sum(results) != each * streams:
        raise RuntimeError(f"short read through port {port}: {sum(results)} of {each * streams} bytes")
    return elapsed


def peak_rss_kib(pid: int) -> int:
    """VmHWM (the peak resident set) of `pid` and its descendants, in KiB."""
    total = 0
    for p in h.process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def start_haproxy_tcp(workdir: Path, port: int, backend_port: int) -> h.Proc:
    conf = workdir / "haproxy-tcp.cfg"
    conf.write_text(f"""global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bench
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server backend 127.0.0.1:{backend_port}
""")
    proc = h.start("haproxy", [h.require("haproxy"), "-db", "-f", str(conf)], workdir)
    return h.wait_ready(proc, h.tcp_accepting(port), 15, "haproxy to listen")


def start_tether_tcp(workdir: Path, name: str, port: int, backend_port: int, zero_copy: bool) -> h.Proc:
    admin = h.free_port()
    argv = [str(h.TETHER), "proxy", "--inbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
            "--outbound-addr", f"127.0.0.1:{h.free_port()}", "--inbound-app-addr", f"127.0.0.1:{backend_port}",
            "--opaque-ports", str(backend_port)]
    proc = h.start(name, argv, workdir, env={"TETHER_PROXY_TCP_ZERO_COPY": "true" if zero_copy else "false"})
    return h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, f"{name} /ready")


@contextlib.contextmanager
def targets(workdir: Path, backend_port: int, names: list[str]) -> Iterator[dict[str, tuple[int, h.Proc | None]]]:
    out: dict[str, tuple[int, h.Proc | None]] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            port = h.free_port()
            proc: h.Proc | None = None
            if name == "direct":
                port = backend_port
            elif name == "haproxy":
                proc = start_haproxy_tcp(workdir, port, backend_port)
            else:
                proc = start_tether_tcp(workdir, name, port, backend_port, zero_copy=name == "tether-zero-copy")
            if proc is not None:
                stack.enter_context(h.running(proc))
            out[name] = (port, proc)
        yield out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=512, help="bytes moved per point, in MiB")
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args()
    names = [n for n in args.targets.split(",") if n]
    total = args.mib << 20
    env = h.environment({"haproxy": h.tool_version([h.require("haproxy"), "-v"])})
    steal0 = h.cpu_steal()
    started = time.monotonic()
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory(prefix="tether-bench-tcp-") as tmp:
        workdir = Path(tmp)
        backend_port = h.free_port()
        backend = h.start("backend", [sys.executable, "-c", BACKEND, str(backend_port)], workdir)
        with h.running(h.wait_ready(backend, h.tcp_accepting(backend_port), 15, "backend")), \
                targets(workdir, backend_port, names) as running:
            for port, _ in running.values():
                run_streams(port, 1, 16 << 20)  # warm-up
            for rnd in range(args.rounds):
                for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                    port, proc = running[name]
                    r = rows[name]
                    for streams in (1, 8):
                        cpu0 = h.cpu_seconds(proc.pid) if proc else 0.0
                        secs = run_streams(port, streams, total)
                        label = f"{streams} stream{'s' if streams > 1 else ''}"
                        r.setdefault(f"Gbit/s, {label}", []).append(total * 8 / secs / 1e9)
                        if proc is not None:
                            r.setdefault(f"proxy CPU s/GiB, {label}", []).append(
                                (h.cpu_seconds(proc.pid) - cpu0) / (total / (1 << 30)))
                            r["peak RSS MiB"] = [peak_rss_kib(proc.pid) / 1024]
                    print(f"  [{name}] round {rnd + 1}: " + ", ".join(
                        f"{k} {v[-1]:.2f}" for k, v in r.items()), flush=True)
    steal1 = h.cpu_steal()
    steal = 100 * (steal1[0] - steal0[0]) / max(1, steal1[1] - steal0[1])
    print(f"\nopaque TCP, {args.mib} MiB per point; {time.monotonic() - started:.0f} s; {env['nproc']} cores,"
          f" load {env['loadavg_at_start'][0]:.1f} at start; CPU steal {steal:.1f}% during the run;"
          f" {env['haproxy'].split(' - ')[0]}; haproxy nbthread 1; median of {args.rounds} round(s)")
    metrics = sorted({k for r in rows.values() for k in r}, key=lambda k: (not k.startswith("Gbit"), k))
    width = max(len(m) for m in metrics)
    print(" " * width + "".join(f"{n:>18}" for n in names))
    for m in metrics:
        cells = []
        for n in names:
            vals = rows[n].get(m)
            cells.append(f"{statistics.median(vals):>18.2f}" if vals else f"{'-':>18}")
        print(m.ljust(width) + "".join(cells))
    print("\ncommand: .venv/bin/python bench/tcp_stream.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
