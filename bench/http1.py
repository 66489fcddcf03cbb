"""HTTP/1.1 side by side: direct, nginx, haproxy and one tether proxy in front of a fortio echo server.

Run by hand: .venv/bin/python bench/http1.py   (bench/README.md says what each figure means)
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import harness as h

AUTHORITY = "bench.local:80"
PATH = "/echo?size=128"  # a small response: 128 bytes of body
TARGETS = ("direct", "nginx", "haproxy", "tether")
# Also available with --targets: a proxy fed by a (scripted) destination service, with a profile
# of 20 routes (the request matches the last) and a 90/10 split: what routing costs.
EXTRA_TARGETS = ("tether-routes", "tether-inbound", "tether-policy")
ROUTES = 20
_scripted: list[object] = []


def start_tether_inbound(workdir: Path, port: int, backend_port: int, policy: bool) -> h.Proc:
    """A `tether proxy` whose *inbound* listener serves the backend: with ``policy``, under a Server, an
    AuthorizationPolicy on an HTTPRoute and a rate limit in force (from a scripted policy service);
    without, under the default policy (all-unauthenticated, no control plane)."""
    admin = h.free_port()
    args = [str(h.TETHER), "proxy", "--inbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
            "--outbound-addr", f"127.0.0.1:{h.free_port()}", "--inbound-app-addr", f"127.0.0.1:{backend_port}"]
    name = "tether-inbound"
    if policy:
        from tether.testing.policy import BENCH_WORKLOAD, bench_policy_server

        srv = bench_policy_server(backend_port)
        _scripted.append(srv)
        args += ["--policy-addrs", f"127.0.0.1:{srv.port}", "--policy-workload", BENCH_WORKLOAD]
        name = "tether-policy"
    proc = h.start(name, args, workdir)
    return h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "tether /ready")


def start_tether_routes(workdir: Path, port: int, backend_port: int) -> h.Proc:
    """A `tether proxy` whose destination service serves a 20-route profile and a 90/10 split."""
    from tether.api.gen import destination_pb2 as d
    from tether.testing.destination import ScriptedDestination, route

    canary = "bench-canary.local:80"
    routes = [route(f"GET /r{i}", "GET", f"/r{i}/[^/]*") for i in range(ROUTES - 1)]
    routes.append(route("GET /echo", "GET", "/echo"))
    profile = d.DestinationProfile(fully_qualified_name=AUTHORITY, routes=routes, dst_overrides=[
        d.WeightedDst(authority=AUTHORITY, weight=900), d.WeightedDst(authority=canary, weight=100)])
    dst = ScriptedDestination({AUTHORITY: [backend_port], canary: [backend_port]}, {AUTHORITY: profile}).start()
    _scripted.append(dst)
    admin = h.free_port()
    proc = h.start("tether-routes", [
        str(h.TETHER), "proxy", "--outbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
        "--destination-addrs", f"127.0.0.1:{dst.port}", "--inbound-addr", f"127.0.0.1:{h.free_port()}",
    ], workdir)
    return h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "tether /ready")


def request_bytes() -> bytes:
    return f"GET {PATH} HTTP/1.1\r\nHost: {AUTHORITY}\r\nUser-Agent: tether-bench\r\n\r\n".encode()


def read_response(sock: socket.socket) -> bool:
    """Read one whole response (a Content-Length or a chunked body); True when it was a 200.

    All of it: a body left unread makes the socket poll readable, which ``still_open`` counts as
    closed (a proxy that answers chunked, as one relaying an HTTP/2 response does, looked as if it
    closed client connections)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    # A chunked body ends with its last chunk (no trailers here): "0" CRLF CRLF.
    while (not body.endswith(b"0\r\n\r\n")) if chunked else len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        body += chunk
    return head.split(b" ", 2)[1] == b"200"


