"""``tether demo``: a real two-proxy mesh on loopback with traffic and its golden metrics.

client --HTTP--> outbound proxy --mTLS--> inbound proxy --HTTP--> web app
                        (identities from a local identity service)

The client is a load generator holding a fixed request rate over keep-alive connections; the
result is read back from both proxies' /metrics, the way a user would read it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tether.core.golden import golden, parse
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, free_port, http_get, wait_for

AUTHORITY = "web.demo.svc.cluster.local:80"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser("demo", help="run a local two-proxy mesh with a demo app and show its golden metrics")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of traffic (default 10)")
    p.add_argument("--rps", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--connections", type=int, default=4, help="client keep-alive connections (default 4)")
    p.add_argument("--keep-running", action="store_true", help="leave the mesh up after the run (Ctrl-C stops)")
    p.add_argument("--workdir", default=None, help="where logs and config go (default: a temp dir)")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # SIGTERM (a supervisor, `timeout`) must still stop every child: exit through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tether-demo-"))
    work.mkdir(parents=True, exist_ok=True)
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
        wait_for(lambda: http_get(f"http://127.0.0.1:{app_port}/")[0] == 200, 10, what="demo app up")
        print(f"tether demo: mesh up in {work}")
        print(f"  identity        {mesh.identity_addrs[0]} (trust anchor {mesh.anchors})")
        print(f"  web app         127.0.0.1:{app_port}")
        print(f"  web's proxy     inbound 127.0.0.1:{inbound.inbound_port}, admin {inbound.admin}")
        print(f"  client's proxy  outbound 127.0.0.1:{outbound.outbound_port}, admin {outbound.admin}")
        print(f"  try: curl -H 'Host: {AUTHORITY}' {outbound.outbound}/")
        print(f"sending {args.rps:g} req/s for {args.duration:g}s over {args.connections} connections ...")
        ok, failed, lat = asyncio.run(_client(outbound.outbound_port, args.rps, args.duration, args.connections))
        print(f"client saw: {ok} ok, {failed} failed; latency p50 {_pct(lat, 0.5):.2f} ms, "
              f"p99 {_pct(lat, 0.99):.2f} ms")
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
            print(f"{name:<14} {direction:<9} {g.success_rate * 100:7.2f}% {g.requests / args.duration:8.1f} "
                  f"{g.p50_ms:8.2f} {g.p95_ms:8.2f} {g.p99_ms:8.2f}  {peer}")
        if args.keep_running:
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
