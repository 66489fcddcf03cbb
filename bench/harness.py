"""Shared pieces of the side-by-side benchmarks (bench/http1.py, bench/grpc_unary.py).

Everything runs on loopback. Processes are started in their own session so that a proxy's workers
can be found (and stopped) through the process tree; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tether.core.sidecar import PYTHON_ENV

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
BUILD_TOOLS = REPO / "scripts" / "tools" / "build-go-tools.sh"
TETHER = REPO / ".venv" / "bin" / "tether"
# The sidecar's interpreter settings (tether.core.sidecar.PYTHON_ENV), for every `tether proxy` a bench starts.
PROXY_ENV = dict(PYTHON_ENV)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# Tools


def go_tool(name: str) -> Path:
    """Path of a pinned Go tool, built by scripts/tools/build-go-tools.sh if it is not there yet."""
    path = Path(subprocess.check_output([str(BUILD_TOOLS), "--print-path", name], text=True).strip())
    if not path.exists():
        print(f"building {name} (once; cached under ~/.cache/tether/tools)", flush=True)
        subprocess.run([str(BUILD_TOOLS), name], check=True)
    return path


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (nginx and haproxy print to stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def tether_unavailable_reason() -> str | None:
    """Why `tether proxy` cannot be benchmarked, or None when it can."""
    if not TETHER.exists():
        return f"{TETHER} does not exist (pip install -e . into .venv)"
    try:
        out = subprocess.run([str(TETHER), "proxy", "--help"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`tether proxy --help` did not answer within 30 s"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`tether proxy --help` exited {out.returncode}: {last[0]}"
    for flag in ("--outbound-addr", "--admin-addr", "--inbound-addr", "--destinations-file"):
        if flag not in out.stdout:
            return f"`tether proxy` has no {flag} flag yet"
    return None


# --------------------------------------------------------------------------------------------------
# Ports and readiness


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: Proc, check: Callable[[], bool], timeout: float, what: str) -> Proc:
    """Wait until a just-started process is ready; stop it (and re-raise) when it never is."""
    try:
        wait_until(check, timeout, what, proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc is not None and proc.popen.poll() is not None:
            code = proc.popen.returncode
            raise RuntimeError(f"{proc.name} exited ({code}) before {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"\n{proc.log_tail()}" if proc is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.05)


def tcp_accepting(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


# --------------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class Proc:
    """A process started by the benchmark, its output going to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process (and its session), SIGKILL what is left after `timeout`."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=timeout)


def start(name: str, argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start `argv` in its own session with stdout and stderr in workdir/<name>.log.

    A `tether proxy` (``argv[1] == "proxy"``) runs with the interpreter settings every deployment gives
    the sidecar (``PROXY_ENV``: -OO, no debug ranges), so the figures are those of the proxy users run.
    """
    log = workdir / f"{name}.log"
    if list(argv[1:2]) == ["proxy"]:
        env = {**PROXY_ENV, **(env or {})}
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return Proc(name, popen, log)


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------------------------------
# The programs under test


def start_fortio_server(fortio: Path, workdir: Path, http_port: int | str, grpc_port: int | str) -> Proc:
    """fortio's echo (HTTP) and ping (gRPC) servers; pass "disabled" for a port that is not wanted."""

    def addr(port: int | str) -> str:
        return port if isinstance(port, str) else f"127.0.0.1:{port}"

    proc = start(
        "backend",
        [
            str(fortio),
            "server",
            "-quiet",
            "-http-port",
            addr(http_port),
            "-grpc-port",
            addr(grpc_port),
            "-redirect-port",
            "disabled",
            "-tcp-port",
            "disabled",
            "-udp-port",
            "disabled",
        ],
        workdir,
    )
    for port in (http_port, grpc_port):
        if isinstance(port, int):
            wait_ready(proc, tcp_accepting(port), 15, f"fortio server on port {port}")
    return proc


def start_nginx(workdir: Path, port: int, http_block: str, workers: int, connections: int = 8192) -> Proc:
    """nginx in the foreground with its config, pid file, logs and temp paths in `workdir`.

    `http_block` holds the upstream and server blocks; `connections` is each worker's
    worker_connections (nginx allocates that many slots up front: part of its RSS).
    keepalive_requests is raised so that neither the clients' nor the upstream connections are
    recycled during a run (nginx's default is 1000).
    """
    conf_dir = workdir / "nginx"
    conf_dir.mkdir(exist_ok=True)
    # Workers run as nobody when nginx is started by root; they must be able to reach the temp paths.
    for d in (workdir, conf_dir):
        d.chmod(0o755)
    conf = conf_dir / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {2 * connections};
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {conf_dir}/client_body;
    proxy_temp_path {conf_dir}/proxy;
    fastcgi_temp_path {conf_dir}/fastcgi;
    uwsgi_temp_path {conf_dir}/uwsgi;
    scgi_temp_path {conf_dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{http_block}
}}
"""
    )
    argv = [require("nginx"), "-p", str(conf_dir), "-c", str(conf), "-e", str(conf_dir / "error.log")]
    proc = start("nginx", argv, workdir)
    return wait_ready(proc, tcp_accepting(port), 15, "nginx to listen")


def start_haproxy(workdir: Path, port: int, frontend_bind: str, backend_server: str, workers: int) -> Proc:
    """haproxy in the foreground (-db), HTTP mode with keep-alive on both sides and connection reuse."""
    conf = workdir / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread {workers}
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend bench
    bind {frontend_bind}
    default_backend upstream

backend upstream
    http-reuse always
    server backend {backend_server}
"""
    )
    proc = start("haproxy", [require("haproxy"), "-db", "-f", str(conf)], workdir)
    return wait_ready(proc, tcp_accepting(port), 15, "haproxy to listen")


