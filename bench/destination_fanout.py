"""Destination fan-out: how long an endpoint change takes to reach every subscribed stream, and memory.

Starts a real `tether controller destination` over a fresh store (``--services`` Services with
``--endpoints`` registered workloads each), opens ``--streams`` Destination.Get streams spread evenly
over the services (grpcio aio clients, one process, ``--channels`` HTTP/2 connections), waits for
every snapshot, then registers one new workload behind the first service ``--changes`` times and
measures, for each stream of that service, the delay from the registry write to the update arriving.
Reports p50/p99/max of those delays and the controller's resident memory (VmRSS, VmHWM).

    .venv/bin/python bench/destination_fanout.py --services 1 --endpoints 10 --streams 1000
    .venv/bin/python bench/destination_fanout.py --services 100 --endpoints 100 --streams 1000

The delay includes the store's poll interval (``--poll-interval``, 250 ms by default: on average half
of it is waiting for the next poll), which is the figure a user sees after `tether run` or an edit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from tether.api.gen import destination_pb2, destination_pb2_grpc
from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.procs import Proc, free_port, http_get, wait_for


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def ip_of(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


async def run_streams(
    addr: str, paths: list[str], channels: int, registry: WorkloadRegistry, changes: int, deadline: float
) -> tuple[list[float], float]:
    chans = [
        grpc.aio.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])
        for _ in range(channels)
    ]
    first_path = paths[0]
    watching_first = [i for i, p in enumerate(paths) if p == first_path]
    got_snapshot = [asyncio.Event() for _ in paths]
    arrivals: list[asyncio.Queue[float]] = [asyncio.Queue() for _ in paths]

    async def stream(i: int, path: str) -> None:
        stub = destination_pb2_grpc.DestinationStub(chans[i % channels])
        call = stub.Get(destination_pb2.GetDestination(scheme="k8s", path=path))
        try:
            async for _update in call:
                if not got_snapshot[i].is_set():
                    got_snapshot[i].set()
                else:
                    arrivals[i].put_nowait(time.monotonic())
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:  # cancelled: the benchmark is over
                raise

    delays: list[float] = []
    t_snap = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(stream(i, p)) for i, p in enumerate(paths)]
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(e.wait() for e in got_snapshot))
        snapshot_s = time.monotonic() - t_snap
        for n in range(changes):
            w = Workload(f"new-{n}", "bench", "new", (ip_of(200_000 + n),), (WorkloadPort(8080),), {"app": "svc-0"})
            t0 = time.monotonic()
            registry.register(w)
            async with asyncio.timeout(deadline):
                for i in watching_first:
                    delays.append(await arrivals[i].get() - t0)
        for t in tasks:
            t.cancel()
    for ch in chans:
        await ch.close()
    return delays, snapshot_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=1)
    ap.add_argument("--endpoints", type=int, default=10, help="workloads per service")
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--poll-interval", default="250ms")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds any one wait may take")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        res = root / "resources"
        res.mkdir()
        docs = []
        for s in range(args.services):
            docs.append(
                f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: bench}}\n"
                f"spec:\n  selector: {{app: svc-{s}}}\n  ports: [{{port: 8080}}]\n"
            )
        (res / "services.yaml").write_text("---\n".join(docs))
        reg = WorkloadRegistry(root / "state")
        t = time.monotonic()
        n = 0
        for s in range(args.services):
            for e in range(args.endpoints):
                reg.register(
                    Workload(f"w-{s}-{e}", "bench", f"sa-{s}", (ip_of(n),), (WorkloadPort(8080),), {"app": f"svc-{s}"})
                )
                n += 1
        print(f"registered {n} workloads in {time.monotonic() - t:.1f}s", file=sys.stderr)
        port, admin = free_port(), free_port()
        proc = Proc(
            [sys.executable, "-m", "tether", "controller", "destination", "--addr", f"127.0.0.1:{port}",
             "--admin-addr", f"127.0.0.1:{admin}", "--resources-dir", str(res), "--state-dir", str(root / "state"),
             "--poll-interval", args.poll_interval, "--log-level", "warning"],
            root / "dst.log",
        )  # fmt: skip
        try:
            wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready")[0] == 200, 60, what="destination ready")
            idle = rss_kib(proc.pid)
            paths = [f"svc-{i % args.services}.bench.svc.cluster.local:8080" for i in range(args.streams)]
            delays, snapshot_s = asyncio.run(
                run_streams(f"127.0.0.1:{port}", paths, args.channels, reg, args.changes, args.deadline)
            )
            mem = rss_kib(proc.pid)
        finally:
            proc.stop()
        result = {
            "services": args.services,
            "endpoints": n,
            "streams": args.streams,
            "streams_per_changed_service": len([p for p in paths if p == paths[0]]),
            "changes": args.changes,
            "poll_interval": args.poll_interval,
            "snapshots_all_streams_s": round(snapshot_s, 3),
            "delay_ms": {
                "p50": round(pct(delays, 50) * 1000, 1),
                "p99": round(pct(delays, 99) * 1000, 1),
                "max": round(max(delays) * 1000, 1),
                "mean": round(statistics.mean(delays) * 1000, 1),
                "samples": len(delays),
            },
            "rss_mib": {
                "idle": round(idle["VmRSS"] / 1024, 1),
                "with_streams": round(mem["VmRSS"] / 1024, 1),
                "peak": round(mem["VmHWM"] / 1024, 1),
            },
            "command": " ".join(sys.argv),
        }
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
