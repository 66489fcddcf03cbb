"""Resource limits under hostile clients, with real sockets against a real proxy process.

Each test runs at a CI scale of a few seconds; ``TETHER_LIMITS_SCALE=full`` runs the scale of
issue 15 (10,000 slowloris and idle connections, 100,000 rapid-reset pairs) with the proxy's
default timeouts. ``bench/limits.py`` prints the same figures (and nginx's where comparable).

Every test also reads the proxy's ``tether_event_loop_blocked_max_seconds`` (its loop's largest lag
less the time it waited for a CPU: what the proxy itself held the loop) and holds it to a bound
(50 ms at full scale, as the issue asks; looser at CI scale, whose small runs are dominated by
start-up and garbage collections on a shared machine).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing import limits as lim
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

FULL = os.environ.get("TETHER_LIMITS_SCALE", "ci") == "full"
# Bound on the loop's own blocking: the 50 ms at full scale.
MAX_LAG = 0.05 if FULL else 0.25


class App:
    """The test backend (tether.testing.backend) in its own process, so the attackers in this
    process do not slow it down."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.proc = Proc([sys.executable, "-m", "tether.testing.backend", "--port", str(self.port), "--name", "app"],
                         tmp / "app.log")
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.port}/")[0] == 200, 10, what="the backend")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    a = App(tmp_path)
    yield a
    a.proc.stop()


def lag_max(p: ProxyProc) -> float:
    return lim.metric(p.metrics(), "tether_event_loop_blocked_max_seconds")


def inbound_open(p: ProxyProc) -> float:
    try:
        return lim.metric(p.metrics(), "tcp_open_connections", direction="inbound", peer="src")
    except KeyError:
        return 0.0


# -- slowloris ------------------------------------------------------------------------------------


def test_slowloris_connections_are_closed_at_the_header_timeout_while_others_are_served(proxies, app) -> None:  # type: ignore[no-untyped-def]
    n, timeout, interval = (10_000, 10.0, 3.0) if FULL else (300, 2.0, 0.5)
    p = proxies("in", inbound_app_addr=app.addr, header_read_timeout=f"{timeout}s", log_level="warn")
    host, port = "127.0.0.1", p.inbound_port

    with lim.RssSampler(p.pid) as rss:
        probe = lim.ProbeProc(host, port, seconds=timeout + 2 * interval + (n / 2000))
        results = asyncio.run(lim.slowloris(host, port, n, interval, give_up=timeout + 5))
        served = probe.result()

    opened = [r for r in results if r.sent > 0]
    assert len(opened) == n, [r.status for r in results if r.sent == 0][:3]
    still_open = [r for r in results if r.closed is None]
    assert not still_open, f"{len(still_open)} slowloris connections still open after {timeout + 5}s"
    took = [r.closed - r.first_byte for r in results if r.closed is not None]
    late = [t for t in took if t > timeout + 1]
    assert not late, f"{len(late)} closed later than the header timeout + 1 s: worst {max(late):.2f}s"
    early = [t for t in took if t < timeout - 0.1]
    assert not early, f"{len(early)} closed before the header timeout: {min(early):.2f}s"
    assert {r.status for r in results} == {b"408"}
    # Other clients were served meanwhile, promptly.
    assert served.errors == 0, served.error
    assert served.ok > 0
    assert served.p99 < (10 if FULL else 100), served.summary()
    assert rss.growth < 100 * 2**20, f"memory grew {rss.growth / 2**20:.1f} MiB"
    assert lag_max(p) < MAX_LAG


def test_a_head_slower_than_detection_is_still_http_and_never_reaches_the_app(proxies) -> None:  # type: ignore[no-untyped-def]
    # One byte every 1.5 s: detection (1 s) times out before "GET " is complete. The bytes look
    # like HTTP/1, so the HTTP/1 server takes them and its header timeout answers 408; forwarded
    # as opaque TCP instead, every slow client would hold a connection to the application.
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(8)
    app.settimeout(0.2)
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{app.getsockname()[1]}", detect_timeout="1s",
                header_read_timeout="3s", log_level="warn")
    results = asyncio.run(lim.slowloris("127.0.0.1", p.inbound_port, 5, interval=1.5, give_up=8))
    assert [r.status for r in results] == [b"408"] * 5
    assert all(r.closed is not None and 2.9 < r.closed - r.first_byte < 4 for r in results)
    with pytest.raises(TimeoutError):
        app.accept()  # the application never saw a connection
    app.close()


