"""Instructions per proxied request, counted by valgrind, for one or more builds of tether side by side.

CPU time on a shared VM drifts with its neighbours; instruction counts do not. This runs each
build's `tether proxy` under callgrind (instrumentation off until warmed up), sends the same
keep-alive HTTP/1.1 requests through its outbound listener (a balanced destination from a
destinations file) and its inbound listener (to the application address), and gRPC unary calls
(grpcio to fortio's ping server) through the outbound listener, and prints user-space
instructions (Ir) per request for each, with the ratio to the first build. Kernel work (loopback
TCP, epoll) is not counted: compare builds with it, not with nginx.

    .venv/bin/python bench/instructions.py                          # this checkout
    .venv/bin/python bench/instructions.py --build before=/path/to/other/checkout --build after=.
    .venv/bin/python bench/instructions.py --policy     # inbound under a Server, a route authz, a rate limit

With ``--policy`` each proxy's inbound port gets its policy from a scripted policy service: a Server,
an AuthorizationPolicy on an HTTPRoute matching the requests, and a rate limit in force (never hit);
builds from before inbound policy do not know the flags.

Each build is a checkout with its own .venv (and compiled hot path, `scripts/build-native`).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness as h

AUTHORITY = "bench.local:80"
GRPC_AUTHORITY = "grpc.local:8079"
PING = "/fgrpc.PingServer/Ping"


def grpc_calls(port: int, n: int) -> None:
    """``n`` unary gRPC calls (fortio's Ping, an empty message) over one HTTP/2 connection."""
    import grpc  # the grpcio client: a real gRPC peer

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", GRPC_AUTHORITY)]) as ch:
        ping = ch.unary_unary(PING, request_serializer=None, response_deserializer=None)
        for _ in range(n):
            ping(b"", timeout=30)


def keepalive_requests(port: int, n: int, host: str) -> None:
    """``n`` GETs over one keep-alive connection; each must answer 200."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        f = c.makefile("rb")
        req = f"GET /echo?size=128 HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tether-bench\r\n\r\n".encode()
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


@contextlib.contextmanager
def proxy_under_callgrind(python: Path, workdir: Path, backend_port: int, grpc_port: int,
                          extra: tuple[str, ...] = ()) -> Iterator[tuple[int, int, int, Path]]:
    """A `tether proxy` of ``python``'s build under callgrind: (pid, outbound, inbound, out file)."""
    dest = workdir / "destinations.yaml"
    dest.write_text(f'destinations: {{"{AUTHORITY}": ["127.0.0.1:{backend_port}"], '
                    f'"{GRPC_AUTHORITY}": ["127.0.0.1:{grpc_port}"]}}\n')
    out, inb, admin = h.free_port(), h.free_port(), h.free_port()
    cg_out = workdir / "callgrind.out"
    log = (workdir / "proxy.log").open("w")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={cg_out}",
         str(python), "-m", "tether", "proxy", "--outbound-addr", f"127.0.0.1:{out}",
         "--inbound-addr", f"127.0.0.1:{inb}", "--admin-addr", f"127.0.0.1:{admin}",
         "--destinations-file", str(dest), "--inbound-app-addr", f"127.0.0.1:{backend_port}",
         "--shutdown-grace-period", "1s", *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        h.wait_until(h.http_ok(f"http://127.0.0.1:{admin}/ready"), 180, "tether /ready under valgrind")
        yield proc.pid, out, inb, cg_out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def count(pid: int, cg_out: Path, send: Callable[[int], None], n: int, warmup: int) -> float:
    """Instructions per request for ``n`` requests after ``warmup`` uncounted ones."""
    send(warmup)
    for f in cg_out.parent.glob(cg_out.name + ".*"):
        f.unlink()
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    send(n)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    total = 0
    deadline = time.monotonic() + 30
    while not total and time.monotonic() < deadline:
        for f in cg_out.parent.glob(cg_out.name + ".*"):
            for line in f.read_text(errors="replace").splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        if not total:
            time.sleep(0.2)
    if not total:
        raise RuntimeError("callgrind wrote no totals")
    return total / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="append", default=[], metavar="NAME=CHECKOUT",
                   help="a checkout with its own .venv (repeatable; default: this one)")
    p.add_argument("--requests", type=int, default=2000, help="counted requests per path")
    p.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    p.add_argument("--repeat", type=int, default=2, help="runs per build (the table shows the minimum)")
    p.add_argument("--policy", action="store_true",
                   help="the inbound port under a Server, a route authorization and a rate limit")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    builds = [b.split("=", 1) for b in args.build] or [["this", str(h.REPO)]]
    fortio = h.go_tool("fortio")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tether-bench-ir-") as tmp:
        work = Path(tmp)
        backend_port, grpc_port = h.free_port(), h.free_port()
        backend = h.start_fortio_server(fortio, work, backend_port, grpc_port)
        extra: tuple[str, ...] = ()
        policy_server = None
        if args.policy:
            from tether.testing.policy import BENCH_WORKLOAD, bench_policy_server

            policy_server = bench_policy_server(backend_port)
            extra = ("--policy-addrs", f"127.0.0.1:{policy_server.port}", "--policy-workload", BENCH_WORKLOAD)
        with h.running(backend), contextlib.ExitStack() as stack:
            if policy_server is not None:
                stack.callback(policy_server.stop)
            for _ in range(args.repeat):  # interleaved: before, after, before, after
                for name, checkout in builds:
                    python = Path(checkout).resolve() / ".venv" / "bin" / "python"
                    bdir = work / f"{name}-{len(rows.get(name, {}))}"
                    bdir.mkdir(exist_ok=True)
                    with proxy_under_callgrind(python, bdir, backend_port, grpc_port, extra) as (pid, out, inb, cg):
                        n, w = args.requests, args.warmup
                        got = {
                            "outbound": count(pid, cg, lambda k: keepalive_requests(out, k, AUTHORITY), n, w),
                            "inbound": count(pid, cg, lambda k: keepalive_requests(inb, k, "web.local:8080"), n, w),
                            "grpc": count(pid, cg, lambda k: grpc_calls(out, k), n, w),
                        }
                    print(f"{name}: " + ", ".join(f"{k} {v:,.0f} Ir/request" for k, v in got.items()), flush=True)
                    best = rows.setdefault(name, {})
                    for k, v in got.items():
                        best[k] = min(best.get(k, v), v)
    base = rows[builds[0][0]]
    print(f"\nuser-space instructions per proxied HTTP/1.1 request (valgrind callgrind; min of {args.repeat}"
          f" runs of {args.requests} requests after {args.warmup} warm-up)")
    paths = ("outbound", "inbound", "grpc")
    print(f"{'build':<12}" + "".join(f"{p:>22}" for p in ("HTTP/1 outbound", "HTTP/1 inbound", "gRPC unary out")))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{f'{r[k]:,.0f} ({r[k] / base[k]:.3f}x)':>22}" for k in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
