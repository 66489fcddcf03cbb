"""``tether demo``: a real two-proxy mesh on loopback with traffic and its golden metrics.

client --HTTP--> outbound proxy --mTLS--> inbound proxy --HTTP--> web app
                        (identities from a local identity service)

The client is a load generator holding a fixed request rate over keep-alive connections; the
result is read back from both proxies' /metrics, the way a user would read it.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import yaml

from tether.cli.errors import CliError
from tether.cli.params import POSITIVE_DURATION
from tether.core.golden import golden, parse
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, free_port, http_get, wait_for

AUTHORITY = "web.demo.svc.cluster.local:80"




async def _client(port: int, rps: float, duration: float, conns: int) -> tuple[int, int, list[float]]:
    """Fixed-rate load over ``conns`` keep-alive connections; (ok, failed, latencies in ms)."""
    ok = failed = 0
    lat: list[float] = []
    interval = conns / rps
    deadline = time.monotonic() + duration
    req = f"GET / HTTP/1.1\r\nHost: {AUTHORITY}\r\n\r\n".encode()

    async def one_conn(offset: float) -> None:
        nonlocal ok, failed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        nxt = time.monotonic() + offset
        try:
            while nxt < deadline:
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                start = time.monotonic()
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                # Latency from the scheduled send time: coordinated omission is not hidden.
                lat.append((time.monotonic() - min(start, nxt)) * 1000)
                if head.startswith(b"HTTP/1.1 200"):
                    ok += 1
                else:
                    failed += 1
                nxt += interval
        finally:
            writer.close()

    await asyncio.gather(*(one_conn(i * interval / conns) for i in range(conns)))
    return ok, failed, lat


def _direction_is(direction: str) -> Callable[[dict[str, str]], bool]:
    return lambda labels: labels.get("direction") == direction


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _num(value: float, width: int, suffix: str = "") -> str:
    """A number for the table, or ``-`` when there was nothing to measure (never ``nan``)."""
    text = "-" if math.isnan(value) else f"{value:.2f}{suffix}"
    return text.rjust(width)


def _workdir(workdir: str | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="tether-demo-"))
    work = Path(workdir)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise CliError(f"--workdir {workdir}: exists and is not an empty directory (a previous run?); "
                       "pass a new or empty directory")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--workdir {workdir}: cannot create: {e.strerror}") from None
    return work


@click.command("demo", short_help="run a local two-proxy mesh with a demo app and show its golden metrics")
@click.option("--duration", type=POSITIVE_DURATION, default="10s", show_default=True, help="how long to send traffic")
@click.option("--rps", type=click.FloatRange(min=0, min_open=True), default=200.0, show_default=True,
              help="requests per second, held by the client")
@click.option("--connections", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="client keep-alive connections")
@click.option("--keep-running", is_flag=True, help="leave the mesh up after the run (Ctrl-C stops it)")
@click.option("--workdir", type=click.Path(), help="new or empty directory for state, logs and config  "
              "[default: a temporary directory]")
def demo(duration: float, rps: float, connections: int, keep_running: bool, workdir: str | None) -> int:
    """Run a real two-proxy mesh on loopback with a demo app, send traffic, and print the golden
    metrics read from both proxies.

    client -> outbound proxy -> (mTLS) -> inbound proxy -> web app, with identities from a local
    identity service. The state directory (--state-dir for `tether check`, `tether workload list`,
    `tether identity`) is WORKDIR/state.
    """
    work = _workdir(workdir)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # SIGTERM (a supervisor, `timeout`) must still stop every child: exit through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mesh = LocalMesh(work)
    procs: list[Proc] = []
    try:
        mesh.create_ca()
        mesh.start_identity()
        web, client = mesh.workload("web"), mesh.workload("client")
        app_port = free_port()
        procs.append(Proc([sys.executable, "-m", "tether.testing.backend", "--port", str(app_port),
                           "--name", "web"], work / "web.log"))
        inbound = mesh.proxy(web, ready=False, inbound_app_addr=f"127.0.0.1:{app_port}")
        dst = work / "destinations.yaml"
        dst.write_text(yaml.safe_dump({"destinations": {
            AUTHORITY: [{"addr": f"127.0.0.1:{app_port}", "proxy_port": inbound.inbound_port,
                         "identity": web.identity}],
        }}))
        outbound = mesh.proxy(client, ready=False, destinations_file=str(dst))
        inbound.wait_ready(30)
        outbound.wait_ready(30)
        # Their admin addresses in the registry: `tether identity default/web --state-dir ...` finds them.
        mesh.record_admin(web, inbound)
        mesh.record_admin(client, outbound)
        wait_for(lambda: http_get(f"http://127.0.0.1:{app_port}/")[0] == 200, 10, what="demo app up")
        print(f"tether demo: mesh up in {work}")
        print(f"  identity        {mesh.identity_addrs[0]} (trust anchor {mesh.anchors})")
        print(f"  web app         127.0.0.1:{app_port}")
        print(f"  web's proxy     inbound 127.0.0.1:{inbound.inbound_port}, admin {inbound.admin}")
        print(f"  client's proxy  outbound 127.0.0.1:{outbound.outbound_port}, admin {outbound.admin}")
        print(f"  try: curl -H 'Host: {AUTHORITY}' {outbound.outbound}/")
        print(f"       tether identity default/web --state-dir {mesh.state}")
        print(f"       tether check --proxy --state-dir {mesh.state}")
        print(f"sending {rps:g} req/s for {duration:g}s over {connections} connections ...")
        ok, failed, lat = asyncio.run(_client(outbound.outbound_port, rps, duration, connections))
        print(f"client saw: {ok} ok, {failed} failed; latency p50 {_num(_pct(lat, 0.5), 0)} ms, "
              f"p99 {_num(_pct(lat, 0.99), 0)} ms")
        print()
        print("golden metrics, read from each proxy's /metrics (mTLS between the proxies):")
        print(f"{'proxy':<14} {'direction':<9} {'success':>8} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
              "  tls / peer identity")
        for name, proxy, direction in (("client-proxy", outbound, "outbound"), ("web-proxy", inbound, "inbound")):
            samples = parse(proxy.metrics())
            g = golden(samples, _direction_is(direction))
            peers = {(lb.get("tls", ""), lb.get("server_id") or lb.get("client_id") or "-")
                     for n, lb, _ in samples if n == "request_total" and lb.get("direction") == direction}
            peer = ", ".join(f"tls={t} {i}" for t, i in sorted(peers))
            print(f"{name:<14} {direction:<9} {_num(g.success_rate * 100, 8, '%')} {g.requests / duration:8.1f} "
                  f"{_num(g.p50_ms, 8)} {_num(g.p95_ms, 8)} {_num(g.p99_ms, 8)}  {peer or '-'}")
        if keep_running:
            print("\nmesh left running; Ctrl-C to stop")
            try:
                while all(p.popen.poll() is None for p in procs):
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if failed == 0 and ok > 0 else 1
    finally:
        for p in reversed(procs):
            p.stop()
        mesh.close()