def test_a_head_whose_timeout_ran_out_during_detection_gets_408(proxies, app) -> None:  # type: ignore[no-untyped-def]
    # Detection and the header timeout both 1 s. Clients send "G" and nothing more; the proxy is then
    # stopped (SIGSTOP, as a busy machine may deschedule it) across the detection deadline. When it
    # runs again, detection gives up and hands each connection to the HTTP/1 server with its head's
    # time already spent: the header timer starts with no delay left, which uvloop schedules as
    # call_soon. That path once failed the requests with a 400 "callback error" instead of the 408.
    p = proxies("in", inbound_app_addr=app.addr, detect_timeout="1s", header_read_timeout="1s", log_level="warn")
    n = 20

    async def scenario() -> list[bytes]:
        conns = [await asyncio.open_connection("127.0.0.1", p.inbound_port) for _ in range(n)]
        for _, writer in conns:
            writer.write(b"G")
        await asyncio.sleep(0.3)  # accepted and "G" read (on a slow machine later: then the test is weaker)
        os.kill(p.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.5)  # past the detection deadline while stopped
        finally:
            os.kill(p.pid, signal.SIGCONT)
        answers = [await asyncio.wait_for(reader.read(4096), 10) for reader, _ in conns]
        for _, writer in conns:
            writer.close()
        return answers

    answers = asyncio.run(scenario())
    assert {a[:12] for a in answers} == {b"HTTP/1.1 408"}, [a[:120] for a in answers if a[:12] != b"HTTP/1.1 408"][:2]


def test_the_header_timeout_counts_from_the_first_byte_when_detection_took_most_of_it(proxies, app) -> None:  # type: ignore[no-untyped-def]
    # Bytes every 2.5 s: detection sees "GET " at 7.5 s, 0.5 s before the 8 s header timeout that
    # counts from the first byte. The 408 comes at 8 s, not at the HTTP/1 server's next timer tick
    # (a quarter of the timeout after it started: 9.5 s).
    p = proxies("in", inbound_app_addr=app.addr, header_read_timeout="8s", log_level="warn")
    results = asyncio.run(lim.slowloris("127.0.0.1", p.inbound_port, 5, interval=2.5, give_up=12))
    assert [r.status for r in results] == [b"408"] * 5
    took = [r.closed - r.first_byte for r in results if r.closed is not None]
    assert len(took) == 5 and all(7.9 < t < 8.6 for t in took), took


# -- idle keep-alive connections ------------------------------------------------------------------


def test_idle_keepalive_connections_are_cheap_and_freed_at_the_idle_timeout(proxies, app) -> None:  # type: ignore[no-untyped-def]
    n, idle = (10_000, 90.0) if FULL else (1_000, 3.0)
    p = proxies("in", inbound_app_addr=app.addr, idle_timeout=f"{idle}s", log_level="warn")
    host, port = "127.0.0.1", p.inbound_port
    http_get(f"http://{host}:{port}/")  # the upstream pool and the stack exist before the baseline
    before = lim.rss_bytes(p.pid)

    async def scenario() -> tuple[int, float, list[float | None]]:
        conns = await lim.idle_keepalive(host, port, n)
        opened_at = time.monotonic()
        held = lim.rss_bytes(p.pid)
        closed = await asyncio.gather(*(lim.wait_closed_by_peer(r, idle + 10) for r, _ in conns))
        for _, w in conns:
            w.transport.abort()
        return held, opened_at, list(closed)

    held, opened_at, closed = asyncio.run(scenario())
    per_conn = (held - before) / n
    print(f"\n{n} idle keep-alive connections: {per_conn / 1024:.1f} KiB each")
    assert per_conn < 64 * 1024, f"{per_conn / 1024:.1f} KiB per idle connection"
    assert all(c is not None for c in closed), f"{sum(c is None for c in closed)} idle connections not closed"
    last = max(c for c in closed if c is not None) - opened_at
    assert last < idle + 2, f"the last idle connection closed {last:.1f}s after they went idle"
    wait_for(lambda: inbound_open(p) == 0, 10, what="the proxy to count no open inbound connection")
    assert lag_max(p) < MAX_LAG


