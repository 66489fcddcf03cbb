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
    .venv/bin/python bench/instructions.py --mesh    # two proxies (outbound -> inbound), plaintext and mTLS
    .venv/bin/python bench/instructions.py --policy     # inbound under a Server, a route authz, a rate limit

With ``--mesh`` each build runs a meshed pair (a client proxy's outbound listener to a server proxy's
inbound listener, in plaintext and then over mTLS with identities from a local identity service),
both under callgrind, and the figure is both proxies' instructions per request together.

With ``--policy`` each proxy's inbound port gets its policy from a scripted policy service: a Server,
an AuthorizationPolicy on an HTTPRoute matching the requests, and a rate limit in force (never hit);
builds from before inbound policy do not know the flags.

Each build is a checkout with its own .venv (and compiled hot path, `scripts/build-native`). Every proxy
runs as deployed: `python -OO -X no_debug_ranges -m tether proxy` (tether.core.sidecar), with one hash
seed (PYTHONHASHSEED=0) so that two runs of one build count the same to within a few instructions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness as h

from tether.core.sidecar import LOCALE_ENV, python_argv

AUTHORITY = "bench.local:80"
GRPC_AUTHORITY = "grpc.local:8079"
ROUTES = 20
PATHS = ("outbound", "inbound", "grpc", "routes")
HEADINGS = {"outbound": "HTTP/1 outbound", "inbound": "HTTP/1 inbound", "grpc": "gRPC unary out",
            "routes": "20 routes + split"}
PING = "/fgrpc.PingServer/Ping"
# Every counted proxy's environment: the C locale as deployed, and one hash seed, so that dict and set
# probing (string hashes) is the same in every run: with a random seed the keep-alive columns moved by
# ~0.5% between runs of the same build.
COUNTED_ENV = {**LOCALE_ENV, "PYTHONHASHSEED": "0"}


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


def static_destinations(workdir: Path, backend_port: int, grpc_port: int) -> list[str]:
    """Proxy flags: both destinations from a destinations file."""
    dest = workdir / "destinations.yaml"
    dest.write_text(f'destinations: {{"{AUTHORITY}": ["127.0.0.1:{backend_port}"], '
                    f'"{GRPC_AUTHORITY}": ["127.0.0.1:{grpc_port}"]}}\n')
    return ["--destinations-file", str(dest)]


def routed_destination(backend_port: int) -> tuple[list[str], Callable[[], None]]:
    """Proxy flags: a scripted destination service serving a 20-route profile (the request matches
    the last route) and a 90/10 split over two authorities, as bench/http1.py's tether-routes."""
    from tether.api.gen import destination_pb2 as d
    from tether.testing.destination import ScriptedDestination, route

    canary = "bench-canary.local:80"
    routes = [route(f"GET /r{i}", "GET", f"/r{i}/[^/]*") for i in range(ROUTES - 1)]
    routes.append(route("GET /echo", "GET", "/echo"))
    profile = d.DestinationProfile(fully_qualified_name=AUTHORITY, routes=routes, dst_overrides=[
        d.WeightedDst(authority=AUTHORITY, weight=900), d.WeightedDst(authority=canary, weight=100)])
    dst = ScriptedDestination({AUTHORITY: [backend_port], canary: [backend_port]}, {AUTHORITY: profile}).start()
    return ["--destination-addrs", f"127.0.0.1:{dst.port}"], dst.stop


@contextlib.contextmanager
def proxy_under_callgrind(python: Path, workdir: Path, backend_port: int, discovery: list[str],
                          extra: tuple[str, ...] = ()) -> Iterator[tuple[int, int, int, Path]]:
    """A `tether proxy` of ``python``'s build under callgrind: (pid, outbound, inbound, out file)."""
    out, inb, admin = h.free_port(), h.free_port(), h.free_port()
    cg_out = workdir / "callgrind.out"
    log = (workdir / "proxy.log").open("w")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", f"--callgrind-out-file={cg_out}",
         *python_argv(str(python)), "proxy", "--outbound-addr", f"127.0.0.1:{out}",
         "--inbound-addr", f"127.0.0.1:{inb}", "--admin-addr", f"127.0.0.1:{admin}",
         *discovery, "--inbound-app-addr", f"127.0.0.1:{backend_port}",
         "--shutdown-grace-period", "1s",
         # The loop-lag sampler ticks on wall time, which valgrind stretches by how busy the
         # machine is: off, so the counts are per request and not per second of slowness.
         "--loop-lag-interval", "0", *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **COUNTED_ENV})
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
    return count_many([(pid, cg_out)], send, n, warmup)