def start_tether(workdir: Path, port: int, admin_port: int, authority: str, backend_port: int) -> Proc:
    """One `tether proxy` whose outbound listener sends `authority` to the backend; waits for /ready."""
    destinations = workdir / "destinations.yaml"
    destinations.write_text(f'destinations: {{"{authority}": ["127.0.0.1:{backend_port}"]}}\n')
    proc = start(
        "tether",
        [
            str(TETHER),
            "proxy",
            "--outbound-addr",
            f"127.0.0.1:{port}",
            "--admin-addr",
            f"127.0.0.1:{admin_port}",
            "--destinations-file",
            str(destinations),
            # Its own inbound port too: the default (4143) may be taken by another proxy on the machine.
            "--inbound-addr",
            f"127.0.0.1:{free_port()}",
        ],
        workdir,
    )
    return wait_ready(proc, http_ok(f"http://127.0.0.1:{admin_port}/ready"), 30, "tether /ready")


# --------------------------------------------------------------------------------------------------
# /proc readings (Linux)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx's master and workers, say)."""
    pids = [pid]
    i = 0
    while i < len(pids):
        task_dir = Path(f"/proc/{pids[i]}/task")
        with contextlib.suppress(OSError):
            for task in task_dir.iterdir():
                with contextlib.suppress(OSError):
                    pids.extend(int(c) for c in (task / "children").read_text().split())
        i += 1
    return list(dict.fromkeys(pids))


def _trees(pids: int | Sequence[int]) -> list[int]:
    roots = [pids] if isinstance(pids, int) else list(pids)
    return list(dict.fromkeys(p for root in roots for p in process_tree(root)))


def cpu_seconds(pids: int | Sequence[int]) -> float:
    """User plus system CPU time of `pids` and their descendants, from /proc/<pid>/stat."""
    total = 0
    for p in _trees(pids):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            # Fields after the command name, which is in parentheses and may contain spaces.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def rss_kib(pids: int | Sequence[int]) -> int:
    """VmRSS of `pids` and their descendants in KiB (shared pages are counted once per process)."""
    total = 0
    for p in _trees(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def still_open(socks: Sequence[socket.socket]) -> int:
    """How many of `socks` the peer has not closed (a closed one polls readable, at EOF)."""
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)
    closed = {fd for fd, _ in poller.poll(0)}
    return sum(1 for s in socks if s.fileno() not in closed)