# -- a client that never reads, an upstream that never reads --------------------------------------


def test_a_client_that_never_reads_its_response_is_cut_off_with_bounded_memory(proxies, app) -> None:  # type: ignore[no-untyped-def]
    stall = 60.0 if FULL else 2.0
    p = proxies("in", inbound_app_addr=app.addr, write_stall_timeout=f"{stall}s", log_level="warn")
    host, port = "127.0.0.1", p.inbound_port
    size = 512 * 2**20  # far more than any buffer: the proxy must stop reading the upstream

    async def scenario() -> float:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(lim.socket.SOL_SOCKET, lim.socket.SO_RCVBUF, 4096)
        writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: big\r\n\r\n".encode())
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # never read a byte
        t0 = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: inbound_open(p) == 0, stall + 15, 0.1,
                                "the proxy to close the connection of the client that does not read")
        writer.transport.abort()
        return time.monotonic() - t0

    with lim.RssSampler(p.pid) as rss:
        took = asyncio.run(scenario())
    assert took < stall + 3, f"closed after {took:.1f}s"
    assert rss.growth < 32 * 2**20, f"memory grew {rss.growth / 2**20:.1f} MiB"
    # The proxy still serves, and the upstream was released (the next request gets a connection).
    assert http_get(f"http://{host}:{port}/")[0] == 200
    assert lag_max(p) < MAX_LAG


def test_an_upstream_that_never_reads_its_request_fails_it_with_bounded_memory(proxies) -> None:  # type: ignore[no-untyped-def]
    stall = 60.0 if FULL else 2.0
    _srv, up_port, stop = lim.never_reading_upstream()
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{up_port}", write_stall_timeout=f"{stall}s", log_level="warn")
    host, port = "127.0.0.1", p.inbound_port
    size = 512 * 2**20

    async def scenario() -> tuple[bytes, float, int]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST /upload HTTP/1.1\r\nHost: up\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"x" * 65536
        sent = 0

        async def send() -> None:
            nonlocal sent
            with_err = (OSError,)
            try:
                while sent < size:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            except with_err:
                pass

        sender = asyncio.create_task(send())
        t0 = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), stall + 15)
        took = time.monotonic() - t0
        sender.cancel()
        writer.transport.abort()
        return head, took, sent

    try:
        with lim.RssSampler(p.pid) as rss:
            head, took, sent = asyncio.run(scenario())
    finally:
        stop.set()
    assert head.startswith(b"HTTP/1.1 502"), head
    assert took < stall + 3, f"answered after {took:.1f}s"
    assert sent < 64 * 2**20, f"the proxy took {sent / 2**20:.0f} MiB of a body it could not forward"
    assert rss.growth < 32 * 2**20, f"memory grew {rss.growth / 2**20:.1f} MiB"
    assert lag_max(p) < MAX_LAG


# -- HTTP/2 floods --------------------------------------------------------------------------------


@pytest.fixture
def h2proxy(proxies, app) -> ProxyProc:  # type: ignore[no-untyped-def]
    return proxies("in", inbound_app_addr=app.addr, log_level="warn",
                   write_stall_timeout="60s" if FULL else "2s")


def _others_served(p: ProxyProc, seconds: float) -> lim.ProbeProc:
    return lim.ProbeProc("127.0.0.1", p.inbound_port, seconds=seconds, interval=0.02)


def test_h2_rapid_reset_gets_goaway_with_bounded_memory(h2proxy) -> None:  # type: ignore[no-untyped-def]
    pairs = 100_000 if FULL else 5_000
    p = h2proxy
    with lim.RssSampler(p.pid) as rss:
        probe = _others_served(p, 3)
        res = asyncio.run(lim.rapid_reset("127.0.0.1", p.inbound_port, pairs))
        served = probe.result()
    print(f"\nrapid reset: {res.sent} pairs over {res.connections} connections in {res.seconds:.1f}s;"
          f" GOAWAY {set(res.goaways)}; memory +{rss.growth / 2**20:.1f} MiB; others: {served.summary()}")
    assert res.sent == pairs
    # The flood's connections were ended with ENHANCE_YOUR_CALM (the last one's share of the
    # flood may have been too small to judge).
    assert res.goaways[0] == "ENHANCE_YOUR_CALM", res.goaways[:5]
    assert set(res.goaways[:-1]) <= {"ENHANCE_YOUR_CALM"}, res.goaways[:5]
    assert rss.growth < 50 * 2**20
    assert served.errors == 0, served.error
    assert lag_max(p) < MAX_LAG


