"""Instructions per request (callgrind) through one tether proxy's inbound listener with tracing and tap:
the same figures as bench/observability.py, but counted, so they do not drift with a shared machine.

Configurations: tracing off (without and with a traceparent header, which costs its parsing and
forwarding whatever the proxy does with it); a collector configured and every request carrying an unsampled W3C
context; every request sampled (span recorded and exported over OTLP/gRPC to a real collector, the
export counted: it runs in the proxy); requests without context at --trace-sample-rate 0.1; an
identity and no tap; the same with a tap of every request running (events encoded and sent by the
proxy, counted; the client reads them in this process).

    .venv/bin/python bench/observability_instructions.py [--requests 1000] [--warmup 200]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness as h
import instructions as ins
import observability as obs

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def sender(port: int, header: str) -> Callable[[int], None]:
    def send(n: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as c:
            f = c.makefile("rb")
            req = (f"GET /echo?size=128 HTTP/1.1\r\nHost: bench.local\r\nUser-Agent: tether-bench\r\n{header}\r\n"
                   .encode())
            for _ in range(n):
                c.sendall(req)
                status = f.readline()
                if not status.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected response {status!r}")
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
    return send


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=200)
    args = ap.parse_args()
    python = h.REPO / ".venv" / "bin" / "python"
    fortio = h.go_tool("fortio")
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tether-obs-ins-") as d:
        work = Path(d)
        backend_port = h.free_port()
        backend = h.start_fortio_server(fortio, work, backend_port, "disabled")
        collector = obs._collector(work)
        sampled = f"traceparent: 00-{TRACE}-00f067aa0ba902b7-01\r\n"
        unsampled = f"traceparent: 00-{TRACE}-00f067aa0ba902b7-00\r\n"
        trace = ["--trace-collector", f"127.0.0.1:{collector}", "--trace-export-interval", "200ms"]
        configs: list[tuple[str, list[str], str]] = [
            ("tracing off, no tap", [], ""),
            ("tracing off, an unsampled traceparent sent", [], unsampled),
            ("trace context not sampled", trace, unsampled),
            ("every request sampled (span exported)", trace, sampled),
            ("no context, sample rate 0.1", [*trace, "--trace-sample-rate", "0.1"], ""),
        ]
        try:
            for i, (name, flags, header) in enumerate(configs):
                cdir = work / f"c{i}"
                cdir.mkdir()
                with ins.proxy_under_callgrind(python, cdir, backend_port, [], tuple(flags)) as (pid, _o, inb, cg):
                    rows.append((name, ins.count(pid, cg, sender(inb, header), args.requests, args.warmup)))
                print(f"  {name}: {rows[-1][1]:,.0f}", flush=True)
            for tapped in (False, True):
                cdir = work / f"id{int(tapped)}"
                cdir.mkdir()
                tap_port = h.free_port()
                flags, ident = obs._identity_flags(cdir, tap_port)
                with ins.proxy_under_callgrind(python, cdir, backend_port, [], tuple(flags)) as (pid, _o, inb, cg):
                    if tapped:
                        mesh, w = ident  # type: ignore[misc]
                        obs._start_tap(mesh, w, tap_port)
                        counted = obs._keep[-1][1]  # type: ignore[index]
                        deadline = time.monotonic() + 180
                        while not counted["events"]:  # the tap runs once events for a request come back
                            if time.monotonic() > deadline:
                                raise RuntimeError("the tap never delivered an event")
                            sender(inb, "")(1)
                            time.sleep(0.2)
                    name = "identity, a tap of every request" if tapped else "identity, no tap"
                    rows.append((name, ins.count(pid, cg, sender(inb, ""), args.requests, args.warmup)))
                print(f"  {name}: {rows[-1][1]:,.0f}", flush=True)
        finally:
            backend.stop()
            obs.cleanup()
    base = rows[0][1]
    ident = rows[5][1]
    print("\nuser-space instructions per HTTP/1.1 request through one tether proxy's inbound listener "
          f"(callgrind; {args.requests} requests after {args.warmup})")
    for i, (name, n) in enumerate(rows):
        ref, refname = (ident, "identity, no tap") if i == 6 else (base, "tracing off")
        print(f"  {name:40s} {n:>10,.0f}  {n / ref:.3f}x {refname}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