@contextlib.contextmanager
def hold_http1(port: int, n: int, timeout: float = 60.0) -> Iterator[int]:
    """Open n keep-alive connections, make one request on each, keep them open; yields how many work."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        req = request_bytes()
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(s)
                s.sendall(req)
                if not read_response(s):
                    break
            except OSError:
                break
        yield h.still_open(socks)
    finally:
        for s in socks:
            s.close()


def start_backend(fortio: Path, workdir: Path, port: int) -> h.Proc:
    return h.start_fortio_server(fortio, workdir, port, "disabled")


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    port = h.free_port()
    proc: h.Proc | None = None
    if name == "direct":
        port = backend_port
    elif name == "nginx":
        proc = h.start_nginx(
            workdir,
            port,
            f"""    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}""",
            workers,
        )
    elif name == "haproxy":
        proc = h.start_haproxy(workdir, port, f"127.0.0.1:{port}", f"127.0.0.1:{backend_port}", workers)
    elif name == "tether-routes":
        proc = start_tether_routes(workdir, port, backend_port)
    elif name in ("tether-inbound", "tether-policy"):
        proc = start_tether_inbound(workdir, port, backend_port, policy=name == "tether-policy")
    else:
        reason = h.tether_unavailable_reason()
        if reason is not None:
            raise h.Skip(reason)
        proc = h.start_tether(workdir, port, h.free_port(), AUTHORITY, backend_port)

    target = ["-H", f"Host: {AUTHORITY}", f"http://127.0.0.1:{port}{PATH}"]

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        return h.fortio_load(fortio, target, qps, connections, seconds, workdir, ok_codes=("200",))

    def hold(n: int) -> contextlib.AbstractContextManager[int]:
        return hold_http1(port, n)

    return h.Target(name, proc, load, hold)


def targets_check(results: Sequence[h.TargetResult]) -> str:
    """The issue's targets for the tether proxy, relative to nginx."""
    by = {r.name: r for r in results if r.skipped is None}
    t, n = by.get("tether"), by.get("nginx")
    if t is None or n is None:
        return ""
    get = {label: fn for label, fn, _ in h.metrics([1000])}
    lines = ["", "targets (tether against nginx):"]
    # Paired per round (see harness.paired_saturation_ratio): steadier on a shared machine.
    t_sat, n_sat = get["saturation req/s"](t), get["saturation req/s"](n)
    paired = h.paired_saturation_ratio(t, n)
    if paired is not None and t_sat and n_sat:
        verdict = "ok" if paired >= 0.6 else "MISSED"
        lines.append(f"  saturation >= 0.6x nginx: {paired:.2f}x paired per round ({t_sat / n_sat:.2f}x of the medians)"
                     f" {verdict}")
    t_runs, n_runs = t.at_rate.get(1000, []), n.at_rate.get(1000, [])
    diffs = [a.p99_ms - b.p99_ms for a, b in zip(t_runs, n_runs, strict=False)]
    added = h.median(diffs)
    if added is not None:
        verdict = "ok" if added <= 0.5 else "MISSED"
        lines.append(f"  p99 @ 1,000/s within +0.5 ms of nginx: {added:+.3f} ms paired per round"
                     f" (rounds: {', '.join(f'{d:+.2f}' for d in diffs)}) {verdict}")
    for label, kib, limit in (("idle", t.rss_idle_kib, 32), ("with 1k conns", t.rss_held_kib, 64)):
        if kib is not None:
            mib = kib / 1024
            lines.append(f"  RSS {label} <= {limit} MiB: {mib:.1f} MiB {'ok' if mib <= limit else 'MISSED'}")
    # Issue 16's one-hop targets.
    t_cpu, n_cpu = h.median(t.cpu_us_per_request), h.median(n.cpu_us_per_request)
    if t_cpu and n_cpu:
        ratio = t_cpu / n_cpu
        lines.append(f"  CPU per request <= 1.3x nginx (issue 16): {t_cpu:.1f} vs {n_cpu:.1f} us, {ratio:.2f}x"
                     f" {'ok' if ratio <= 1.3 else 'MISSED'}")
    t999 = [r.p999_ms for r in t.at_rate.get(5000, [])]
    n999 = [r.p999_ms for r in n.at_rate.get(5000, [])]
    ratios = [a / b for a, b in zip(t999, n999, strict=False) if b > 0]
    tail = h.median(ratios)
    if tail is not None:
        lines.append(f"  p99.9 @ 5,000/s within 1.5x nginx (issue 16): {tail:.2f}x paired per round"
                     f" (rounds: {', '.join(f'{x:.2f}x' for x in ratios)}) {'ok' if tail <= 1.5 else 'MISSED'}")
    return "\n".join(lines)


SUITE = h.Suite(
    kind="http1",
    script="bench/http1.py",
    title=f"HTTP/1.1 GET {PATH}",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=start_backend,
    start_target=start_target,
    summary=targets_check,
    extra_targets=EXTRA_TARGETS,
)

if __name__ == "__main__":
    try:
        sys.exit(h.main(SUITE))
    finally:
        for scripted in _scripted:
            scripted.stop()  # type: ignore[attr-defined]