def raise_nofile(want: int) -> None:
    """Raise this process's open-files limit so it can hold `want` sockets (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


# --------------------------------------------------------------------------------------------------
# Load (fortio)


@dataclasses.dataclass
class LoadResult:
    requested_qps: float  # 0 = as fast as possible
    actual_qps: float
    count: int
    errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    codes: dict[str, int]

    @staticmethod
    def from_fortio(doc: dict[str, Any], ok_codes: Sequence[str]) -> LoadResult:
        hist = doc["DurationHistogram"]
        pct = {float(p["Percentile"]): float(p["Value"]) * 1000.0 for p in hist.get("Percentiles") or []}
        codes = {str(k): int(v) for k, v in (doc.get("RetCodes") or {}).items()}
        requested = doc.get("RequestedQPS")
        return LoadResult(
            requested_qps=0.0 if requested in (None, "max") else float(requested),
            actual_qps=float(doc["ActualQPS"]),
            count=int(hist["Count"]),
            errors=sum(v for k, v in codes.items() if k not in ok_codes),
            p50_ms=pct.get(50.0, float("nan")),
            p99_ms=pct.get(99.0, float("nan")),
            p999_ms=pct.get(99.9, float("nan")),
            codes=codes,
        )


def fortio_load(
    fortio: Path,
    target_args: Sequence[str],
    qps: float,
    connections: int,
    duration_s: float,
    workdir: Path,
    ok_codes: Sequence[str],
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> LoadResult:
    """One fortio run: qps=0 saturates; otherwise fortio holds the rate spread uniformly over connections.

    Latency resolution is 10 us (-r 0.00001); fortio's default is 1 ms, too coarse for loopback.
    """
    out = workdir / f"fortio-{time.monotonic_ns()}.json"
    argv = [
        *prefix,  # e.g. ip netns exec POD: the load comes from inside a pod
        str(fortio),
        "load",
        "-quiet",
        "-qps",
        f"{qps:g}",
        "-c",
        str(connections),
        "-t",
        f"{duration_s:g}s",
        "-r",
        "0.00001",
        "-p",
        "50,99,99.9",
        "-json",
        str(out),
        *(["-uniform"] if qps > 0 else []),
        *extra,
        *target_args,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 20)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"fortio failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    result = LoadResult.from_fortio(json.loads(out.read_text()), ok_codes)
    out.unlink()
    return result


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass
class Plan:
    """How long and how hard each point runs. Points are repeated in `rounds`, the targets taking
    turns within a round, so that a burst of other work on a shared machine hits them all alike; the
    table shows the median over rounds."""

    rounds: int = 3
    warmup_s: float = 1.0
    saturation_s: float = 3.0
    saturation_connections: int = 32
    rates: tuple[int, ...] = (1000, 5000)
    rate_s: float = 5.0
    rate_connections: int = 50
    held_connections: int = 1000


@dataclasses.dataclass
class Target:
    """A running target: where fortio sends load and which process (tree) is the proxy."""

    name: str
    proc: Proc | None  # None for the direct (no proxy) target
    load: Callable[[float, int, float], LoadResult]  # (qps, connections, seconds); qps 0 saturates
    hold: Callable[[int], contextlib.AbstractContextManager[int]]  # opens n live connections, yields how many
    # The processes measured, when they are not `proc`'s tree (two pods' proxies, say).
    pids: Callable[[], list[int]] | None = None

    def measured(self) -> list[int] | None:
        """The roots of the process trees whose CPU and RSS are the target's (None: nothing to measure)."""
        if self.pids is not None:
            return self.pids()
        return [self.proc.pid] if self.proc is not None else None


class Skip(Exception):
    """A target that cannot run here; the message says why."""


@dataclasses.dataclass
class TargetResult:
    name: str
    skipped: str | None = None
    saturation: list[LoadResult] = dataclasses.field(default_factory=list)  # one per round (baseline: more)
    # Per round: saturation over the mean of the baseline's runs just before and just after it.
    paired_ratio: list[float] = dataclasses.field(default_factory=list)
    cpu_us_per_request: list[float] = dataclasses.field(default_factory=list)  # one per round
    at_rate: dict[int, list[LoadResult]] = dataclasses.field(default_factory=dict)
    rss_idle_kib: int | None = None
    rss_after_load_kib: int | None = None
    rss_held_kib: int | None = None
    held_connections: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