@pytest.mark.parametrize("payload", [0, 1, 16384], ids=["empty", "1-byte", "16KiB"])
def test_h2_continuation_flood_gets_goaway(h2proxy, payload: int) -> None:  # type: ignore[no-untyped-def]
    p = h2proxy
    frames = 1_000_000 if FULL else 20_000
    with lim.RssSampler(p.pid) as rss:
        res = asyncio.run(lim.continuation_flood("127.0.0.1", p.inbound_port, frames, payload))
    assert res.goaways == ["ENHANCE_YOUR_CALM"], res.goaways
    assert res.reply is not None and res.reply.closed_at is not None
    assert rss.growth < 50 * 2**20
    assert http_get(f"http://127.0.0.1:{p.inbound_port}/")[0] == 200


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_h2_control_flood_that_reads_nothing_is_closed_with_bounded_memory(h2proxy, kind: str) -> None:  # type: ignore[no-untyped-def]
    p = h2proxy
    frames = 5_000_000  # 85 MB: more than the kernel's socket buffers hold
    stall = 60.0 if FULL else 2.0
    with lim.RssSampler(p.pid) as rss:
        probe = _others_served(p, 3)
        res = asyncio.run(lim.control_flood("127.0.0.1", p.inbound_port, kind, frames, read=False,
                                            wait_close=stall + 1))
        served = probe.result()
    print(f"\n{kind} flood, acks never read: {res.sent} frames written before the proxy stopped reading;"
          f" memory +{rss.growth / 2**20:.1f} MiB; others: {served.summary()}")
    assert res.sent < frames, "the proxy read the whole flood while its answers piled up"
    assert res.reply is not None and res.reply.closed_at is not None, "the connection was never closed"
    assert rss.growth < 50 * 2**20
    assert served.errors == 0, served.error
    assert lag_max(p) < MAX_LAG


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_h2_control_flood_that_reads_is_answered_without_harming_others(h2proxy, kind: str) -> None:  # type: ignore[no-untyped-def]
    p = h2proxy
    frames = 1_000_000 if FULL else 50_000
    with lim.RssSampler(p.pid) as rss:
        probe = _others_served(p, 3)
        res = asyncio.run(lim.control_flood("127.0.0.1", p.inbound_port, kind, frames, read=True, wait_close=0.5))
        served = probe.result()
    print(f"\n{kind} flood, acks read: {res.sent} frames in {res.seconds:.1f}s; memory +{rss.growth / 2**20:.1f} MiB;"
          f" others: {served.summary()}")
    assert rss.growth < 50 * 2**20
    assert served.errors == 0, served.error
    assert lag_max(p) < MAX_LAG


def test_h2_zero_window_stall_resets_the_streams_and_frees_the_upstream(h2proxy, app) -> None:  # type: ignore[no-untyped-def]
    p = h2proxy
    stall = 60.0 if FULL else 2.0
    streams = 100 if FULL else 20
    with lim.RssSampler(p.pid) as rss:
        t0 = time.monotonic()
        reply, done = asyncio.run(lim.zero_window("127.0.0.1", p.inbound_port, b"/bytes/1048576", streams,
                                                  stall + 10))
    assert reply.headers == {1 + 2 * i for i in range(streams)}, "every stream got its response head"
    assert {reply.resets.get(1 + 2 * i) for i in range(streams)} == {lim.CANCEL}, reply.resets
    assert reply.data_bytes == 0
    assert done - t0 < stall + 3
    assert rss.growth < 50 * 2**20
    assert http_get(f"http://127.0.0.1:{p.inbound_port}/")[0] == 200
    assert lag_max(p) < MAX_LAG
