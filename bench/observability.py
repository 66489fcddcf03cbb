"""What tracing and tap cost: HTTP/1 CPU per request through one tether proxy (its inbound listener in
front of a fortio echo server), paired against nginx in the same run.

Targets (each a separate proxy process, taking turns within each round):

- ``tether``: tracing off, no tap (the baseline for the rest)
- ``tether-trace-unsampled``: a trace collector configured; every request carries a W3C context
  marked not sampled (parsed and forwarded untouched, no span)
- ``tether-trace-sampled``: every request carries a sampled context: a span per request, exported
  with OTLP over gRPC to a real OpenTelemetry Collector (its CPU is not counted)
- ``tether-trace-rate``: requests without context, ``--trace-sample-rate 0.1``: one in ten traced
- ``tether-id``: the proxy with an identity (mTLS listener, tap server up), no tap running
- ``tether-tapped``: the same with a tap running that matches every request (``max_rps`` 0): three
  events per request go to a tap client in this process (its CPU is not counted)

Run by hand: .venv/bin/python bench/observability.py [--quick] [--targets nginx,tether,...]
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import harness as h
import http1

TARGETS = ("nginx", "tether", "tether-trace-unsampled", "tether-trace-sampled", "tether-trace-rate", "tether-id",
           "tether-tapped")
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_keep: list[object] = []  # collectors, meshes and tap threads, alive until the process ends


def cleanup() -> None:
    """Stop the collectors and identity services this script started (at exit)."""
    for k in reversed(_keep):
        for p in getattr(k, "procs", []):  # a LocalMesh's identity services
            p.stop()
        stop = getattr(k, "stop", None)
        if callable(stop):
            stop()
    _keep.clear()


atexit.register(cleanup)


def _collector(workdir: Path) -> int:
    """A real OpenTelemetry Collector (scripts/tools/build-otelcol.sh) discarding what it gets; its gRPC port."""
    script = h.REPO / "scripts/tools/build-otelcol.sh"
    subprocess.run([str(script)], check=True, capture_output=True, timeout=1800)
    binary = subprocess.run([str(script), "--print-path"], check=True, capture_output=True, text=True).stdout.strip()
    port = h.free_port()
    cfg = workdir / "otelcol.yaml"
    cfg.write_text(json.dumps({
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": {"debug": {"verbosity": "basic"}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["debug"]}},
                    "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}}},
    }))
    proc = h.start("otelcol", [binary, "--config", str(cfg)], workdir)
    _keep.append(proc)
    h.wait_until(h.tcp_accepting(port), 30, "the collector's gRPC port", proc)
    return port


def _inbound(name: str, workdir: Path, port: int, backend_port: int, extra: list[str]) -> h.Proc:
    admin = h.free_port()
    args = [str(h.TETHER), "proxy", "--inbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
            "--outbound-addr", f"127.0.0.1:{h.free_port()}", "--inbound-app-addr", f"127.0.0.1:{backend_port}",
            "--log-level", "warn", *extra]
    proc = h.start(name, args, workdir)
    return h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, f"{name} /ready")


def _identity_flags(workdir: Path, tap_port: int) -> tuple[list[str], object]:
    from tether.testing.mesh import LocalMesh

    mesh = LocalMesh(workdir / f"mesh-{tap_port}")  # one CA and identity service per target
    mesh.work.mkdir(parents=True, exist_ok=True)
    mesh.create_ca()
    mesh.start_identity()
    _keep.append(mesh)
    w = mesh.workload("server")
    flags = ["--identity-name", w.identity, "--identity-token-path", str(w.token_path),
             "--identity-trust-anchors", str(mesh.anchors), "--identity-addrs", mesh.identity_addrs[0],
             "--tap-addr", f"127.0.0.1:{tap_port}"]
    return flags, (mesh, w)


def _start_tap(mesh: object, workload: object, tap_port: int) -> None:
    """A tap of every request, read in a thread of this process until it exits."""
    from tether.viz.tap import ClientCredentials, Mesh, Pod, TapError, observe, observe_request

    m = mesh  # tether.testing.mesh.LocalMesh
    ca = m.ca_dir  # type: ignore[attr-defined]
    tap_mesh = Mesh((), {}, (ca / "ca.crt").read_bytes(), (ca / "tls.crt").read_bytes(), (ca / "tls.key").read_bytes(),
                    m.cp_ns, m.trust_domain)  # type: ignore[attr-defined]
    pod = Pod("server", "default", "server", "127.0.0.1", workload.identity)  # type: ignore[attr-defined]
    creds = ClientCredentials(tap_mesh)
    counted = {"events": 0}
    started = threading.Event()

    async def read() -> None:
        try:
            async for _ev in observe(pod, creds, observe_request(), port=tap_port):
                counted["events"] += 1
                started.set()
        except TapError:
            pass  # the proxy stopped at the end of the run

    t = threading.Thread(target=lambda: asyncio.run(read()), name="tap", daemon=True)
    t.start()
    _keep.append((t, counted))


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    if name == "nginx":
        return http1.start_target(name, workdir, fortio, backend_port, workers)
    reason = h.tether_unavailable_reason()
    if reason is not None:
        raise h.Skip(reason)
    port = h.free_port()
    headers: list[str] = []
    extra: list[str] = []
    if name.startswith("tether-trace"):
        extra += ["--trace-collector", f"127.0.0.1:{_collector(workdir)}", "--trace-export-interval", "1s"]
        if name == "tether-trace-unsampled":
            headers = ["-H", f"traceparent: 00-{TRACE}-00f067aa0ba902b7-00"]
        elif name == "tether-trace-sampled":
            headers = ["-H", f"traceparent: 00-{TRACE}-00f067aa0ba902b7-01"]
        else:
            extra += ["--trace-sample-rate", "0.1"]
    tap_port = h.free_port()
    ident: object = None
    if name in ("tether-id", "tether-tapped"):
        flags, ident = _identity_flags(workdir, tap_port)
        extra += flags
    proc = _inbound(name, workdir, port, backend_port, extra)
    if name == "tether-tapped":
        mesh, w = ident  # type: ignore[misc]
        h.wait_until(h.tcp_accepting(tap_port), 30, "the tap port", proc)
        _start_tap(mesh, w, tap_port)

    target = ["-H", f"Host: {http1.AUTHORITY}", *headers, f"http://127.0.0.1:{port}{http1.PATH}"]

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        return h.fortio_load(fortio, target, qps, connections, seconds, workdir, ok_codes=("200",))

    def hold(n: int) -> contextlib.AbstractContextManager[int]:
        return http1.hold_http1(port, n)

    return h.Target(name, proc, load, hold)


def summary(results: list[h.TargetResult]) -> str:
    by = {r.name: r for r in results if r.skipped is None}
    lines = ["", "CPU per request (median over rounds), against nginx and against tether (tracing off, no tap):"]
    n_cpu = h.median(by["nginx"].cpu_us_per_request) if "nginx" in by else None
    base = h.median(by["tether"].cpu_us_per_request) if "tether" in by else None
    ident = h.median(by["tether-id"].cpu_us_per_request) if "tether-id" in by else None
    for name in TARGETS:
        r = by.get(name)
        cpu = h.median(r.cpu_us_per_request) if r is not None else None
        if cpu is None:
            continue
        parts = [f"{cpu:6.1f} us"]
        if n_cpu:
            parts.append(f"{cpu / n_cpu:.2f}x nginx")
        ref = ident if name == "tether-tapped" and ident else base
        if ref and name != "nginx":
            parts.append(f"{cpu / ref:.2f}x {'tether-id' if ref is ident else 'tether'}")
        lines.append(f"  {name:24s} " + ", ".join(parts))
    taps = [c for t, c in (x for x in _keep if isinstance(x, tuple))]
    if taps:
        lines.append(f"  tap events received by the client: {taps[0]['events']}")
    return "\n".join(lines)


SUITE = h.Suite(
    kind="observability",
    script="bench/observability.py",
    title="HTTP/1.1 CPU per request with tracing and tap (inbound proxy, fortio echo 128 B)",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=http1.start_backend,
    start_target=start_target,
    summary=summary,  # type: ignore[arg-type]
)

if __name__ == "__main__":
    sys.exit(h.main(SUITE))
