"""Limits under hostile clients: the figures of issue 15, tether and nginx in the same run.

    .venv/bin/python bench/limits.py                      # full scale (10,000 connections, ...)
    .venv/bin/python bench/limits.py --scale ci           # the test suite's scale, seconds each
    .venv/bin/python bench/limits.py --only slowloris,idle --no-nginx

Each scenario gets a fresh proxy (inbound listener -> the test backend in its own process) and,
where the comparison means something, a fresh nginx (one worker, ``proxy_pass`` to the same
backend) with the same timeouts. Figures: how long after its first byte each slowloris connection
was closed, resident memory growth (peak minus start; nginx: master plus workers), what a client
on another connection saw meanwhile (p50/p99, errors: a probe process doing keep-alive GETs), and
the proxy's ``tether_event_loop_lag_max_seconds`` with ``tether_event_loop_blocked_max_seconds``
(the part of that lag the proxy caused, judged against the issue's 50 ms; the rest is the time the
loop waited for a CPU, which measures the machine's other load). The attackers are in
``tether.testing.limits`` (shared with tests/integration/test_limits.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from tether.testing import limits as lim
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

MiB = 2**20


class Scale:
    def __init__(self, full: bool) -> None:
        self.full = full
        self.slow_n, self.header_timeout, self.slow_interval = (10_000, 10.0, 3.0) if full else (300, 2.0, 0.5)
        self.idle_n, self.idle_timeout = (10_000, 90.0) if full else (1_000, 3.0)
        self.stall = 60.0 if full else 2.0
        self.rr_pairs = 100_000 if full else 5_000
        self.cont_frames = 1_000_000 if full else 20_000
        self.control_frames = 5_000_000


@contextlib.contextmanager
def backend(work: Path) -> Iterator[int]:
    port = free_port()
    proc = Proc([sys.executable, "-m", "tether.testing.backend", "--port", str(port), "--name", "app"],
                work / "app.log")
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200, 10, what="the backend")
        yield port
    finally:
        proc.stop()


@contextlib.contextmanager
def tether(work: Path, app_port: int, **flags: Any) -> Iterator[ProxyProc]:
    p = ProxyProc(work, name=f"tether-{time.monotonic_ns()}", inbound_app_addr=f"127.0.0.1:{app_port}",
                  log_level="warn", **flags).wait_ready()
    try:
        yield p
    finally:
        p.stop()


@contextlib.contextmanager
def nginx(work: Path, app_port: int, directives: str) -> Iterator[tuple[int, int]]:
    """nginx with one worker proxying to the backend; yields (port, master pid)."""
    port = free_port()
    block = f"""
    upstream app {{ server 127.0.0.1:{app_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {directives}
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}"""
    d = work / f"nginx-{time.monotonic_ns()}"
    d.mkdir()
    # Room for the 10,000 attackers and the other client (the harness's default is 8,192).
    proc = harness.start_nginx(d, port, block, workers=1, connections=16384)
    try:
        yield port, proc.popen.pid
    finally:
        proc.stop()


def tree_rss(pid: int) -> int:
    return sum(lim.rss_bytes(p) for p in harness.process_tree(pid))


class TreeSampler(lim.RssSampler):
    """Peak resident memory of a process and its children (nginx's master and worker)."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.start = self.peak = tree_rss(pid)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.pid))


def lag(p: ProxyProc) -> str:
    """The loop's largest lag, and the part of it the proxy caused (the rest: waiting for a CPU)."""
    text = p.metrics()
    lag_ms = lim.metric(text, "tether_event_loop_lag_max_seconds") * 1000
    blocked_ms = lim.metric(text, "tether_event_loop_blocked_max_seconds") * 1000
    verdict = "ok" if blocked_ms <= 50 else "MISSED (50 ms)"
    return f"{lag_ms:.0f} ms (blocked by the proxy {blocked_ms:.0f} ms: {verdict})"


def row(name: str, text: str) -> None:
    print(f"  {name:<8} {text}", flush=True)


# -- scenarios ---------------------------------------------------------------------------------------


def slowloris(work: Path, app: int, s: Scale, with_nginx: bool) -> None:
    print(f"slowloris: {s.slow_n} connections, one header byte every {s.slow_interval:g}s, header timeout"
          f" {s.header_timeout:g}s")

    def attack(port: int, sampler: lim.RssSampler) -> str:
        with sampler:
            probe = lim.ProbeProc("127.0.0.1", port, seconds=s.header_timeout + 2 * s.slow_interval + s.slow_n / 2000)
            res = asyncio.run(lim.slowloris("127.0.0.1", port, s.slow_n, s.slow_interval, s.header_timeout + 10))
            served = probe.result()
        closed = [r.closed - r.first_byte for r in res if r.closed is not None]
        failed = sum(1 for r in res if r.sent == 0)
        statuses: dict[bytes, int] = {}
        for r in res:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        return (f"closed {len(closed)}/{s.slow_n} (connect failures {failed}), after their first byte: min"
                f" {min(closed, default=float('nan')):.2f}s max {max(closed, default=float('nan')):.2f}s;"
                f" answers {dict((k.decode() or 'none', v) for k, v in statuses.items())}; memory"
                f" +{sampler.growth / MiB:.1f} MiB; other client: {served.summary()}")

    with tether(work, app, header_read_timeout=f"{s.header_timeout:g}s") as p:
        text = attack(p.inbound_port, lim.RssSampler(p.pid))
        row("tether", f"{text}; loop lag max {lag(p)}")
    if with_nginx:
        with nginx(work, app, f"client_header_timeout {s.header_timeout:g}s;") as (port, pid):
            row("nginx", attack(port, TreeSampler(pid)))


def idle(work: Path, app: int, s: Scale, with_nginx: bool) -> None:
    print(f"idle keep-alive: {s.idle_n} connections, one request each, idle timeout {s.idle_timeout:g}s")

    def attack(port: int, rss: Callable[[], int]) -> str:
        http_get(f"http://127.0.0.1:{port}/")
        before = rss()

        async def go() -> tuple[int, float, list[float | None]]:
            conns = await lim.idle_keepalive("127.0.0.1", port, s.idle_n)
            t0 = time.monotonic()
            held = rss()
            closed = await asyncio.gather(*(lim.wait_closed_by_peer(r, s.idle_timeout + 15) for r, _ in conns))
            for _, w in conns:
                w.transport.abort()
            return held, t0, list(closed)

        held, t0, closed = asyncio.run(go())
        done = [c - t0 for c in closed if c is not None]
        return (f"{(held - before) / s.idle_n / 1024:.1f} KiB per idle connection ({(held - before) / MiB:.1f} MiB"
                f" for {s.idle_n}); closed by the server {len(done)}/{s.idle_n}, the last"
                f" {max(done, default=float('nan')):.1f}s after they went idle")

    with tether(work, app, idle_timeout=f"{s.idle_timeout:g}s") as p:
        row("tether", f"{attack(p.inbound_port, lambda: lim.rss_bytes(p.pid))}; loop lag max {lag(p)}")
    if with_nginx:
        with nginx(work, app, f"keepalive_timeout {s.idle_timeout:g}s;") as (port, pid):
            row("nginx", attack(port, lambda: tree_rss(pid)))


def never_reads(work: Path, app: int, s: Scale, with_nginx: bool) -> None:
    print(f"a client that never reads a 512 MiB response; write stall timeout {s.stall:g}s (nginx: send_timeout)")
    size = 512 * MiB

    def attack(port: int, sampler: lim.RssSampler, is_open: Callable[[], bool]) -> str:
        async def go() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: big\r\n\r\n".encode())
            reader._transport.pause_reading()  # type: ignore[attr-defined]
            t0 = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: not is_open(), s.stall + 30, 0.1, "the close")
            writer.transport.abort()
            return time.monotonic() - t0

        with sampler:
            took = asyncio.run(go())
        return f"closed after {took:.1f}s; memory +{sampler.growth / MiB:.1f} MiB"

    with tether(work, app, write_stall_timeout=f"{s.stall:g}s") as p:
        def open_(p: ProxyProc = p) -> bool:
            try:
                return lim.metric(p.metrics(), "tcp_open_connections", direction="inbound", peer="src") > 0
            except KeyError:
                return False
        row("tether", f"{attack(p.inbound_port, lim.RssSampler(p.pid), open_)}; loop lag max {lag(p)}")
    if with_nginx:
        with nginx(work, app, f"send_timeout {s.stall:g}s;") as (port, pid):
            def nginx_open(port: int = port) -> bool:
                # Established connections from nginx's listening port to the client (not the listener).
                out = harness.subprocess.run(["ss", "-tnH", "state", "established"], capture_output=True,
                                             text=True).stdout
                return any(line.split()[2].endswith(f":{port}") for line in out.splitlines()
                           if len(line.split()) >= 4)
            row("nginx", attack(port, TreeSampler(pid), nginx_open))

    print(f"an upstream that never reads a 512 MiB request body; write stall timeout {s.stall:g}s")
    _srv, up_port, stop = lim.never_reading_upstream()
    try:
        with tether(work, up_port, write_stall_timeout=f"{s.stall:g}s") as p, lim.RssSampler(p.pid) as rss:
            async def go() -> tuple[bytes, float, int]:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.inbound_port)
                writer.write(f"POST /up HTTP/1.1\r\nHost: up\r\nContent-Length: {size}\r\n\r\n".encode())
                sent = 0

                async def send() -> None:
                    nonlocal sent
                    with contextlib.suppress(OSError):
                        while sent < size:
                            writer.write(b"x" * 65536)
                            await writer.drain()
                            sent += 65536

                task = asyncio.create_task(send())
                t0 = time.monotonic()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), s.stall + 30)
                task.cancel()
                writer.transport.abort()
                return head.split(b"\r\n")[0], time.monotonic() - t0, sent

            status, took, sent = asyncio.run(go())
            row("tether", f"{status.decode()} after {took:.1f}s; body bytes the proxy took {sent / MiB:.1f} MiB;"
                          f" memory +{rss.growth / MiB:.1f} MiB; loop lag max {lag(p)}")
    finally:
        stop.set()


