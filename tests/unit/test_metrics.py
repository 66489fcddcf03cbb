"""The metrics registry: what a Prometheus scrape of the proxy shows."""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as hs
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import tether.proxy.metrics as metrics_mod
from tether.proxy.counters import LATENCY_BOUNDS_MS, Histogram, classify
from tether.proxy.metrics import MetricsRegistry

LINKERD_BOUNDS = [
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
]  # fmt: skip


def samples(text: str) -> dict[str, list[Sample]]:
    """Parse with the Prometheus client's own parser; by sample name."""
    out: dict[str, list[Sample]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def one(text: str, name: str, **labels: str) -> float:
    found = [s for s in samples(text).get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0].value


def test_http_families_and_label_keys() -> None:
    reg = MetricsRegistry()
    m = reg.http(
        "inbound",
        ("10.1.2.3", 8080),
        authority="web.ns.svc.cluster.local:8080",
        tls=True,
        client_id="client.ns.serviceaccount.identity.linkerd.cluster.local",
    )
    m.requests += 2
    st = m.status(200)
    st.latency.observe(0.7)
    st.response("success").count += 1
    m.status(503).response("failure").count += 1
    text = reg.render()

    fams = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert fams["request"] == "counter"  # request_total
    assert fams["response"] == "counter"
    assert fams["response_latency_ms"] == "histogram"
    req = samples(text)["request_total"][0]
    assert req.value == 2
    assert req.labels == {
        "direction": "inbound",
        "authority": "web.ns.svc.cluster.local:8080",
        "target_addr": "10.1.2.3:8080",
        "target_ip": "10.1.2.3",
        "target_port": "8080",
        "tls": "true",
        "client_id": "client.ns.serviceaccount.identity.linkerd.cluster.local",
    }
    assert one(text, "response_total", status_code="200", classification="success") == 1
    assert one(text, "response_total", status_code="503", classification="failure") == 1


def test_latency_buckets_are_linkerds_cumulative_and_inclusive() -> None:
    assert list(LATENCY_BOUNDS_MS) == LINKERD_BOUNDS
    reg = MetricsRegistry(process_metrics=False)
    st = reg.http("outbound", ("127.0.0.1", 80)).status(200)
    for ms in (0.2, 1.0, 1.5, 10.0, 10.01, 999.0, 60_000.0):
        st.latency.observe(ms)
    text = reg.render()
    buckets = samples(text)["response_latency_ms_bucket"]
    les = [b.labels["le"] for b in buckets]
    assert les == [str(b) for b in LINKERD_BOUNDS] + ["+Inf"]
    values = [b.value for b in buckets]
    assert values == sorted(values), "cumulative buckets never decrease"
    by_le = {b.labels["le"]: b.value for b in buckets}
    assert by_le["1"] == 2  # 0.2 and exactly 1.0: bounds are inclusive
    assert by_le["10"] == 4
    assert by_le["20"] == 5
    assert by_le["1000"] == 6
    assert by_le["50000"] == 6
    assert by_le["+Inf"] == 7
    assert one(text, "response_latency_ms_count") == 7
    assert one(text, "response_latency_ms_sum") == pytest.approx(0.2 + 1 + 1.5 + 10 + 10.01 + 999 + 60_000)


@given(hs.lists(hs.floats(allow_nan=True, allow_infinity=True) | hs.sampled_from(LINKERD_BOUNDS).map(float),
                max_size=20))
def test_each_latency_lands_in_its_bucket(latencies: list[float]) -> None:
    # The first bound at or above the latency, as Prometheus's inclusive `le` reads it; NaN in
    # the first bucket, as bisect put it.
    h = Histogram()
    expected = [0] * len(h.counts)
    for ms in latencies:
        h.observe(ms)
        expected[bisect.bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
    assert h.counts == expected


def test_success_and_other_classes_count_apart_also_in_a_copy() -> None:
    reg = MetricsRegistry(process_metrics=False)
    m = reg.http("outbound", None, authority="a")
    st200 = m.status(200)
    st200.response(classify(200)).count += 2
    st200.response(classify(200), 0).count += 1  # a gRPC OK is its own series
    st200.response(classify(200, error="body"), None, "body").count += 1
    copy = m.copy()
    copy.status(200).response(classify(200)).count += 1
    st200.response(classify(200)).count += 1
    text = reg.render()
    plain = [x for x in samples(text)["response_total"]
             if x.labels["classification"] == "success" and "grpc_status" not in x.labels]
    assert [x.value for x in plain] == [3]
    assert one(text, "response_total", grpc_status="0") == 1
    assert one(text, "response_total", error="body") == 1
    assert copy.status(200).response(classify(200)).count == 3


@pytest.mark.parametrize("authority", ['a"b', "back\\slash", "new\nline", 'all"\\\n'])
def test_label_values_are_escaped(authority: str) -> None:
    reg = MetricsRegistry(process_metrics=False)
    reg.http("outbound", None, authority=authority).requests += 1
    text = reg.render()
    assert one(text, "request_total", authority=authority) == 1


def test_tls_labels() -> None:
    reg = MetricsRegistry(process_metrics=False)
    reg.http("outbound", None, authority="a", tls=True, server_id="srv.id").requests += 1
    reg.http("outbound", None, authority="b").requests += 1
    reg.http("inbound", None, authority="c", no_tls_reason="no_tls_from_remote").requests += 1
    text = reg.render()
    by_auth = {s.labels["authority"]: s.labels for s in samples(text)["request_total"]}
    assert by_auth["a"]["tls"] == "true" and by_auth["a"]["server_id"] == "srv.id"
    assert by_auth["b"]["tls"] == "disabled"
    assert by_auth["c"]["tls"] == "no_identity"
    assert by_auth["c"]["no_tls_reason"] == "no_tls_from_remote"


def test_response_classes_with_grpc_status_and_error() -> None:
    reg = MetricsRegistry(process_metrics=False)
    m = reg.http("outbound", None, authority="grpc")
    st = m.status(200)
    st.response(classify(200, 0), 0).count += 3
    st.response(classify(200, 14), 14).count += 1
    m.status(None).response(classify(None, error="unexpected"), None, "unexpected").count += 1
    text = reg.render()
    assert one(text, "response_total", grpc_status="0", classification="success") == 3
    assert one(text, "response_total", grpc_status="14", classification="failure") == 1
    s = [x for x in samples(text)["response_total"] if x.labels.get("error") == "unexpected"]
    assert len(s) == 1 and "status_code" not in s[0].labels and s[0].labels["classification"] == "failure"


def test_classify() -> None:
    assert classify(200) == "success"
    assert classify(404) == "success"
    assert classify(500) == "failure"
    assert classify(503) == "failure"
    assert classify(None) == "failure"
    assert classify(200, error="i/o") == "failure"
    assert classify(200, grpc_status=0) == "success"
    assert classify(200, grpc_status=2) == "failure"
    assert classify(503, grpc_status=0) == "success"  # gRPC status wins when present


def test_tcp_families() -> None:
    reg = MetricsRegistry(process_metrics=False)
    t = reg.tcp("inbound", "src", ("10.0.0.5", 4143), tls=True, client_id="c.id")
    for _ in range(3):
        t.opened()
    t.read_bytes += 100
    t.write_bytes += 7
    t.closed()
    t.closed("i/o")
    reg.tcp_error("outbound", "unexpected")
    reg.tcp_error("inbound", "tls detection timeout", ("10.0.0.5", 4143))
    reg.tcp_error("inbound", "tls detection timeout", ("10.0.0.5", 4143))
    text = reg.render()
    assert one(text, "tcp_open_total", peer="src", direction="inbound") == 3
    assert one(text, "tcp_open_connections") == 1
    assert one(text, "tcp_read_bytes_total") == 100
    assert one(text, "tcp_write_bytes_total") == 7
    assert one(text, "tcp_close_total", classification="success") == 1
    assert one(text, "tcp_close_total", classification="failure", error="i/o") == 1
    assert one(text, "outbound_tcp_errors_total", error="unexpected") == 1
    assert one(text, "inbound_tcp_errors_total", error="tls detection timeout", target_port="4143") == 2
    with pytest.raises(ValueError, match="peer"):
        reg.tcp("inbound", "client", None)


def test_process_and_build_info() -> None:
    reg = MetricsRegistry(build_info={"git_sha": "abc"})
    text = reg.render()
    assert one(text, "process_resident_memory_bytes") > 1_000_000
    assert one(text, "process_virtual_memory_bytes") >= one(text, "process_resident_memory_bytes")
    assert one(text, "process_open_fds") >= 3
    assert one(text, "process_max_fds") > 0
    assert one(text, "process_cpu_seconds_total") > 0
    assert one(text, "process_start_time_seconds") > 1_600_000_000
    assert one(text, "proxy_build_info", git_sha="abc", vendor="tether") == 1


def test_extra_sources_and_a_failing_one() -> None:
    reg = MetricsRegistry(process_metrics=False)

    def identity_lines() -> list[str]:
        return [
            "# HELP control_identity_cert_refreshes_total Refreshes.",
            "# TYPE control_identity_cert_refreshes_total counter",
            'control_identity_cert_refreshes_total{result="ok"} 4',
        ]

    def broken() -> str:
        raise RuntimeError("boom")

    reg.add_source(identity_lines)
    reg.add_source(broken)
    text = reg.render()
    assert one(text, "control_identity_cert_refreshes_total", result="ok") == 4
    reg.remove_source(identity_lines)
    assert "control_identity" not in reg.render()


def _scrape_sync(reg: MetricsRegistry, now: float) -> None:
    reg.snapshot(now)


def _scrape_async(reg: MetricsRegistry, now: float) -> None:
    asyncio.run(reg.snapshot_async(now, slice_size=1))


@pytest.mark.parametrize("scrape", [_scrape_sync, _scrape_async])
def test_idle_series_expire_unless_held(scrape: Callable[[MetricsRegistry, float], None]) -> None:
    do = scrape
    reg = MetricsRegistry(retain_idle=600.0, process_metrics=False)
    reg.http("outbound", None, authority="idle").requests += 1
    held = reg.http("outbound", None, authority="held")
    held.requests += 1
    reg.http("outbound", None, authority="busy")
    conn = reg.tcp("inbound", "src", None)
    conn.opened()  # open connection: never expires while open
    do(reg, 0.0)
    do(reg, 599.0)
    assert reg.series_count() == 4
    reg.http("outbound", None, authority="busy").requests += 1  # activity restarts its clock
    do(reg, 601.0)
    text = reg.render(601.0)
    auths = {s.labels["authority"] for s in samples(text)["request_total"]}
    assert auths == {"held", "busy"}, "idle unheld series dropped, held and active kept"
    assert reg.series_count() == 3
    conn.closed()
    del conn
    do(reg, 1300.0)
    do(reg, 1901.0)
    assert reg.series_count() == 1  # only `held`
    held.requests += 1  # a holder keeps counting into a live series
    assert one(reg.render(1902.0), "request_total", authority="held") == 2


def test_render_async_formats_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = metrics_mod.format_snapshot

    def spy(snap: metrics_mod.Snapshot) -> str:
        threads.append(threading.get_ident())
        return real(snap)

    monkeypatch.setattr(metrics_mod, "format_snapshot", spy)
    reg = MetricsRegistry(process_metrics=False)
    reg.http("outbound", None).requests += 1

    async def main() -> tuple[str, int]:
        return await reg.render_async(), threading.get_ident()

    text, loop_thread = asyncio.run(main())
    assert "request_total" in text
    assert threads and threads[0] != loop_thread


def test_bad_extra_label_name_rejected() -> None:
    reg = MetricsRegistry(process_metrics=False)
    with pytest.raises(ValueError, match="label name"):
        reg.http("outbound", None, extra=(("bad-name", "x"),))


def test_a_series_bound_but_never_counted_is_not_shown() -> None:
    reg = MetricsRegistry(process_metrics=False)
    reg.http("outbound", None, authority="bound.ahead:80")  # a destination's, before any request
    used = reg.http("outbound", ("10.0.0.1", 80), authority="used:80")
    used.requests += 1
    text = reg.render()
    assert 'authority="used:80"' in text and "bound.ahead" not in text
