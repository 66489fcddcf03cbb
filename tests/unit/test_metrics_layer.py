"""The HTTP metrics layer against a fake inner service and a fake clock."""

from __future__ import annotations

import asyncio
import gc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tether.proxy.http.body import BodyError, BytesBody, EmptyBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response, Service
from tether.proxy.layers.metrics import EndpointMeter, HttpMetricsService, InboundHttpMetrics
from tether.proxy.metrics import MetricsRegistry
from tether.proxy.targets import InboundTarget
from tether.testing.fakes import FakeClock


def scrape(reg: MetricsRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(reg.render()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def responses(reg: MetricsRegistry) -> list[dict[str, str]]:
    return [{**labels, "n": str(int(v))} for labels, v in scrape(reg).get("response_total", [])]


def request(authority: bytes = b"web.ns:8080") -> Request:
    conn = Connection(direction="inbound", peer=("10.0.0.9", 5555), local=("0.0.0.0", 4143))
    conn.orig_dst = ("10.0.0.1", 8080)
    return Request(method=b"GET", path=b"/", authority=authority, conn=conn)


def InboundMetrics(inner: Service, reg: MetricsRegistry, clock: FakeClock | None = None) -> InboundHttpMetrics:
    """The inbound metrics layer of the target the test requests go to."""
    if clock is None:
        return InboundHttpMetrics(inner, reg, InboundTarget(("10.0.0.1", 8080)))
    return InboundHttpMetrics(inner, reg, InboundTarget(("10.0.0.1", 8080)), clock=clock)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_counts_request_latency_and_response_with_conn_labels() -> None:
    reg = MetricsRegistry(process_metrics=False)
    clock = FakeClock()

    upstream = PipeBody(None)

    async def inner(req: Request) -> Response:
        clock.t += 0.0042  # 4.2 ms to the response head
        upstream.feed(b"hello")
        return Response(200, body=upstream)

    svc = InboundMetrics(inner, reg, clock)

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


def test_the_serving_endpoints_series_wins_else_the_targets() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def endpoint(req: Request) -> Response:
        return Response(204)

    async def no_endpoint(req: Request) -> Response:
        return Response(503)

    bound = reg.http("outbound", ("10.9.9.9", 80), authority="logical.svc:80", tls=True, server_id="peer.id",
                     extra=(("dst_namespace", "ns"),))
    logical = reg.http("outbound", None, authority="logical.svc:80")
    run(HttpMetricsService(EndpointMeter(endpoint, bound), logical)(request()))
    run(HttpMetricsService(no_endpoint, logical)(request()))
    reqs = {lb.get("target_ip", ""): lb for lb, _ in scrape(reg)["request_total"]}
    assert reqs["10.9.9.9"]["tls"] == "true"
    assert reqs["10.9.9.9"]["server_id"] == "peer.id"
    assert reqs["10.9.9.9"]["dst_namespace"] == "ns"
    # Failed before any endpoint: counted against the logical destination, without an address.
    assert reqs[""]["authority"] == "logical.svc:80"
    codes = {(lb.get("target_ip", ""), lb["status_code"]) for lb, _ in scrape(reg)["response_total"]}
    assert codes == {("10.9.9.9", "204"), ("", "503")}


def test_inbound_authorities_are_one_series_per_service() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(200)

    svc = InboundMetrics(inner, reg)
    for authority in (b"Web.NS", b"web.ns:80", b"web.ns."):
        run(svc(Request(method=b"GET", path=b"/", authority=authority)))
    [(labels, n)] = scrape(reg)["request_total"]
    assert (labels["authority"], n) == ("web.ns:80", 3)


def test_5xx_is_failure() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(502)

    run(InboundMetrics(inner, reg)(request()))
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
        rsp = await InboundMetrics(inner, reg)(request())
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
        await InboundMetrics(trailers_only, reg)(request())
        rsp = await InboundMetrics(ok, reg)(request())
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
        run(InboundMetrics(inner, reg)(request()))
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
        rsp = await InboundMetrics(failing, reg)(request(b"failing"))
        assert await rsp.body.read() == b"partial"
        with pytest.raises(BodyError):
            await rsp.body.read()
        rsp.body.discard()  # a second ending does not count again
        rsp2 = await InboundMetrics(streaming, reg)(request(b"dropped"))
        del rsp2  # never read nor discarded
        gc.collect()

    run(main())
    got = sorted((r["authority"], r["classification"], r["error"], r["n"]) for r in responses(reg))
    assert got == [("dropped:80", "failure", "canceled", "1"), ("failing:80", "failure", "body", "1")]


def test_empty_body_counted_at_once() -> None:
    reg = MetricsRegistry(process_metrics=False)

    async def inner(req: Request) -> Response:
        return Response(304, body=EmptyBody())

    rsp = run(InboundMetrics(inner, reg)(request()))
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
        rsp = await InboundMetrics(inner, reg)(request())
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


def test_a_route_that_becomes_retryable_gets_route_actual_series_of_its_own() -> None:
    """A route without retries counts route_actual_* in its route_* series; once a profile makes it
    retryable, its tries must be counted apart: the shared series is split, both keeping the
    counts so far (counters never go back)."""
    from tether.proxy.layers.routes import RouteMetrics

    rm = RouteMetrics()
    rm.same_actual("api:80", "GET /x")
    shared = rm.series("route_", "api:80", "GET /x")
    shared.requests += 5
    shared.status(200).latency.observe(3.0)
    shared.status(200).response("success").count += 5
    actual = rm.actual("api:80", "GET /x")
    assert actual is not shared
    actual.requests += 2  # two retries
    actual.status(200).response("success").count += 2

    def values(name: str) -> dict[str, float]:
        fams = {f.name: f for f in text_string_to_metric_families("\n".join(rm.lines()) + "\n")}
        return {s.name: s.value for s in fams[name].samples}

    assert values("route_request")["route_request_total"] == 5
    assert values("route_actual_request")["route_actual_request_total"] == 7
    assert rm.actual("api:80", "GET /x") is actual  # split once
