"""Identity benchmark: CSRs signed per second by one identity replica, and the cost of an mTLS handshake.

    .venv/bin/python bench/identity.py [--duration 5] [--concurrency 8] [--uvloop]

1. signing, in-process: validate_csr + issue_leaf, the CPU cost of one certificate (no I/O).
2. Certify over gRPC: a real `tether controller identity` process, driven by `--concurrency` async
   callers from this process for `--duration` seconds (rate limit lifted). One replica's throughput.
3. TLS 1.3 mutual-TLS handshakes on loopback with IdentityClient's server and client contexts (both
   ends in this process, so CPU per handshake is client + server), sequential and concurrent.

Everything runs on loopback; results are printed and written to bench/results/identity-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/grpc.py (another benchmark) would shadow the grpc package: drop this directory from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT / "src"))

import grpc  # noqa: E402

from tether.api.gen import identity_pb2, identity_pb2_grpc  # noqa: E402
from tether.control.identity.credentials import CredentialPaths, load_credentials  # noqa: E402
from tether.core.identity.csr import build_csr, generate_key, validate_csr  # noqa: E402
from tether.core.identity.issuance import issue_leaf  # noqa: E402
from tether.core.identity.names import parse_identity_name  # noqa: E402
from tether.platform.local.workloads import Workload, WorkloadRegistry  # noqa: E402
from tether.proxy.identity import IdentityClient, IdentityClientConfig  # noqa: E402
from tether.testing.procs import Proc, free_port, http_get, wait_for  # noqa: E402

WEB = "web.bench.serviceaccount.identity.linkerd.cluster.local"
DB = "db.bench.serviceaccount.identity.linkerd.cluster.local"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_sign_inprocess(ca: Path, duration: float) -> dict[str, float]:
    now = dt.datetime.now(dt.UTC)
    creds = load_credentials(CredentialPaths.from_dir(ca), now).issuer
    ident = parse_identity_name(WEB)
    der = build_csr(generate_key(), ident)
    n, t0, c0 = 0, time.perf_counter(), cpu()
    while time.perf_counter() - t0 < duration:
        issue_leaf(creds, validate_csr(der, ident), ident, now)
        n += 1
    wall, used = time.perf_counter() - t0, cpu() - c0
    return {"signs_per_s": n / wall, "cpu_us_per_sign": used / n * 1e6}


async def _certify_load(addr: str, token: bytes, csr: bytes, duration: float, concurrency: int) -> tuple[int, int]:
    ok = err = 0
    deadline = time.perf_counter() + duration
    req = identity_pb2.CertifyRequest(identity=WEB, token=token, certificate_signing_request=csr)
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = identity_pb2_grpc.IdentityStub(ch)

        async def worker() -> None:
            nonlocal ok, err
            while time.perf_counter() < deadline:
                try:
                    await stub.Certify(req, timeout=10)
                    ok += 1
                except grpc.aio.AioRpcError:
                    err += 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
    return ok, err


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def bench_certify(tmp: Path, ca: Path, state: Path, duration: float, concurrency: int) -> dict[str, float]:
    port, admin = free_port(), free_port()
    p = Proc(
        [
            sys.executable,
            "-m",
            "tether",
            "controller",
            "identity",
            "--issuer-dir",
            str(ca),
            "--addr",
            f"127.0.0.1:{port}",
            "--admin-addr",
            f"127.0.0.1:{admin}",
            "--state-dir",
            str(state),
            "--rate",
            "1000000",
            "--burst",
            "1000000",
            "--log-level",
            "warning",
        ],
        tmp / "identity.log",
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200, 30, what="identity")
        token = WorkloadRegistry(state).read_token("bench", "web").encode()
        csr = build_csr(generate_key(), parse_identity_name(WEB))
        asyncio.run(_certify_load(f"127.0.0.1:{port}", token, csr, 0.5, 2))  # warm up
        c0 = proc_cpu(p.pid)
        t0 = time.perf_counter()
        ok, err = asyncio.run(_certify_load(f"127.0.0.1:{port}", token, csr, duration, concurrency))
        wall = time.perf_counter() - t0
        server_cpu = proc_cpu(p.pid) - c0
    finally:
        p.stop()
    return {
        "certify_per_s": ok / wall,
        "errors": err,
        "server_cpu_ms_per_certify": server_cpu / max(ok, 1) * 1e3,
        "concurrency": concurrency,
    }


async def _handshakes(
    web: IdentityClient, db: IdentityClient, duration: float, concurrency: int
) -> tuple[int, float, float]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # One byte after the handshake: the client waits for it, so both sides finished verifying.
        w.write(b"x")
        try:
            await w.drain()
        except (ConnectionError, OSError):
            pass
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=db.server_ssl_context(), backlog=1024)
    port = srv.sockets[0].getsockname()[1]
    ctx = web.client_ssl_context()
    n = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal n
        while time.perf_counter() < deadline:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=DB)
            assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
            await r.readexactly(1)
            w.close()
            try:
                await w.wait_closed()
            except (ConnectionError, OSError):
                pass
            n += 1

    c0, t0 = cpu(), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())
    wall, used = time.perf_counter() - t0, cpu() - c0
    srv.close()
    return n, used / max(n, 1), wall


def bench_tls(ca: Path, state: Path, duration: float, concurrency: int) -> dict[str, float]:
    # Certificates come straight from the issuer files (no service needed for this part).
    now = dt.datetime.now(dt.UTC)
    creds = load_credentials(CredentialPaths.from_dir(ca), now).issuer
    from cryptography import x509

    clients = []
    for name in (WEB, DB):
        c = IdentityClient(IdentityClientConfig(name, str(state / "unused"), str(ca / "ca.crt"), ["127.0.0.1:1"]))
        ident = parse_identity_name(name)
        leaf = issue_leaf(creds, validate_csr(c.csr_der, ident), ident, now)
        c.install([x509.load_der_x509_certificate(d) for d in (leaf.leaf_der, *leaf.intermediates_der)])
        clients.append(c)
    out: dict[str, float] = {}
    for conc in (1, concurrency):
        n, cpu_per, wall = asyncio.run(_handshakes(clients[0], clients[1], duration, conc))
        out[f"handshakes_per_s_c{conc}"] = n / wall
        out[f"cpu_ms_per_handshake_c{conc}"] = cpu_per * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--uvloop", action="store_true", help="run this process's loops on uvloop")
    args = ap.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(prefix="tether-bench-identity-") as d:
        tmp = Path(d)
        subprocess.run(
            [sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(tmp / "ca")],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        reg = WorkloadRegistry(tmp / "state")
        reg.register(Workload("web", "bench", "web"))
        results = {
            "sign_inprocess": bench_sign_inprocess(tmp / "ca", args.duration),
            "certify_grpc": bench_certify(tmp, tmp / "ca", tmp / "state", args.duration, args.concurrency),
            "tls13_mtls_handshake": bench_tls(tmp / "ca", tmp / "state", args.duration, args.concurrency),
            "uvloop": args.uvloop,
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
    print(json.dumps(results, indent=2))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (out / f"identity-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
