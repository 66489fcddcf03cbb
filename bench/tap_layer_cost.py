"""Instructions a request pays for the tap layer while no tap runs, counted by callgrind.

Drives a request through a service stack with and without a ``TapLayer`` on top (the inner service
answers at once; the event loop is not involved), N times, and reports the instructions per request
of the difference: ``(Ir(with, N) - Ir(with, 0)) / N - (Ir(without, N) - Ir(without, 0)) / N``. Counting
whole runs at two sizes cancels start-up; instructions do not drift with a shared machine's load.

    .venv/bin/python bench/tap_layer_cost.py [--requests 200000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys
from tether.proxy.http.body import BytesBody
from tether.proxy.http.message import Request, Response
from tether.proxy.layers.tap import TapLayer
from tether.proxy.tap import INBOUND, TapHub

RSP = Response(200, [], BytesBody(b"ok"))

async def inner(req):
    return RSP

n, layered = int(sys.argv[1]), sys.argv[2] == "1"
svc = TapLayer(inner, TapHub(), INBOUND) if layered else inner
req = Request(b"GET", b"/", b"web")
for _ in range(n):
    coro = svc(req)
    try:
        coro.send(None)
    except StopIteration:
        pass
"""


def instructions(n: int, layered: bool, workdir: Path) -> int:
    out = workdir / f"cg-{n}-{int(layered)}.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", CHILD,
                    str(n), "1" if layered else "0"], check=True, capture_output=True, timeout=1800)
    m = re.search(r"^summary:\s+(\d+)", out.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no summary in {out}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000)
    args = ap.parse_args()
    from tether import native

    n = args.requests
    with tempfile.TemporaryDirectory(prefix="tether-tap-cost-") as d:
        w = Path(d)
        per = {}
        for layered in (False, True):
            per[layered] = (instructions(n, layered, w) - instructions(0, layered, w)) / n
    print(f"hot path: {native.state}")
    print(f"instructions per request: without the tap layer {per[False]:.0f}, with it (no tap running) "
          f"{per[True]:.0f}: the layer costs {per[True] - per[False]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