BASELINE = "nginx"  # every ratio is to this target


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def measure(targets: Sequence[Target], plan: Plan) -> list[TargetResult]:
    """Every point against every running target: idle RSS, warm-up, rounds of saturation and fixed-rate
    points (CPU per request from the saturation runs), then RSS with `held_connections` open."""
    results = {t.name: TargetResult(t.name) for t in targets}
    for t in targets:
        pids = t.measured()
        if pids is not None:
            results[t.name].rss_idle_kib = rss_kib(pids)
    active = list(targets)
    for t in targets:
        try:
            t.load(0, plan.saturation_connections, plan.warmup_s)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            results[t.name].notes.append(f"FAILED in warm-up: {str(exc).splitlines()[0]}")
            progress(t.name, f"failed: {exc}")
            active.remove(t)

    for rnd in range(plan.rounds):
        # Rotate who goes first so that no target always runs right after another's saturation run.
        order = [*active[rnd % len(active) :], *active[: rnd % len(active)]] if active else []
        # Saturation runs are bracketed by the baseline's (nginx, t1, nginx, t2, nginx, ...), so each
        # target's throughput is compared with the baseline's from the same moment: this machine's
        # speed drifts over tens of seconds (CPU steal), and the mean of the runs just before and
        # just after cancels a drift that is linear over the few seconds between them. The
        # fixed-rate points follow, one target after the other.
        base = next((t for t in order if t.name == BASELINE), None)
        seq = order if base is None else [base, *(x for t in order if t is not base for x in (t, base))]
        before: LoadResult | None = None
        waiting: list[tuple[TargetResult, LoadResult, LoadResult | None]] = []
        for t in seq:
            if t not in active:
                continue
            try:
                sat = _saturation(t, results[t.name], rnd, plan)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                _drop(t, results[t.name], rnd, exc, active)
                continue
            if t is base:
                for res, run, prev in waiting:
                    ref = [x.actual_qps for x in (prev, sat) if x is not None and x.actual_qps]
                    if ref:
                        res.paired_ratio.append(run.actual_qps / statistics.fmean(ref))
                waiting = []
                before = sat
            else:
                waiting.append((results[t.name], sat, before))
        for res, run, prev in waiting:  # the baseline failed mid-round: pair with what there is
            if prev is not None and prev.actual_qps:
                res.paired_ratio.append(run.actual_qps / prev.actual_qps)
        for t in list(order):
            if t not in active:
                continue
            try:
                _rates(t, results[t.name], rnd, plan)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                _drop(t, results[t.name], rnd, exc, active)

    for t in active:
        res = results[t.name]
        pids = t.measured()
        if pids is not None:
            res.rss_after_load_kib = rss_kib(pids)
            with t.hold(plan.held_connections) as opened:
                res.held_connections = opened
                res.rss_held_kib = rss_kib(pids)
            if opened < plan.held_connections:
                res.notes.append(f"only {opened} of {plan.held_connections} held connections stayed open")
    for res in results.values():
        for r in [*res.saturation, *(x for runs in res.at_rate.values() for x in runs)]:
            if r.errors:
                res.notes.append(f"{r.errors} errors at qps={r.requested_qps:g}: {r.codes}")
    return list(results.values())


def _drop(t: Target, res: TargetResult, rnd: int, exc: BaseException, active: list[Target]) -> None:
    first = str(exc).splitlines()[0]
    res.notes.append(f"FAILED in round {rnd + 1}, dropped from later points: {first}")
    progress(t.name, f"failed: {exc}")
    if t in active:
        active.remove(t)


def _saturation(t: Target, res: TargetResult, rnd: int, plan: Plan) -> LoadResult:
    pids = t.measured()
    cpu0 = cpu_seconds(pids) if pids is not None else 0.0
    sat = t.load(0, plan.saturation_connections, plan.saturation_s)
    if pids is not None and sat.count:
        res.cpu_us_per_request.append((cpu_seconds(pids) - cpu0) * 1e6 / sat.count)
    res.saturation.append(sat)
    progress(t.name, f"round {rnd + 1}: saturation {sat.actual_qps:,.0f}/s")
    return sat


def _rates(t: Target, res: TargetResult, rnd: int, plan: Plan) -> None:
    line = [f"round {rnd + 1}:"]
    for rate in plan.rates:
        r = t.load(rate, plan.rate_connections, plan.rate_s)
        res.at_rate.setdefault(rate, []).append(r)
        line.append(f"@{rate}/s p50/p99/p99.9 {r.p50_ms:.2f}/{r.p99_ms:.2f}/{r.p999_ms:.2f} ms")
        if r.actual_qps < 0.95 * rate:
            res.notes.append(f"round {rnd + 1}: held only {r.actual_qps:,.0f} of {rate:,} req/s")
    progress(t.name, " ".join(line))


