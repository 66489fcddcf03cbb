"""The HTTP metrics layer against a fake inner service and a fake clock."""

from __future__ import annotations

import asyncio
import gc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tether.proxy.http.body import BodyError, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response
from tether.proxy.layers.metrics import HttpMetricsService
from tether.proxy.metrics import MetricsRegistry


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scrape(reg: MetricsRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(reg.render()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def responses(reg: MetricsRegistry) -> list[dict[str, str]]:
    return [{**labels, "n": str(int(v))} for labels, v in scrape(reg).get("response_total", [])]


def request(**ext: object) -> Request:
    conn = Connection(direction="inbound", peer=("10.0.0.9", 5555), local=("0.0.0.0", 4143))
    conn.orig_dst = ("10.0.0.1", 8080)
    req = Request(method=b"GET", path=b"/", authority=b"web.ns:8080", conn=conn)
    req.extensions.update(ext)
    return req


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_counts_request_latency_and_response_with_conn_labels() -> None:
    reg = MetricsRegistry(process_metrics=False)
    clock = FakeClock()

    upstream = PipeBody(None)

    async def inner(req: Request) -> Response:
        clock.now += 0.0042  # 4.2 ms to the response head
        upstream.feed(b"hello")
        return Response(200, body=upstream)

    svc = HttpMetricsService(inner, reg, clock=clock)

    async def main() -> None:
        rsp = await svc(request())
        assert await rsp.body.read() == b"hello"
        # Counted at the end of the body, not at the head.
        assert responses(reg) == []
        upstream.finish()
        assert await rsp.body.read() == b""

    run(main())
    m = scrape(reg)
    (labels, value), *_ = m["request_total"]
    assert value == 1
    assert labels["direction"] == "inbound"
    assert labels["authority"] == "web.ns:8080"
    assert labels["target_addr"] == "10.0.0.1:8080"
    assert labels["tls"] == "disabled"
    buckets = {lb["le"]: v for lb, v in m["response_latency_ms_bucket"] if lb["status_code"] == "200"}
    assert buckets["4"] == 0 and buckets["5"] == 1
    assert responses(reg) == [{**labels, "status_code": "200", "classification": "success", "n": "1"}]


def test_extensions_override_labels_and_prebound_series_wins() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(204)

    svc = HttpMetricsService(inner, reg)
    run(
        svc(
            request(
                authority="logical.svc:80",
                target_addr=("10.9.9.9", 80),
                server_id="peer.id",
                metrics_labels=(("dst_namespace", "ns"),),
            )
        )
    )
    bound = reg.http("outbound", None, authority="prebound")
    run(svc(request(metrics=bound)))
    reqs = {lb["authority"]: lb for lb, _ in scrape(reg)["request_total"]}
    assert reqs["logical.svc:80"]["target_ip"] == "10.9.9.9"
    assert reqs["logical.svc:80"]["tls"] == "true"
    assert reqs["logical.svc:80"]["server_id"] == "peer.id"
    assert reqs["logical.svc:80"]["dst_namespace"] == "ns"
    assert "prebound" in reqs


def test_5xx_is_failure() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(502)

    run(HttpMetricsService(inner, reg)(request()))
    [r] = responses(reg)
    assert (r["status_code"], r["classification"]) == ("502", "failure")


def test_grpc_status_from_trailers_classifies_at_end_of_stream() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        body = PipeBody(None)
        body.feed(b"\x00\x00\x00\x00\x00")
        body.finish(trailers=[(b"grpc-status", b"14"), (b"grpc-message", b"unavailable")])
        return Response(200, headers=[(b"content-type", b"application/grpc")], body=body)

    async def main() -> None:
        rsp = await HttpMetricsService(inner, reg)(request())
        while await rsp.body.read():
            pass
        assert rsp.body.trailers == [(b"grpc-status", b"14"), (b"grpc-message", b"unavailable")]

    run(main())
    [r] = responses(reg)
    assert (r["status_code"], r["grpc_status"], r["classification"]) == ("200", "14", "failure")


def test_grpc_trailers_only_and_ok() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def trailers_only(req: Request) -> Response:
        return Response(200, headers=[(b"content-type", b"application/grpc"), (b"grpc-status", b"5")])

    async def ok(req: Request) -> Response:
        return Response(
            200,
            headers=[(b"content-type", b"application/grpc+proto")],
            body=BytesBody(b"x", trailers=[(b"grpc-status", b"0")]),
        )

    async def main() -> None:
        await HttpMetricsService(trailers_only, reg)(request())
        rsp = await HttpMetricsService(ok, reg)(request())
        while await rsp.body.read():
            pass

    run(main())
    got = sorted((r["grpc_status"], r["classification"]) for r in responses(reg))
    assert got == [("0", "success"), ("5", "failure")]


def test_inner_error_counts_failure_without_status_and_reraises() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        raise ConnectionResetError("upstream reset")

    with pytest.raises(ConnectionResetError):
        run(HttpMetricsService(inner, reg)(request()))
    [r] = responses(reg)
    assert "status_code" not in r
    assert (r["classification"], r["error"]) == ("failure", "unexpected")


def test_body_error_and_dropped_body_count_once() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def failing(req: Request) -> Response:
        body = PipeBody(None)
        body.feed(b"partial")
        body.fail(ConnectionResetError("reset"))
        return Response(200, body=body)

    async def streaming(req: Request) -> Response:
        body = PipeBody(None)
        body.feed(b"x")
        return Response(200, body=body)

    async def main() -> None:
        rsp = await HttpMetricsService(failing, reg)(request(authority="failing"))
        assert await rsp.body.read() == b"partial"
        with pytest.raises(BodyError):
            await rsp.body.read()
        rsp.body.discard()  # a second ending does not count again
        rsp2 = await HttpMetricsService(streaming, reg)(request(authority="dropped"))
        del rsp2  # never read nor discarded
        gc.collect()

    run(main())
    got = sorted((r["authority"], r["classification"], r["error"], r["n"]) for r in responses(reg))
    assert got == [("dropped", "failure", "canceled", "1"), ("failing", "failure", "body", "1")]


def test_empty_body_counted_at_once() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(304, body=EmptyBody())

    rsp = run(HttpMetricsService(inner, reg)(request()))
    assert isinstance(rsp, Response) and type(rsp.body) is EmptyBody
    [r] = responses(reg)
    assert (r["status_code"], r["classification"]) == ("304", "success")


def test_trailers_are_live_and_a_fully_arrived_body_ends_well_when_dropped() -> None:
    reg = MetricsRegistry(process_metrics=False)
    upstream = PipeBody(None)

    async def inner(req: Request) -> Response:
        upstream.feed(b"data")
        return Response(200, headers=[(b"content-type", b"application/grpc")], body=upstream)

    async def main() -> None:
        rsp = await HttpMetricsService(inner, reg)(request())
        assert rsp.body.trailers is None and not rsp.body.is_end_known()
        upstream.finish(trailers=[(b"grpc-status", b"0")])
        # An HTTP/2 writer checks trailers before reading the end: they show through the wrapper.
        assert rsp.body.trailers == [(b"grpc-status", b"0")]
        assert await rsp.body.read() == b"data"
        rsp.body.discard()  # the writer stops at the last byte without reading b""

    run(main())
    [r] = responses(reg)
    assert (r["grpc_status"], r["classification"]) == ("0", "success")
    assert "error" not in r
