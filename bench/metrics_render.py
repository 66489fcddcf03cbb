"""Micro-benchmark of the metrics registry: render time and per-increment cost.

Run: PYTHONPATH=src .venv/bin/python bench/metrics_render.py
Reports, for 1,000 and 10,000 HTTP series (one status, one class, a histogram each), the time
the event loop spends taking the snapshot, the time the worker thread spends formatting, and the
cost of the hot-path operations a request performs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import timeit

from tether.proxy.http.body import BytesBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response
from tether.proxy.layers.metrics import HttpMetricsService
from tether.proxy.metrics import MetricsRegistry, format_snapshot


def _fill(n: int) -> MetricsRegistry:
    reg = MetricsRegistry()
    for i in range(n):
        m = reg.http(
            "outbound",
            (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 8080),
            authority=f"svc-{i}.ns.svc.cluster.local:8080",
            tls=True,
            server_id=f"svc-{i}.ns.serviceaccount.identity.linkerd.cluster.local",
        )
        m.requests += 10
        st = m.status(200)
        for ms in (0.4, 3.0, 12.0, 250.0):
            st.latency.observe(ms)
        st.response("success").count += 10
    return reg


def _best_ms(fn: object, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000)
    return min(times), statistics.median(times)


def main() -> None:
    print(f"{'series':>8} {'snapshot (loop) ms':>20} {'format (thread) ms':>20} {'bytes':>10}")
    for n in (1_000, 10_000):
        reg = _fill(n)
        now = time.monotonic()
        snap_best, snap_med = _best_ms(lambda reg=reg, now=now: reg.snapshot(now), 20)
        snap = reg.snapshot(now)
        fmt_best, fmt_med = _best_ms(lambda snap=snap: format_snapshot(snap), 10)
        size = len(format_snapshot(snap))
        print(
            f"{n:>8} {snap_med:>9.2f} (min {snap_best:5.2f}) {fmt_med:>9.2f} (min {fmt_best:5.2f}) {size:>10}"
        )

    reg = _fill(1)
    m = reg.http(
        "outbound",
        ("10.0.0.0", 8080),
        authority="svc-0.ns.svc.cluster.local:8080",
        tls=True,
        server_id="svc-0.ns.serviceaccount.identity.linkerd.cluster.local",
    )
    st = m.status(200)
    rc = st.response("success")
    n = 1_000_000
    g = {"m": m, "st": st, "rc": rc, "reg": reg}
    per = {
        "m.requests += 1": timeit.timeit("m.requests += 1", globals=g, number=n),
        "st.latency.observe(3.2)": timeit.timeit("st.latency.observe(3.2)", globals=g, number=n),
        "rc.count += 1": timeit.timeit("rc.count += 1", globals=g, number=n),
        "m.status(200).response('success').count += 1": timeit.timeit(
            "m.status(200).response('success').count += 1", globals=g, number=n
        ),
        "reg.http(...) lookup of a bound set": timeit.timeit(
            "reg.http('outbound', ('10.0.0.0', 8080), authority='svc-0.ns.svc.cluster.local:8080',"
            " tls=True, server_id='svc-0.ns.serviceaccount.identity.linkerd.cluster.local')",
            globals=g,
            number=n // 10,
        )
        * 10,
    }
    print()
    for name, total in per.items():
        print(f"{name:<48} {total / n * 1e9:8.0f} ns")


async def _loop_stall(reg: MetricsRegistry) -> tuple[float, float]:
    """Longest gap between 1 ms ticks of a task on the loop while /metrics renders; render time."""
    gaps: list[float] = []
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ticker())
        await asyncio.sleep(0.02)
        gaps.clear()
        t0 = time.perf_counter()
        await reg.render_chunks_async()
        took = time.perf_counter() - t0
        stop = True
    return max(gaps) * 1000, took * 1000


async def _layer_cost(n: int, streamed: bool) -> float:
    """Microseconds the metrics layer adds to a request whose body is read to its end."""
    reg = MetricsRegistry(process_metrics=False)
    conn = Connection(direction="inbound", peer=("10.0.0.9", 5555), local=("0.0.0.0", 4143))
    conn.orig_dst = ("10.0.0.1", 8080)

    async def inner(req: Request) -> Response:
        if not streamed:
            return Response(200, body=BytesBody(b"ok"))
        body = PipeBody(None)
        body.feed(b"ok")
        return Response(200, body=body)

    async def drive(svc: object) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            req = Request(method=b"GET", path=b"/", authority=b"web.ns:8080", conn=conn)
            rsp = await svc(req)  # type: ignore[operator]
            body = rsp.body
            if streamed:
                await body.read()
                body._inner.finish() if hasattr(body, "_inner") else body.finish()
            while await body.read():
                pass
        return time.perf_counter() - t0

    bare = min([await drive(inner) for _ in range(5)])
    metered = min([await drive(HttpMetricsService(inner, reg)) for _ in range(5)])
    return (metered - bare) / n * 1e6


def main_async_parts() -> None:
    print()
    for n in (1_000, 10_000):
        stall, took = asyncio.run(_loop_stall(_fill(n)))
        print(f"render_async of {n:>6} series: {took:7.1f} ms total, longest loop stall {stall:5.1f} ms")
    for streamed in (False, True):
        cost = asyncio.run(_layer_cost(20_000, streamed))
        kind = "streamed body (wrapped)" if streamed else "body complete with the head"
        print(f"metrics layer per request, {kind}: {cost:.2f} us")


if __name__ == "__main__":
    main()
    main_async_parts()
