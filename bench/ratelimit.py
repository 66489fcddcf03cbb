"""Local rate limit accuracy: a tether proxy's inbound port under HTTPLocalRateLimitPolicy at R req/s.

For each limit R, fortio offers 2R req/s for T seconds through the proxy's inbound listener (the
Server, route authorization and limit from a scripted policy service, as the controller would send
them); the proxy admits R per second after a one-second burst of R (Linkerd's quota), so the
admitted rate over the window is (200s - R) / T, which should be within 10% of R.

    .venv/bin/python bench/ratelimit.py                 # R = 10, 100, 1000; T = 10 s
    .venv/bin/python bench/ratelimit.py --rates 100 --seconds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness as h


def measure(fortio: Path, work: Path, backend_port: int, rps: int, seconds: float) -> tuple[float, int, int, float]:
    from tether.testing.policy import BENCH_WORKLOAD, bench_policy_server

    srv = bench_policy_server(backend_port, rps=rps)
    port, admin = h.free_port(), h.free_port()
    proc = h.start(f"tether-{rps}", [
        str(h.TETHER), "proxy", "--inbound-addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
        "--outbound-addr", f"127.0.0.1:{h.free_port()}", "--inbound-app-addr", f"127.0.0.1:{backend_port}",
        "--policy-addrs", f"127.0.0.1:{srv.port}", "--policy-workload", BENCH_WORKLOAD], work)
    try:
        h.wait_ready(proc, h.http_ok(f"http://127.0.0.1:{admin}/ready"), 30, "tether /ready")
        target = ["-H", "Host: bench.local:80", f"http://127.0.0.1:{port}/echo?size=16"]
        conns = max(1, min(16, rps // 50))
        r = h.fortio_load(fortio, target, 2 * rps, conns, seconds, work, ok_codes=("200", "429"))
        ok, limited = r.codes.get("200", 0), r.codes.get("429", 0)
        admitted_rate = (ok - rps) / seconds  # the first second's burst of R comes on top of the rate
        return r.actual_qps, ok, limited, admitted_rate
    finally:
        proc.stop()
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="10,100,1000", help="comma-separated limits (req/s)")
    p.add_argument("--seconds", type=float, default=10.0, help="window of each measurement")
    args = p.parse_args(argv)
    fortio = h.go_tool("fortio")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tether-bench-rl-") as tmp:
        work = Path(tmp)
        backend_port = h.free_port()
        backend = h.start_fortio_server(fortio, work, backend_port, "disabled")
        with h.running(backend):
            for rps in (int(x) for x in args.rates.split(",")):
                offered, ok, limited, rate = measure(fortio, work, backend_port, rps, args.seconds)
                err = (rate - rps) / rps * 100
                rows.append((rps, offered, ok, limited, rate, err))
                print(f"limit {rps}/s: offered {offered:,.0f}/s, 200 {ok:,}, 429 {limited:,}, "
                      f"admitted {rate:,.1f}/s after the burst ({err:+.1f}%)", flush=True)
    print(f"\nHTTPLocalRateLimitPolicy total limit, {args.seconds:g} s windows at 2x the limit offered (fortio)")
    print(f"{'limit/s':>8} {'offered/s':>10} {'200':>7} {'429':>7} {'admitted/s':>11} {'error':>7}")
    for rps, offered, ok, limited, rate, err in rows:
        print(f"{rps:>8,} {offered:>10,.0f} {ok:>7,} {limited:>7,} {rate:>11,.1f} {err:>+6.1f}%")
    worst = max(abs(r[5]) for r in rows)
    print(f"worst error {worst:.1f}% ({'ok' if worst <= 10 else 'MISSED'}: within 10%)")
    return 0 if worst <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
