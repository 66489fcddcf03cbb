"""The demo on a local mesh, as ``./scripts/demo`` runs it.

``tether up``; the demo's Namespace, Services and the books ServiceProfile with ``tether apply``;
each application with ``tether run`` (so each is a pod with its own proxy, meshed with mTLS);
then the golden metrics per workload read from the proxies over a window, before and after the
profile marks GET /books retryable. Only the tether command line is used, as a person would.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tether.core.golden import Sample, golden, parse

MANIFESTS = Path(__file__).parent / "manifests"
NS = "demo"
APPS = [
    # name, tether run flags, the application's command
    ("books", ["--port", "8080", "--replicas", "2"], ["books", "--port", "8080"]),
    ("greeter", ["--port", "9090"], ["greeter", "--port", "9090"]),
    ("web", ["--port", "8080", "--env", "GRPC_DNS_RESOLVER=native"],
     ["web", "--port", "8080", "--books", "http://books:8080", "--greeter", "greeter:9090"]),
    ("traffic", [], ["traffic", "--target", "http://web:8080", "--rps", "20"]),
]


class DemoError(Exception):
    pass


def tether(state: str, *args: str, echo: bool = True) -> str:
    cmd = [sys.executable, "-m", "tether", *args]
    if echo:
        print(f"$ tether {' '.join(args)}", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TETHER_STATE_DIR": state, "TETHER_RESOURCES_DIR": f"{state}/resources"})
    if r.returncode != 0:
        raise DemoError(f"tether {' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    if echo and r.stdout.strip():
        print("  " + r.stdout.strip().replace("\n", "\n  "), flush=True)
    return r.stdout


def _scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(n, tuple(sorted(lb.items()))): v for n, lb, v in parse(text)}


def _window(before: dict[Any, float], after: dict[Any, float]) -> list[Sample]:
    """What was counted between two scrapes (counters and histogram buckets only grow)."""
    return [(n, dict(lb), v - before.get((n, lb), 0.0)) for (n, lb), v in after.items()]


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.2f}%"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0f}"


def measure(state: str, seconds: float) -> dict[str, list[Sample]]:
    """Per workload, the samples of all its pods over ``seconds``."""
    import json

    status = json.loads(tether(state, "status", "-o", "json", echo=False))
    pods = [p for p in status["pods"] if p["namespace"] == NS]
    before = {p["name"]: _scrape(p["proxyAdmin"]) for p in pods}
    time.sleep(seconds)
    out: dict[str, list[Sample]] = {}
    for p in pods:
        out.setdefault(p["workload"], []).extend(_window(before[p["name"]], _scrape(p["proxyAdmin"])))
    return out


def print_golden(samples: dict[str, list[Sample]], seconds: float) -> dict[str, float]:
    """The table `linkerd viz stat` prints: per workload, what its proxies served (inbound)."""
    rates = {}
    print(f"  {'workload':<10} {'success':>9} {'rps':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}  (inbound, meshed)")
    for name in ("web", "books", "greeter"):
        g = golden(samples.get(name, []), lambda lb: lb.get("direction") == "inbound")
        rates[name] = g.success_rate
        print(f"  {name:<10} {_pct(g.success_rate):>9} {g.requests / seconds:7.1f} {_ms(g.p50_ms):>7} "
              f"{_ms(g.p95_ms):>7} {_ms(g.p99_ms):>7}")
    web = samples.get("web", [])
    print("  routes of books, as web's proxy sees them (rt_route from the ServiceProfile):")
    for route in ("GET /books", "GET /authors"):
        def total(metric: str, cls: str | None = None, route: str = route) -> float:
            return sum(v for n, lb, v in web if n == metric and lb.get("rt_route") == route
                       and (cls is None or lb.get("classification") == cls))
        ok, done = total("route_response_total", "success"), total("route_response_total")
        actual = total("route_actual_request_total")
        print(f"    {route:<13} success {_pct(ok / done if done else math.nan):>8}, {done / seconds:5.1f} rps, "
              f"{actual / seconds:5.1f} requests/s actually sent to books (with retries)")
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tether.demo run", description=__doc__)
    p.add_argument("--state-dir", default=os.environ.get("TETHER_STATE_DIR", "/tmp/tether-demo"),
                   help="the mesh's state directory (default /tmp/tether-demo)")
    p.add_argument("--window", type=float, default=10.0, help="seconds of traffic each measurement covers")
    p.add_argument("--down", action="store_true", help="stop the mesh at the end (tether down)")
    p.add_argument("--up-flag", action="append", default=[], metavar="FLAG",
                   help="a flag for `tether up`, e.g. --up-flag=--bridge=tdemo0 (repeatable)")
    args = p.parse_args(argv)
    if args.window <= 0:
        p.error("--window: must be more than 0")
    state = str(Path(args.state_dir).absolute())
    try:
        return _run(state, args.window, args.down, args.up_flag)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1


def _run(state: str, window: float, down: bool, up_flags: list[str]) -> int:
    print("== the control plane")
    tether(state, "up", *up_flags)
    print("\n== the demo's Namespace, Services and a ServiceProfile for books")
    tether(state, "apply", "-f", str(MANIFESTS / "demo.yaml"), "-f", str(MANIFESTS / "books-profile.yaml"))
    print("\n== the applications, each a pod with its proxy")
    for name, _, _ in APPS:
        # A demo left running from before: start its applications afresh.
        with contextlib.suppress(DemoError):
            tether(state, "rm", "-n", NS, name, echo=False)
    for name, flags, cmd in APPS:
        tether(state, "run", "-n", NS, name, *flags, "--", sys.executable, "-m", "tether.demo", *cmd)
    time.sleep(2)  # the traffic generator's first requests
    print(f"\n== golden metrics over {window:g}s: GET /books fails 25% of the time, nothing retries")
    before = print_golden(measure(state, window), window)
    print("\n== GET /books marked retryable (isRetryable: true), applied to the running mesh")
    tether(state, "apply", "-f", str(MANIFESTS / "books-profile-retries.yaml"))
    time.sleep(2)  # the profile reaches web's proxy (the store is polled every 250 ms)
    print(f"\n== golden metrics over {window:g}s with retries")
    after = print_golden(measure(state, window), window)
    print(f"\nweb's success rate: {_pct(before['web'])} -> {_pct(after['web'])} (books itself still fails "
          f"{_pct(1 - after['books']) if not math.isnan(after['books']) else '-'}: web's proxy retries for it)")
    print("\nlook further:")
    print(f"  tether status --state-dir {state}")
    print(f"  tether logs --state-dir {state} -n demo web        (-c proxy for its proxy)")
    print(f"  tether exec --state-dir {state} -n demo web -- curl -s http://books:8080/authors")
    print(f"  tether get sp -n demo --resources-dir {state}/resources")
    print(f"  tether viz install --state-dir {state}    (Prometheus for the mesh), then:")
    print(f"  tether viz stat deploy -n demo --state-dir {state}")
    print(f"  tether viz routes deploy/books -n demo --state-dir {state}")
    print(f"  tether viz edges deploy -n demo -o wide --state-dir {state}")
    print(f"  tether viz dashboard --state-dir {state}    (a web page on 127.0.0.1)")
    if down:
        tether(state, "down")
    else:
        print(f"stop it all: tether down --state-dir {state}")
    ok = not math.isnan(after["web"]) and not math.isnan(before["web"]) and after["web"] > before["web"]
    return 0 if ok else 1
