"""Driver of scripts/fuzz: run atheris on one target for a time, then merge and report.

The target runs interpreted (TETHER_PURE_PYTHON=1): atheris measures coverage by instrumenting
Python bytecode, which the mypyc-compiled modules do not have. libFuzzer works in a scratch
directory seeded with the corpus; at the end ``-merge=1`` adds to the corpus only the inputs that
reach code the corpus did not. A crash stops the run; its input is kept under tests/fuzz/crashes.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
CORPUS = FUZZ / "corpus"
CRASHES = FUZZ / "crashes"


def child(target: str, args: list[str]) -> None:
    """Run inside the fuzzing process: instrument tether, then hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(FUZZ))
    import fuzz_targets

    # tether's import guard loads the hot-path modules through its own finder, which
    # instrument_imports does not see: instrument the loaded tether code in place instead.
    for name, mod in list(sys.modules.items()):
        if name.startswith("tether") or name == "fuzz_targets":
            for obj in list(vars(mod).values()):
                _instrument(atheris, obj, name)
    fn = fuzz_targets.TARGETS[target]
    # libFuzzer re-runs argv[0] through the shell for -merge: make it the whole command.
    argv0 = f"{sys.executable} {Path(__file__).resolve()} --child {target}"
    atheris.Setup([argv0, *args], fn)
    atheris.Fuzz()


def _instrument(atheris: object, obj: object, module: str) -> None:
    """Instrument a module's functions and the methods of its classes (defined in it)."""
    import types

    if isinstance(obj, types.FunctionType) and obj.__module__ == module:
        atheris.instrument_func(obj)  # type: ignore[attr-defined]
    elif isinstance(obj, type) and obj.__module__ == module:
        for attr in list(vars(obj).values()):
            fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
            if isinstance(fn, types.FunctionType):
                atheris.instrument_func(fn)  # type: ignore[attr-defined]


def stats(log: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in ("number_of_executed_units", "average_exec_per_sec", "peak_rss_mb"):
        m = re.search(rf"stat::{key}:\s*(\d+)", log)
        if m:
            out[key] = m.group(1)
    last = [ln for ln in log.splitlines() if re.match(r"#\d+\s", ln)]
    if last:
        m = re.search(r"cov: (\d+) ft: (\d+) corp: (\d+)", last[-1])
        if m:
            out["cov"], out["ft"], out["corp"] = m.groups()
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc/PID/stat (fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _watch(proc: subprocess.Popen[bytes], cpu_limit: float) -> None:
    """Wait for libFuzzer; with a CPU limit, ask it to stop (SIGUSR1: a graceful exit with its final
    statistics) once the process has used that much CPU."""
    while proc.poll() is None:
        if cpu_limit and _cpu_seconds(proc.pid) >= cpu_limit:
            proc.send_signal(signal.SIGUSR1)
            proc.wait()
            break
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    sys.path.insert(0, str(FUZZ))
    from fuzz_targets import TARGETS

    ap = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="one of: " + ", ".join(TARGETS))
    ap.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz, wall clock (default 1)")
    ap.add_argument("--cpu-minutes", type=float, default=0.0,
                    help="instead: fuzz until the fuzzing process has used this much CPU time (for a shared or "
                         "niced run, where wall time overstates the work done)")
    ap.add_argument("--max-len", type=int, default=4096, help="longest input libFuzzer tries")
    ap.add_argument("--unit-timeout", type=int, default=0,
                    help="wall-clock seconds one input may take before it counts as a hang (default 10; 300 with "
                         "--cpu-minutes, whose niced runs can be starved of CPU that long by a busy machine)")
    ns = ap.parse_args()
    if ns.target not in TARGETS:
        print(f"scripts/fuzz: unknown target {ns.target!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if ns.minutes <= 0 or ns.cpu_minutes < 0 or ns.unit_timeout < 0:
        print("scripts/fuzz: --minutes, --cpu-minutes and --unit-timeout must be positive", file=sys.stderr)
        return 2
    unit_timeout = ns.unit_timeout or (300 if ns.cpu_minutes else 10)
    corpus = CORPUS / ns.target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes = CRASHES / ns.target
    crashes.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TETHER_PURE_PYTHON="1")
    me = [sys.executable, str(Path(__file__).resolve()), "--child", ns.target]
    before = len(list(corpus.iterdir()))
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{ns.target}-") as tmp:
        work = Path(tmp) / "work"
        shutil.copytree(corpus, work)
        wall = ns.cpu_minutes * 60 * 20 if ns.cpu_minutes else ns.minutes * 60
        log_path = Path(tmp) / "log"
        started = time.monotonic()
        before_cpu = _children_cpu()
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [*me, str(work), f"-max_total_time={int(wall)}", f"-max_len={ns.max_len}",
                 f"-artifact_prefix={crashes}/", "-print_final_stats=1", f"-timeout={unit_timeout}",
                 "-rss_limit_mb=1024"],
                env=env, stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT)
            _watch(proc, ns.cpu_minutes * 60)
        cpu = _children_cpu() - before_cpu
        elapsed = time.monotonic() - started
        log = log_path.read_text()
        merge = subprocess.run([*me, "-merge=1", str(corpus), str(work)], env=env, capture_output=True, text=True,
                               cwd=ROOT)
        if merge.returncode != 0:
            print(merge.stderr[-2000:], file=sys.stderr)
    s = stats(log)
    found = sorted(p.name for p in crashes.iterdir())
    print(f"target {ns.target}: {elapsed / 60:.1f} min wall, {cpu / 60:.1f} CPU-min")
    print(f"  executions   {s.get('number_of_executed_units', '?')} ({s.get('average_exec_per_sec', '?')}/s)")
    print(f"  coverage     {s.get('cov', '?')} edges, {s.get('ft', '?')} features (atheris, interpreted tether)")
    print(f"  corpus       {before} -> {len(list(corpus.iterdir()))} inputs in {corpus.relative_to(ROOT)}")
    print(f"  peak rss     {s.get('peak_rss_mb', '?')} MB")
    if proc.returncode != 0 or found:
        print(f"  CRASH: libFuzzer exit {proc.returncode}; inputs in {crashes.relative_to(ROOT)}: {', '.join(found)}")
        tail = [ln for ln in log.splitlines() if ln.strip()][-25:]
        print("\n".join("    " + ln for ln in tail))
        return 1
    print("  crashes      none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
