"""The tap layer and its observers against a fake inner service: what a tap sees, its bounds, its match."""

from __future__ import annotations

import asyncio

from tether.api.gen import tap_pb2
from tether.proxy.grpc_client import frame_message
from tether.proxy.http.body import BytesBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response
from tether.proxy.layers.tap import TapLayer
from tether.proxy.tap import INBOUND, Observer, TapHub, TapStreamBody
from tether.proxy.tap_wire import TapRequestError, parse_observe
from tether.viz.tap import observe_request, render_line


def _req(path: bytes = b"/", method: bytes = b"GET") -> Request:
    conn = Connection("inbound", ("10.0.0.1", 40000), ("10.0.0.2", 4143), orig_dst=("10.0.0.2", 8080), tls=True,
                      client_id="a.default.serviceaccount.identity.linkerd.cluster.local")
    return Request(method, path, b"web", conn=conn)


async def _ok(req: Request) -> Response:
    return Response(200, [(b"content-type", b"text/plain")], BytesBody(b"hello"))


def _observer(hub: TapHub, request: tap_pb2.ObserveRequest) -> Observer:
    spec = parse_observe(frame_message(request.SerializeToString()))
    obs = Observer(hub, spec.match, spec.limit, spec.max_rps, hub.max_buffered, spec.extract_headers)
    assert hub.add(obs)
    return obs


def _lines(hub: TapHub, obs: Observer) -> list[str]:
    from tether.proxy.tap_wire import encode

    out = []
    for e in list(obs.buffer):
        ev = tap_pb2.TapEvent()
        ev.ParseFromString(encode(hub.base, e))
        out.append(render_line(ev))
    return out


def test_no_tap_no_events_and_the_inner_awaitable_is_returned_as_is() -> None:
    hub = TapHub()
    calls = []

    def inner(req: Request) -> object:
        calls.append(req)
        return _ok(req)

    layer = TapLayer(inner, hub, INBOUND)  # type: ignore[arg-type]
    aw = layer(_req())
    assert asyncio.iscoroutine(aw)  # the inner's own coroutine: no frame of the layer's
    rsp = asyncio.run(aw)  # type: ignore[arg-type]
    assert rsp.status == 200 and len(calls) == 1 and hub.tapped_total == 0


def test_a_matching_request_gives_req_rsp_end_in_linkerds_format() -> None:
    hub = TapHub()
    obs = _observer(hub, observe_request(path="/api"))
    layer = TapLayer(_ok, hub, INBOUND)

    async def go() -> None:
        await layer(_req(b"/other"))
        rsp = await layer(_req(b"/api/users"))
        assert await rsp.body.read() == b"hello"

    asyncio.run(go())
    lines = _lines(hub, obs)
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"req id={hub.base}:1 proxy=in  src=10.0.0.1:40000 dst=10.0.0.2:8080 tls=true ")
    assert lines[0].endswith(":method=GET :authority=web :path=/api/users")
    assert " :status=200 latency=" in lines[1]
    assert lines[2].endswith("response-length=5B") and lines[2].startswith("end ")


def test_streamed_body_end_is_reported_when_the_body_ends_with_grpc_status() -> None:
    hub = TapHub()
    obs = _observer(hub, observe_request())
    pipe = PipeBody(None)

    async def grpc(req: Request) -> Response:
        return Response(200, [(b"content-type", b"application/grpc")], pipe)

    async def go() -> None:
        rsp = await TapLayer(grpc, hub, INBOUND)(_req())
        assert [e[0] for e in obs.buffer] == ["req", "rsp"]
        pipe.feed(b"12345678")
        pipe.finish([(b"grpc-status", b"5")])
        while await rsp.body.read():
            pass

    asyncio.run(go())
    end = _lines(hub, obs)[-1]
    assert "grpc-status=NotFound" in end and end.endswith("response-length=8B"), end


