"""The meshed two-hop path side by side: direct, nginx (one hop), and client -> outbound tether proxy
-> inbound tether proxy -> server, in plaintext and over mTLS, in front of a fortio echo server. Over mTLS the
client proxy carries HTTP/1 to its peer on one HTTP/2 connection, as it does to any pod the
destination service hints h2 (the default); tether-2hop-mtls-h1 keeps HTTP/1 between the proxies
(`--outbound-h2-upgrade false`), the path to a peer of an older release.

Run by hand: .venv/bin/python bench/mesh.py   (bench/README.md says what each figure means)

For the two-hop targets the CPU and RSS columns are the two proxies together (both run under one
parent process); the identity service is not counted.

Under the table, after the side-by-side rounds, a fresh meshed pair is measured on its own (one
proxy's RSS, new mTLS connections) and every target of issue 16 that this run can judge is printed
with its ratio and verdict:

- meshed proxy RSS idle: each proxy of an mTLS pair, identity on, certificate loaded (the larger);
- meshed proxy RSS with 1,000 mTLS connections: 1,000 concurrent requests (the backend delays each
  answer by 1 s) make the client proxy open 1,000 mTLS connections to the server proxy, which it keeps
  pooled (`--pool-max-idle-per-endpoint 1000`); RSS of each proxy once every answer arrived;
- new mTLS handshakes per second: the client proxy keeps no idle connection
  (`--pool-max-idle-per-endpoint 0`), so every request through the pair is a new mTLS connection;
  fortio saturates it; the rate is requests/s, and "per core" is requests per CPU-second of both
  proxies together (each handshake's two ends and its one request). Twice: full handshakes
  (`--identity-tls-session-max-age 0` on both proxies) and resumed TLS sessions (the default; the
  share of inbound handshakes that were resumed is printed from the server's tls_handshakes_total).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import harness as h
import http1

from tether.testing.mesh import LocalMesh

TARGETS = ("direct", "nginx", "tether-2hop-plain", "tether-2hop-mtls", "tether-2hop-mtls-h1")
_meshes: list[LocalMesh] = []
_admin: dict[int, dict[str, int]] = {}  # a pair's parent pid -> its proxies' admin ports


def _proxy_args(port: int, admin: int, inbound: int, extra: list[str]) -> list[str]:
    return [str(h.TETHER), "proxy", "--outbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
            "--inbound-addr", f"127.0.0.1:{inbound}", "--log-level", "warn", *extra]


def start_two_hop(workdir: Path, port: int, backend_port: int, mtls: bool,
                  client_flags: Sequence[str] = (), both_flags: Sequence[str] = ()) -> h.Proc:
    in_port, in_admin, out_inbound, out_admin = (h.free_port() for _ in range(4))
    out_extra: list[str] = [*client_flags, *both_flags]
    in_extra = ["--inbound-app-addr", f"127.0.0.1:{backend_port}", *both_flags]
    endpoint: dict[str, object] = {"addr": f"127.0.0.1:{backend_port}", "proxy_port": in_port}
    if mtls:
        mesh = LocalMesh(workdir / f"mesh-{port}")  # one CA per pair: pairs run side by side
        mesh.work.mkdir(parents=True, exist_ok=True)
        _meshes.append(mesh)
        mesh.create_ca()
        mesh.start_identity()
        for w, extra in ((mesh.workload("server"), in_extra), (mesh.workload("client"), out_extra)):
            extra += ["--identity-name", w.identity, "--identity-token-path", str(w.token_path),
                      "--identity-trust-anchors", str(mesh.anchors), "--identity-addrs", mesh.identity_addrs[0]]
            if w.name == "server":
                endpoint["identity"] = w.identity
                endpoint["protocol_hint"] = "h2"  # as the destination service hints a meshed pod
    # One file per pair: a client proxy reloads its destinations file when it changes, so a file
    # shared by the plaintext and the mTLS pairs (one workdir) sent the plaintext pair's client to
    # the mTLS pair's server proxy, and the plaintext column counted one proxy's CPU, not two.
    # JSON (a YAML document the proxy reads without PyYAML): a meshed proxy gets its destinations from
    # the destination service and never loads a YAML parser, so its stand-in here does not either.
    dst = workdir / f"mesh-destinations-{port}.json"
    dst.write_text(json.dumps({"destinations": {http1.AUTHORITY: [endpoint]}}))
    out_extra += ["--destinations-file", str(dst)]
    inbound = _proxy_args(h.free_port(), in_admin, in_port, in_extra)
    outbound = _proxy_args(port, out_admin, out_inbound, out_extra)
    # One parent for both proxies: the harness reads CPU and RSS over its process tree.
    script = f"{shlex.join(inbound)} & {shlex.join(outbound)} & wait"
    proc = h.start("two-hop", ["sh", "-c", script], workdir, env=h.PROXY_ENV)
    h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{in_admin}/ready"), 30, "inbound proxy /ready")
    h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{out_admin}/ready"), 30, "outbound proxy /ready")
    _admin[proc.pid] = {"server": in_admin, "client": out_admin}
    return proc


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    if name in ("direct", "nginx"):
        return http1.start_target(name, workdir, fortio, backend_port, workers)
    reason = h.tether_unavailable_reason()
    if reason is not None:
        raise h.Skip(reason)
    port = h.free_port()
    # -h1: HTTP/1 between the proxies too (--outbound-h2-upgrade false); by default the client proxy
    # carries HTTP/1 to its peer over one HTTP/2 connection, as to a pod the destination hints h2.
    upgrade = ["--outbound-h2-upgrade", "false"] if name.endswith("-h1") else []
    proc = start_two_hop(workdir, port, backend_port, mtls="mtls" in name, client_flags=upgrade)
    target = ["-H", f"Host: {http1.AUTHORITY}", f"http://127.0.0.1:{port}{http1.PATH}"]

    server_admin = _admin[proc.pid]["server"]
    checked: list[bool] = []

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        r = h.fortio_load(fortio, target, qps, connections, seconds, workdir, ok_codes=("200",))
        if not checked:
            # The figures are the pair's: its own server proxy must be the second hop.
            if _inbound_connections_total(server_admin) == 0:
                raise RuntimeError(f"{name}: the pair's server proxy accepted no connection (the second hop is "
                                   "elsewhere)")
            checked.append(True)
        return r

    def hold(n: int) -> contextlib.AbstractContextManager[int]:
        return http1.hold_http1(port, n)

    return h.Target(name, proc, load, hold)


# ------------------------------------------------------------------------------------------------
# One meshed proxy on its own: RSS idle and with 1,000 mTLS connections, new handshakes per second


def _pids(proc: h.Proc) -> dict[str, int]:
    """The server (inbound) and client (outbound) proxies under the pair's parent shell."""
    found: dict[str, int] = {}
    for pid in h.process_tree(proc.pid)[1:]:
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"proxy" in cmd:
                found["server" if b"--inbound-app-addr" in cmd else "client"] = pid
    return found


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _inbound_connections_total(admin_port: int) -> int:
    """Inbound connections a proxy has accepted since it started, from its own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("tcp_open_total{") and 'direction="inbound"' in line)


def _open_tls_connections(admin_port: int) -> int:
    """Open inbound connections that arrived over mesh TLS, from the proxy's own metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("tcp_open_connections{") and 'direction="inbound"' in line and 'tls="true"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _inbound_handshakes(admin_port: int) -> dict[bool, int]:
    """The server proxy's tls_handshakes_total{direction="inbound"} by resumed (0 for builds without it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {True: 0, False: 0}
    for line in text.splitlines():
        if line.startswith("tls_handshakes_total{") and 'direction="inbound"' in line:
            out['resumed="true"' in line] += int(float(line.rsplit(" ", 1)[1]))
    return out


def meshed_proxy_figures(held: int = 1000, seconds: float = 3.0) -> dict[str, float]:
    """RSS of one meshed proxy idle and with ``held`` mTLS connections; new mTLS connections per second."""
    fortio = h.go_tool("fortio")
    out: dict[str, float] = {}
    h.raise_nofile(16384)
    with tempfile.TemporaryDirectory(prefix="tether-bench-meshed-") as tmp:
        work = Path(tmp)
        backend_port = h.free_port()
        # The echo server may hold an answer for up to a minute: requests stay in flight while RSS is read.
        backend = h.start("backend-slow", [str(fortio), "server", "-quiet", "-max-echo-delay", "60s", "-http-port",
                                           f"127.0.0.1:{backend_port}", "-grpc-port", "disabled", "-redirect-port",
                                           "disabled", "-tcp-port", "disabled", "-udp-port", "disabled"], work)
        h.wait_ready(backend, h.tcp_accepting(backend_port), 15, "fortio server")
        with h.running(backend):
            port = h.free_port()
            (work / "held").mkdir()
            # HTTP/1 between the proxies: with HTTP/2 the requests would share one connection.
            pair = start_two_hop(work / "held", port, backend_port, mtls=True,
                                 client_flags=["--outbound-h2-upgrade", "false",
                                               "--pool-max-idle-per-endpoint", str(held),
                                               # a burst of 1,000 handshakes queues for seconds of CPU
                                               "--outbound-connect-timeout", "30s"])
            with h.running(pair):
                pids = _pids(pair)
                out["rss_idle_server"], out["rss_idle_client"] = _rss_mib(pids["server"]), _rss_mib(pids["client"])
                admin = _admin[pair.pid]["server"]
                with h.requests_in_flight(port, held, "/echo?size=128&delay=50s", http1.AUTHORITY) as sent:
                    # Every request holds its own mTLS connection between the proxies until answered.
                    with contextlib.suppress(TimeoutError):
                        h.wait_until(lambda: _open_tls_connections(admin) >= sent, 40, "mTLS connections open")
                    out["held_sent"] = sent
                    out["held_tls"] = _open_tls_connections(admin)
                    out["rss_held_server"] = _rss_mib(pids["server"])
                    out["rss_held_client"] = _rss_mib(pids["client"])
            for kind, both in (("full", ["--identity-tls-session-max-age", "0"]), ("resumed", [])):
                port = h.free_port()
                (work / f"handshakes-{kind}").mkdir()
                pair = start_two_hop(work / f"handshakes-{kind}", port, backend_port, mtls=True,
                                     client_flags=["--outbound-h2-upgrade", "false",  # a connection per request
                                                   "--pool-max-idle-per-endpoint", "0"], both_flags=both)
                with h.running(pair):
                    target = ["-H", f"Host: {http1.AUTHORITY}", f"http://127.0.0.1:{port}{http1.PATH}"]
                    h.fortio_load(fortio, target, 0, 8, 1.0, work, ok_codes=("200",))  # warm-up
                    before = _inbound_handshakes(_admin[pair.pid]["server"])
                    cpu0 = h.cpu_seconds(pair.pid)
                    r = h.fortio_load(fortio, target, 0, 16, seconds, work, ok_codes=("200",))
                    cpu = h.cpu_seconds(pair.pid) - cpu0
                    after = _inbound_handshakes(_admin[pair.pid]["server"])
                    out[f"{kind}_handshakes_per_s"] = r.actual_qps
                    out[f"{kind}_handshakes_per_cpu_s"] = r.count / cpu if cpu else 0.0
                    out[f"{kind}_handshake_cpu_ms"] = 1000 * cpu / r.count if r.count else 0.0
                    n = sum(after.values()) - sum(before.values())
                    out[f"{kind}_resumed_share"] = (after[True] - before[True]) / n if n else 0.0
    for m in _meshes:
        m.close()
    return out


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def targets_check(results: Sequence[h.TargetResult]) -> str:
    """Issue 16's targets that this run can judge, each with its ratio and verdict."""
    by = {r.name: r for r in results if r.skipped is None}
    plain, mtls, direct, nginx = (by.get(n) for n in ("tether-2hop-plain", "tether-2hop-mtls", "direct", "nginx"))
    lines = ["", "targets (issue 16; two-hop figures are both proxies together):"]
    # The plaintext pair has no identity and never upgrades to HTTP/2: the default mTLS pair against it is
    # what a user pays for mTLS as deployed; the -h1 pair against it, TLS alone (like for like).
    for variant, label in ((mtls, ""), (by.get("tether-2hop-mtls-h1"), ", HTTP/1 between the proxies")):
        p_cpu = h.median(plain.cpu_us_per_request) if plain is not None else None
        m_cpu = h.median(variant.cpu_us_per_request) if variant is not None else None
        if p_cpu and m_cpu:
            added = m_cpu / p_cpu - 1
            lines.append(f"  mTLS adds <= 30% to the two-hop plaintext CPU per request{label}: {m_cpu:.1f} vs"
                         f" {p_cpu:.1f} us, {added:+.0%} {_verdict(added <= 0.30)}")
    for variant, label in ((mtls, ""), (by.get("tether-2hop-mtls-h1"), ", HTTP/1 between the proxies")):
        if variant is not None and nginx is not None:
            paired = h.paired_saturation_ratio(variant, nginx)
            if paired is not None:
                lines.append(f"  two-hop mTLS saturation >= 0.5x nginx one hop{label}: {paired:.2f}x paired per round"
                             f" ({h.median(variant.cpu_us_per_request) or 0:.1f} us CPU per request)"
                             f" {_verdict(paired >= 0.5)}")
    if mtls is not None and direct is not None:
        diffs = [a.p99_ms - b.p99_ms for a, b in zip(mtls.at_rate.get(1000, []), direct.at_rate.get(1000, []),
                                                      strict=False)]
        added_p99 = h.median(diffs)
        if added_p99 is not None:
            lines.append(f"  p99 @ 1,000/s through two mTLS hops within +1 ms of direct: {added_p99:+.3f} ms paired"
                         f" per round (rounds: {', '.join(f'{d:+.2f}' for d in diffs)}) {_verdict(added_p99 <= 1.0)}")
    if mtls is None:
        return "\n".join(lines) if len(lines) > 2 else ""
    print("measuring one meshed proxy on its own (RSS idle, 1,000 mTLS connections, new handshakes) ...", flush=True)
    try:
        f = meshed_proxy_figures()
    except (RuntimeError, TimeoutError, OSError, KeyError) as e:
        lines.append(f"  meshed proxy figures not measured: {e}")
        return "\n".join(lines)
    idle = max(f["rss_idle_server"], f["rss_idle_client"])
    held = max(f["rss_held_server"], f["rss_held_client"])
    lines.append(f"  meshed proxy RSS idle <= 32 MiB: {idle:.1f} MiB (server {f['rss_idle_server']:.1f}, client"
                 f" {f['rss_idle_client']:.1f}), {idle / 32:.2f}x the target {_verdict(idle <= 32)}")
    lines.append(f"  meshed proxy RSS with 1,000 mTLS connections <= 64 MiB: {held:.1f} MiB (server"
                 f" {f['rss_held_server']:.1f}, client {f['rss_held_client']:.1f};"
                 f" {f['held_sent']:.0f} requests in flight,"
                 f" {f['held_tls']:.0f} mTLS connections open at the server), {held / 64:.2f}x the target"
                 f" {_verdict(held <= 64 and f['held_tls'] >= 1000)}")
    for kind, what in (("full", "full handshakes (resumption off)"), ("resumed", "resumed TLS sessions")):
        per_core = f[f"{kind}_handshakes_per_cpu_s"]
        lines.append(f"  new mTLS handshakes >= 1,000/s per core between two proxies, {what}: {per_core:,.0f} per"
                     f" CPU-second of both proxies ({f[f'{kind}_handshakes_per_s']:,.0f}/s wall clock;"
                     f" {f[f'{kind}_handshake_cpu_ms']:.2f} ms CPU per new connection with its request;"
                     f" {f[f'{kind}_resumed_share']:.0%} resumed at the server), {per_core / 1000:.2f}x the target"
                     f" {_verdict(per_core >= 1000)}")
    lines.append("  on par with linkerd2-proxy (CPU, saturation, p99, memory): judged by bench/parity.py (both pairs as"
                 " pod sidecars in the local mesh; needs root and a linkerd2-proxy binary)")
    return "\n".join(lines)


SUITE = h.Suite(
    kind="mesh",
    script="bench/mesh.py",
    title=f"meshed two-hop HTTP/1.1 GET {http1.PATH}",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=http1.start_backend,
    start_target=start_target,
    summary=targets_check,
)

if __name__ == "__main__":
    try:
        sys.exit(h.main(SUITE))
    finally:
        for m in _meshes:
            m.close()