def count_many(procs: list[tuple[int, Path]], send: Callable[[int], None], n: int, warmup: int) -> float:
    """Instructions per request of several callgrind processes together (a meshed pair)."""
    send(warmup)
    for _, cg_out in procs:
        for f in cg_out.parent.glob(cg_out.name + ".*"):
            f.unlink()
    for pid, _ in procs:
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    send(n)
    for pid, _ in procs:
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    grand = 0
    for _, cg_out in procs:
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
            raise RuntimeError(f"callgrind wrote no totals to {cg_out}")
        grand += total
    return grand / n


def keep(dest: Path | None, cg_out: Path, label: str) -> None:
    """Copy the profiles callgrind just dumped for ``cg_out`` into ``dest`` as ``label.N``."""
    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(cg_out.parent.glob(cg_out.name + ".*"))):
        shutil.copyfile(f, dest / f"callgrind.{label}.{i}")


@contextlib.contextmanager
def _callgrind(python: Path, workdir: Path, name: str, args: list[str],
               env: dict[str, str] | None = None) -> Iterator[tuple[int, Path]]:
    cg_out = workdir / f"callgrind-{name}.out"
    log = (workdir / f"{name}.log").open("w")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", f"--callgrind-out-file={cg_out}",
         *python_argv(str(python)), "proxy", "--shutdown-grace-period", "1s", *args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **COUNTED_ENV, **(env or {})})
    try:
        yield proc.pid, cg_out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# The client proxy pools nothing; a burst of handshakes under valgrind takes more than the 1 s default.
_NO_POOL = ("--pool-max-idle-per-endpoint", "0", "--outbound-connect-timeout", "60s")
# TLS session resumption off on both proxies (an environment variable: builds from before it ignore it).
_NO_RESUMPTION = {"TETHER_PROXY_IDENTITY_TLS_SESSION_MAX_AGE": "0"}


@contextlib.contextmanager
def mesh_pair_under_callgrind(python: Path, workdir: Path, backend_port: int, mtls: bool, mesh: object | None,
                              client_flags: tuple[str, ...] = (), env: dict[str, str] | None = None,
                              hint: str | None = None) -> Iterator[tuple[list[tuple[int, Path]], int]]:
    """A client proxy and a server proxy of ``python``'s build under callgrind: (procs, outbound port).
    ``hint``: the endpoint's protocol hint (h2: HTTP/1 between the proxies as HTTP/2, this release's
    default to a pod the destination hints; without it, HTTP/1)."""
    out, in_port = h.free_port(), h.free_port()
    out_admin, in_admin = h.free_port(), h.free_port()
    endpoint: dict[str, object] = {"addr": f"127.0.0.1:{backend_port}", "proxy_port": in_port}
    server_extra: list[str] = []
    client_extra: list[str] = []
    if mtls:
        from tether.testing.mesh import LocalMesh

        assert isinstance(mesh, LocalMesh)
        for w, extra in ((mesh.workload("server"), server_extra), (mesh.workload("client"), client_extra)):
            extra += ["--identity-name", w.identity, "--identity-token-path", str(w.token_path),
                      "--identity-trust-anchors", str(mesh.anchors), "--identity-addrs", mesh.identity_addrs[0]]
            if w.name == "server":
                endpoint["identity"] = w.identity
    if hint:
        endpoint["protocol_hint"] = hint
    dest = workdir / "mesh-destinations.yaml"
    dest.write_text(json.dumps({"destinations": {AUTHORITY: [endpoint]}}))
    server_args = ["--inbound-addr", f"127.0.0.1:{in_port}", "--outbound-addr", f"127.0.0.1:{h.free_port()}",
                   "--admin-addr", f"127.0.0.1:{in_admin}", "--inbound-app-addr", f"127.0.0.1:{backend_port}",
                   *server_extra]
    client_args = ["--outbound-addr", f"127.0.0.1:{out}", "--inbound-addr", f"127.0.0.1:{h.free_port()}",
                   "--admin-addr", f"127.0.0.1:{out_admin}", "--destinations-file", str(dest), *client_extra,
                   *client_flags]
    with _callgrind(python, workdir, "server", server_args, env) as server, \
            _callgrind(python, workdir, "client", client_args, env) as client:
        h.wait_until(h.http_ok(f"http://127.0.0.1:{in_admin}/ready"), 180, "server proxy /ready under valgrind")
        h.wait_until(h.http_ok(f"http://127.0.0.1:{out_admin}/ready"), 180, "client proxy /ready under valgrind")
        yield [server, client], out