def test_a_slow_tap_client_loses_events_counted_never_blocking_requests() -> None:
    hub = TapHub(max_buffered=10)
    obs = _observer(hub, observe_request())
    layer = TapLayer(_ok, hub, INBOUND)

    async def go() -> None:
        for _ in range(20):
            rsp = await layer(_req())
            await rsp.body.read()

    asyncio.run(go())
    assert len(obs.buffer) == 10
    assert obs.dropped == 50 and hub.dropped_total == 50  # 20 requests x 3 events, 10 kept
    assert "tether_tap_events_dropped_total 50" in hub.lines()


def test_limit_ends_the_stream_and_max_rps_spaces_requests() -> None:
    hub = TapHub()
    limited = _observer(hub, observe_request(limit=2))
    layer = TapLayer(_ok, hub, INBOUND)

    async def go() -> list[bytes]:
        for _ in range(5):
            await layer(_req())
        body = TapStreamBody(limited, hub.base)
        chunks = []
        while chunk := await body.read():
            chunks.append(chunk)
        assert body.trailers == [(b"grpc-status", b"0")]
        return chunks

    data = b"".join(asyncio.run(go()))
    kinds = []
    while data:
        size = int.from_bytes(data[1:5], "big")
        ev = tap_pb2.TapEvent()
        ev.ParseFromString(data[5:5 + size])
        kinds.append(ev.http.WhichOneof("event"))
        data = data[5 + size:]
    assert kinds == ["request_init", "response_init", "response_end"] * 2
    assert limited.closed and hub.observers == ()
    assert hub.tapped_total == 2
    # max_rps: of requests arriving together only the first is taken
    hub2 = TapHub()
    rated = _observer(hub2, observe_request(max_rps=1.0))

    async def burst() -> None:
        for _ in range(5):
            await TapLayer(_ok, hub2, INBOUND)(_req())

    asyncio.run(burst())
    assert hub2.tapped_total == 1 and rated.inflight == 0


def test_a_stream_whose_client_goes_away_stops_the_tap() -> None:
    hub = TapHub()
    obs = _observer(hub, observe_request())
    TapStreamBody(obs, hub.base).discard()
    assert hub.observers == () and obs.closed


def test_match_destination_and_bad_requests() -> None:
    hub = TapHub()
    obs = _observer(hub, observe_request(to_ips=["10.9.9.9"]))
    asyncio.run(TapLayer(_ok, hub, INBOUND)(_req()))  # to 10.0.0.2: not matched
    assert not obs.buffer
    obs2 = _observer(hub, observe_request(to_ips=["10.0.0.2"], method="get"))
    asyncio.run(TapLayer(_ok, hub, INBOUND)(_req()))
    assert len(obs2.buffer) == 3
    for raw in (b"", b"\x01\x00\x00\x00\x00", frame_message(b"\xff\xff")):
        try:
            parse_observe(raw)
        except TapRequestError:
            continue
        raise AssertionError(f"accepted {raw!r}")


def test_hub_refuses_more_observers_than_its_bound() -> None:
    hub = TapHub(max_observers=1)
    _observer(hub, observe_request())
    spec = parse_observe(frame_message(observe_request().SerializeToString()))
    assert not hub.add(Observer(hub, spec.match, 0, 0, 10, False))


def test_status_filter_shows_only_requests_answered_with_the_status() -> None:
    from tether.proxy.tap_wire import encode
    from tether.viz.tap import StatusFilter

    hub = TapHub()
    obs = _observer(hub, observe_request())

    async def by_path(req: Request) -> Response:
        return Response(500 if req.path == b"/bad" else 200, [], BytesBody(b"x"))

    async def go() -> None:
        for p in (b"/ok", b"/bad", b"/ok2"):
            await TapLayer(by_path, hub, INBOUND)(_req(p))

    asyncio.run(go())
    shown: list[str] = []
    f = StatusFilter(500, lambda mesh, ev: shown.append(render_line(ev)))
    for e in list(obs.buffer):
        ev = tap_pb2.TapEvent()
        ev.ParseFromString(encode(hub.base, e))
        f(None, ev)
    assert [ln.split()[0] for ln in shown] == ["req", "rsp", "end"]
    assert ":path=/bad" in shown[0] and ":status=500" in shown[1]
    assert not f.held and not f.shown