def paired_saturation_ratio(r: TargetResult, base: TargetResult) -> float | None:
    """Median over rounds of this target's saturation over the baseline's runs around it."""
    return median(r.paired_ratio)


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs since boot, from /proc/stat: time the hypervisor gave to
    other guests while this machine wanted to run."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[7], sum(fields[:8])
    return 0, 0


def progress(name: str, msg: str) -> None:
    print(f"  [{name}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Reporting


Metric = tuple[str, Callable[[TargetResult], float | None], str]  # label, getter, number format


def _rate_metric(rate: int, attr: str) -> Callable[[TargetResult], float | None]:
    return lambda r: median([getattr(x, attr) for x in r.at_rate.get(rate, [])])


def metrics(rates: Sequence[int]) -> list[Metric]:
    rows: list[Metric] = [
        ("saturation req/s", lambda r: median([x.actual_qps for x in r.saturation]), "{:,.0f}"),
    ]
    for rate in rates:
        for label, attr in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")):
            rows.append((f"{label} ms @ {rate:,}/s", _rate_metric(rate, attr), "{:.3f}"))
    rows += [
        ("proxy CPU us/req", lambda r: median(r.cpu_us_per_request), "{:.1f}"),
        ("RSS idle MiB", lambda r: r.rss_idle_kib / 1024 if r.rss_idle_kib else None, "{:.1f}"),
        ("RSS 1k conns MiB", lambda r: r.rss_held_kib / 1024 if r.rss_held_kib else None, "{:.1f}"),
    ]
    return rows


def table(results: Sequence[TargetResult], rates: Sequence[int], baseline: str = "nginx") -> str:
    """Metrics as rows, targets as columns; each cell is `value (ratio to baseline)`."""
    shown = [r for r in results if r.skipped is None]
    base = next((r for r in shown if r.name == baseline), None)
    header = ["", *(r.name for r in shown)]
    lines: list[list[str]] = []
    for label, get, fmt in metrics(rates):
        row = [label]
        b = get(base) if base is not None else None
        for r in shown:
            v = get(r)
            if v is None:
                row.append("-")
                continue
            cell = fmt.format(v)
            if b and r is not base:
                cell += f" ({v / b:.2f}x)"
            row.append(cell)
        lines.append(row)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt_row(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    if base is not None and len(base.saturation) > 1:
        row = ["saturation, paired"]
        for r in shown:
            ratio = paired_saturation_ratio(r, base) if r is not base else None
            row.append(f"{ratio:.2f}x" if ratio is not None else "-")
        lines.insert(1, row)
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [fmt_row(header), fmt_row(["-" * w for w in widths]), *(fmt_row(row) for row in lines)]
    for r in results:
        if r.skipped is not None:
            out.append(f"{r.name}: skipped: {r.skipped}")
        for note in r.notes:
            out.append(f"{r.name}: note: {note}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Suite:
    """One benchmark script: its backend, how to start each target, and what to add under the table."""

    kind: str  # names the JSON file: bench/results/<kind>-<time>.json
    script: str
    title: str
    description: str
    targets: tuple[str, ...]
    start_backend: Callable[[Path, Path, int], Proc]  # (fortio, workdir, port)
    # (name, workdir, fortio, backend port, workers) -> a running target, or raises Skip
    start_target: Callable[[str, Path, Path, int, int], Target]
    summary: Callable[[Sequence[TargetResult]], str] = lambda _results: ""
    extra_targets: tuple[str, ...] = ()  # run only when named with --targets


def main(suite: Suite, argv: Sequence[str] | None = None) -> int:
    """Parse the shared flags, start the backend and every target, measure, print and save."""
    defaults = Plan()
    ap = argparse.ArgumentParser(description=suite.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(suite.targets), help="comma-separated subset")
    ap.add_argument("--rounds", type=int, default=defaults.rounds, help="repetitions of each point (median)")
    ap.add_argument("--saturation-seconds", type=float, default=defaults.saturation_s)
    ap.add_argument("--rate-seconds", type=float, default=defaults.rate_s, help="each fixed-rate point")
    ap.add_argument("--connections", type=int, default=defaults.saturation_connections, help="at saturation")
    ap.add_argument("--rate-connections", type=int, default=defaults.rate_connections, help="at a fixed rate")
    ap.add_argument("--workers", type=int, default=1, help="nginx worker_processes and haproxy nbthread")
    ap.add_argument("--quick", action="store_true", help="one round of 1 s points, to check the harness")
    args = ap.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = set(names) - set(suite.targets) - set(suite.extra_targets)
    if unknown:
        ap.error(f"unknown targets: {sorted(unknown)}")
    plan = Plan(
        rounds=1 if args.quick else args.rounds,
        saturation_s=1.0 if args.quick else args.saturation_seconds,
        saturation_connections=args.connections,
        rate_s=1.0 if args.quick else args.rate_seconds,
        rate_connections=args.rate_connections,
    )

    raise_nofile(16384)
    fortio = go_tool("fortio")
    env = environment(
        {
            "fortio": tool_version([str(fortio), "version"]),
            "nginx": tool_version([require("nginx"), "-v"]),
            "haproxy": tool_version([require("haproxy"), "-v"]),
            "workers": str(args.workers),
        }
    )
    started = time.monotonic()
    steal0 = cpu_steal()
    by_name: dict[str, TargetResult] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"tether-bench-{suite.kind}-")))
        backend_port = free_port()
        stack.enter_context(running(suite.start_backend(fortio, workdir, backend_port)))
        targets: list[Target] = []
        for name in names:
            try:
                target = suite.start_target(name, workdir, fortio, backend_port, args.workers)
            except (Skip, RuntimeError, TimeoutError) as exc:
                lines = str(exc).splitlines() or [type(exc).__name__]
                # The first line says what failed, the last line of the log usually why.
                reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
                print(f"  [{name}] skipped: {exc}", flush=True)
                by_name[name] = TargetResult(name, skipped=reason)
                continue
            if target.proc is not None:
                stack.enter_context(running(target.proc))
            targets.append(target)
        print(f"measuring {', '.join(t.name for t in targets)}: {plan}", flush=True)
        for res in measure(targets, plan):
            by_name[res.name] = res
    env["loadavg_at_end"] = os.getloadavg()
    steal1 = cpu_steal()
    total = steal1[1] - steal0[1]
    env["cpu_steal_percent"] = round(100 * (steal1[0] - steal0[0]) / total, 1) if total else None
    results = [by_name[n] for n in names]

    print()
    elapsed = time.monotonic() - started
    print(
        f"{suite.title}; {elapsed:.0f} s; {env['nproc']} cores,"
        f" load {env['loadavg_at_start'][0]:.1f} at start; CPU steal {env['cpu_steal_percent']}% during the run;"
        f" {env['nginx']}; {env['haproxy'].split(' - ')[0]}; fortio {env['fortio']};"
        f" nginx/haproxy workers {args.workers}; median of {plan.rounds} round(s)"
        "\n(saturation, paired: the median over rounds of each target's saturation over the mean of nginx's"
        " runs just before and just after it)"
    )
    print(table(results, plan.rates))
    summary = suite.summary(results)
    if summary:
        print(summary)
    command = " ".join([".venv/bin/python", suite.script, *(sys.argv[1:] if argv is None else argv)])
    path = write_json(suite.kind, command, env, plan, results)
    print(f"\ncommand: {command}\nJSON: {path.relative_to(REPO)}")
    return 0


def environment(extra: dict[str, str]) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "kernel": os.uname().release,
        **extra,
    }


def write_json(kind: str, command: str, env: dict[str, Any], plan: Plan, results: Sequence[TargetResult]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS_DIR / f"{kind}-{stamp}.json"
    doc = {
        "kind": kind,
        "time_utc": stamp,
        "command": command,
        "environment": env,
        "plan": dataclasses.asdict(plan),
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        raise SystemExit(f"{binary} is not installed (apt-get install {binary})")
    return path


@contextlib.contextmanager
def requests_in_flight(port: int, n: int, path: str, authority: str) -> Iterator[int]:
    """n HTTP/1 requests on n connections to 127.0.0.1:port, left in flight (ask the backend to delay
    its answers in ``path``); yields how many were sent, closes them all afterwards."""
    socks: list[socket.socket] = []
    req = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: tether-bench\r\n\r\n".encode()
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(req)
        yield len(socks)
    finally:
        for s in socks:
            s.close()