def mesh_main(args: argparse.Namespace, builds: list[list[str]]) -> int:
    """--mesh: both proxies of a meshed pair, per request, plaintext and mTLS."""
    from tether.testing.mesh import LocalMesh

    fortio = h.go_tool("fortio")
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tether-bench-ir-mesh-") as tmp:
        work = Path(tmp)
        mesh = LocalMesh(work / "mesh")
        mesh.work.mkdir(parents=True)
        mesh.create_ca()
        mesh.start_identity()
        backend_port = h.free_port()
        backend = h.start_fortio_server(fortio, work, backend_port, h.free_port())
        try:
            with h.running(backend):
                for rep in range(args.repeat):
                    for name, checkout in builds:
                        python = Path(checkout).resolve() / ".venv" / "bin" / "python"
                        got: dict[str, float] = {}
                        # "handshake": the client proxy keeps no idle connection, so each request is a new
                        # mTLS connection (fewer requests: each costs ~100x a pooled one), a full handshake
                        # (resumption off); "resumed": the same with resumption on (the warm-up's first
                        # connection leaves a session; builds without resumption do full handshakes here).
                        hs_n, hs_w = max(1, args.requests // 10), max(1, args.warmup // 10)
                        # "mtls-h2": the mTLS pair with the endpoint hinted h2 (builds before 0.2.0 ignore the
                        # hint: HTTP/1 there too).
                        for kind, mtls, flags, n, w, env in (
                                ("plain", False, (), args.requests, args.warmup, None),
                                ("mtls", True, (), args.requests, args.warmup, None),
                                ("mtls-h2", True, (), args.requests, args.warmup, None),
                                ("handshake", True, _NO_POOL, hs_n, hs_w, _NO_RESUMPTION),
                                ("resumed", True, _NO_POOL, hs_n, hs_w, None)):
                            bdir = work / f"{name}-{kind}-{len(rows.get(name, {}))}"
                            bdir.mkdir(exist_ok=True)
                            pair = mesh_pair_under_callgrind(python, bdir, backend_port, mtls, mesh, flags, env,
                                                             hint="h2" if kind == "mtls-h2" else None)
                            with pair as (procs, out):
                                got[kind] = count_many(procs, lambda k: keepalive_requests(out, k, AUTHORITY), n, w)
                                for (_, cg), side in zip(procs, ("server", "client"), strict=True):
                                    keep(args.keep, cg, f"{name}-{rep}-{kind}-{side}")
                        print(f"{name}: " + ", ".join(f"{k} {v:,.0f} Ir/request" for k, v in got.items()),
                              flush=True)
                        best = rows.setdefault(name, {})
                        for k, v in got.items():
                            best[k] = min(best.get(k, v), v)
        finally:
            mesh.close()
    base = rows[builds[0][0]]
    print(f"\nuser-space instructions per request through two proxies, both counted (valgrind callgrind; min of "
          f"{args.repeat} runs of {args.requests} requests on one keep-alive connection after {args.warmup} warm-up;"
          f" new mTLS connection each: a tenth as many, full handshakes, then resumed sessions)")
    heads = ("two hops plaintext", "two hops mTLS", "mTLS adds", "mTLS, HTTP/2 between", "new mTLS conn each",
             "resumed mTLS conn each")
    print(f"{'build':<12}" + "".join(f"{p:>24}" for p in heads))
    for name, r in rows.items():
        p_ir, m_ir, h2, hs, rs = r["plain"], r["mtls"], r["mtls-h2"], r["handshake"], r["resumed"]
        cells = (f"{p_ir:,.0f} ({p_ir / base['plain']:.3f}x)", f"{m_ir:,.0f} ({m_ir / base['mtls']:.3f}x)",
                 f"{m_ir - p_ir:,.0f} (+{(m_ir - p_ir) / p_ir:.0%})", f"{h2:,.0f} ({h2 / base['mtls-h2']:.3f}x)",
                 f"{hs:,.0f} ({hs / base['handshake']:.3f}x)",
                 f"{rs:,.0f} ({rs / base['resumed']:.3f}x)")
        print(f"{name:<12}" + "".join(f"{c:>24}" for c in cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="append", default=[], metavar="NAME=CHECKOUT",
                   help="a checkout with its own .venv (repeatable; default: this one)")
    p.add_argument("--requests", type=int, default=2000, help="counted requests per path")
    p.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    p.add_argument("--repeat", type=int, default=2, help="runs per build (the table shows the minimum)")
    p.add_argument("--mesh", action="store_true", help="a meshed pair of proxies, plaintext and mTLS")
    p.add_argument("--policy", action="store_true",
                   help="the inbound port under a Server, a route authorization and a rate limit")
    p.add_argument("--paths", default=",".join(PATHS), metavar="P,Q",
                   help=f"which paths to count, comma-separated (default: all of {','.join(PATHS)})")
    p.add_argument("--keep", metavar="DIR", type=Path,
                   help="copy each run's callgrind profiles into DIR (for callgrind_annotate)")
    args = p.parse_args(argv)
    paths = tuple(x for x in args.paths.split(",") if x)
    unknown = [x for x in paths if x not in PATHS]
    if unknown or not paths:
        print(f"--paths: unknown path {','.join(unknown) or '(none)'}; choose from {','.join(PATHS)}", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    builds = [b.split("=", 1) for b in args.build] or [["this", str(h.REPO)]]
    if args.mesh:
        return mesh_main(args, builds)
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
            for rep in range(args.repeat):  # interleaved: before, after, before, after
                for name, checkout in builds:
                    python = Path(checkout).resolve() / ".venv" / "bin" / "python"
                    bdir = work / f"{name}-{rep}"
                    bdir.mkdir(exist_ok=True)
                    n, w = args.requests, args.warmup
                    static = static_destinations(bdir, backend_port, grpc_port)
                    got: dict[str, float] = {}
                    one_proxy = [x for x in ("outbound", "inbound", "grpc") if x in paths]
                    if one_proxy:
                        with proxy_under_callgrind(python, bdir, backend_port, static, extra) as (pid, out, inb, cg):
                            sends: dict[str, Callable[[int], None]] = {
                                "outbound": lambda k: keepalive_requests(out, k, AUTHORITY),
                                "inbound": lambda k: keepalive_requests(inb, k, "web.local:8080"),
                                "grpc": lambda k: grpc_calls(out, k),
                            }
                            for path in one_proxy:
                                got[path] = count(pid, cg, sends[path], n, w)
                                keep(args.keep, cg, f"{name}-{rep}-{path}")
                    if "routes" in paths:
                        routed, stop = routed_destination(backend_port)
                        rdir = bdir / "routes"
                        rdir.mkdir(exist_ok=True)
                        try:
                            with proxy_under_callgrind(python, rdir, backend_port, routed) as (pid, out, _, cg):
                                got["routes"] = count(pid, cg, lambda k: keepalive_requests(out, k, AUTHORITY), n, w)
                                keep(args.keep, cg, f"{name}-{rep}-routes")
                        finally:
                            stop()
                    print(f"{name}: " + ", ".join(f"{k} {v:,.0f} Ir/request" for k, v in got.items()), flush=True)
                    best = rows.setdefault(name, {})
                    for k, v in got.items():
                        best[k] = min(best.get(k, v), v)
    base = rows[builds[0][0]]
    print(f"\nuser-space instructions per proxied HTTP/1.1 request (valgrind callgrind; min of {args.repeat}"
          f" runs of {args.requests} requests after {args.warmup} warm-up)")
    print(f"{'build':<12}" + "".join(f"{HEADINGS[p]:>22}" for p in paths))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{f'{r[k]:,.0f} ({r[k] / base[k]:.3f}x)':>22}" for k in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