def h2(work: Path, app: int, s: Scale, with_nginx: bool) -> None:
    def run(title: str, attack: Callable[[int], lim.FloodResult], **flags: str) -> None:
        with tether(work, app, write_stall_timeout=f"{s.stall:g}s", **flags) as p, lim.RssSampler(p.pid) as rss:
            probe = lim.ProbeProc("127.0.0.1", p.inbound_port, seconds=3, interval=0.02)
            res = attack(p.inbound_port)
            served = probe.result()
            goaways: dict[str, int] = {}
            for g in res.goaways:
                goaways[g] = goaways.get(g, 0) + 1
            print(f"{title}")
            row("tether", f"{res.sent} sent over {res.connections} connection(s) in {res.seconds:.1f}s; GOAWAY"
                          f" {goaways}; memory +{rss.growth / MiB:.1f} MiB; other client: {served.summary()};"
                          f" loop lag max {lag(p)}")

    run(f"HTTP/2 rapid reset: {s.rr_pairs} HEADERS+RST_STREAM pairs (CVE-2023-44487)",
        lambda port: asyncio.run(lim.rapid_reset("127.0.0.1", port, s.rr_pairs)))
    for payload in (0, 16384):
        run(f"HTTP/2 CONTINUATION flood, {payload}-byte frames (CVE-2024-27316)",
            partial(_sync, lim.continuation_flood, frames=s.cont_frames, payload=payload))
    for kind in ("ping", "settings"):
        run(f"HTTP/2 {kind.upper()} flood, answers never read (CVE-2019-9512/9515)",
            partial(_sync, lim.control_flood, kind=kind, frames=s.control_frames, read=False,
                    wait_close=s.stall + 1))
        run(f"HTTP/2 {kind.upper()} flood, answers read",
            partial(_sync, lim.control_flood, kind=kind, frames=s.control_frames // 5, read=True,
                    wait_close=0.5))

    def zero(port: int) -> lim.FloodResult:
        t0 = time.monotonic()
        reply, done = asyncio.run(lim.zero_window("127.0.0.1", port, b"/bytes/1048576", 100, s.stall + 10))
        codes = sorted({lim.ERRORS.get(c, str(c)) for c in reply.resets.values()})
        print(f"  (streams reset {len(reply.resets)}/100 with {codes} after {done - t0:.1f}s; DATA bytes sent"
              f" {reply.data_bytes})")
        return lim.FloodResult(100, 1, [reply.goaway_name], done - t0, reply)

    run("HTTP/2 zero-window stall: 100 streams of 1 MiB, initial window 0 (CVE-2019-9517)", zero)


def _sync(attack: Callable[..., Any], port: int, **kw: Any) -> lim.FloodResult:
    result: lim.FloodResult = asyncio.run(attack("127.0.0.1", port, **kw))
    return result


SCENARIOS = {"slowloris": slowloris, "idle": idle, "never-reads": never_reads, "h2": h2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("full", "ci"), default="full")
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--no-nginx", action="store_true", help="tether only")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - set(SCENARIOS)
    if unknown:
        ap.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    # The attackers' own loop holds up to 10,000 sockets: uvloop keeps its lag (which delays when a
    # close is seen, and so the figures) well below the default loop's.
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with_nginx = not args.no_nginx and harness.shutil.which("nginx") is not None
    s = Scale(args.scale == "full")
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"scale {args.scale}; open files limit {hard}; nginx {'yes' if with_nginx else 'no'}")
    with tempfile.TemporaryDirectory(prefix="tether-limits-") as tmp:
        work = Path(tmp)
        with backend(work) as app:
            for name in args.only.split(","):
                SCENARIOS[name](work, app, s, with_nginx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
