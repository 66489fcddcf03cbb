"""Each layer of the proxy's stacks against a fake inner service and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tether.core.discovery.endpoints import Endpoint, EndpointSet
from tether.proxy.cache import IdleCache, Stack
from tether.proxy.discovery import Generation, Resolution, endpoint_watch
from tether.proxy.errors import (
    ConnectError,
    FailFastError,
    ProxyError,
    ResponseTimeoutError,
    UpstreamError,
    rescue,
)
from tether.proxy.http.body import BodyError, BytesBody, PipeBody
from tether.proxy.http.message import Connection, Request, Response
from tether.proxy.layers.connect_retry import ConnectRetry
from tether.proxy.layers.rescue import Rescue
from tether.proxy.layers.timeout import ResponseTimeout
from tether.proxy.outbound.router import Router
from tether.proxy.targets import Logical
from tether.testing.fakes import FakeClock, FakeService


def run(coro: Awaitable[object]) -> object:
    async def bounded() -> object:
        async with asyncio.timeout(10):
            return await coro

    return asyncio.run(bounded())


def get(authority: bytes = b"web:80", **kw: object) -> Request:
    return Request(b"GET", b"/", authority, **kw)  # type: ignore[arg-type]


def grpc_call() -> Request:
    return Request(b"POST", b"/pkg.Svc/Call", b"grpc:50051", version="2",
                   headers=[(b"content-type", b"application/grpc")], body=BytesBody(b"\0\0\0\0\0"))


# -- timeout -----------------------------------------------------------------------------------------

def test_timeout_raises_504_error_when_the_head_is_late_and_cancels_the_call() -> None:
    inner = FakeService()
    inner.gate = asyncio.Event()  # never set: the head never comes
    with pytest.raises(ResponseTimeoutError) as err:
        run(ResponseTimeout(inner, 0.05)(get()))
    assert err.value.status == 504 and "0.05s" in err.value.reason
    assert inner.calls == 1


def test_timeout_passes_a_timely_response() -> None:
    rsp = run(ResponseTimeout(FakeService(), 5.0)(get()))
    assert isinstance(rsp, Response) and rsp.status == 200


# -- connect retry -----------------------------------------------------------------------------------

def test_connect_errors_are_retried_up_to_the_attempts_then_raised() -> None:
    inner = FakeService()
    inner.errors = [ConnectError("refused"), ConnectError("refused")]
    rsp = run(ConnectRetry(inner, 3)(get()))
    assert isinstance(rsp, Response) and rsp.status == 200 and inner.calls == 3

    inner = FakeService()
    inner.error = ConnectError("refused")
    with pytest.raises(ConnectError):
        run(ConnectRetry(inner, 3)(get()))
    assert inner.calls == 3


def test_other_errors_and_streamed_bodies_are_never_retried() -> None:
    inner = FakeService()
    inner.errors = [UpstreamError("reset after the request was sent")]
    with pytest.raises(UpstreamError):
        run(ConnectRetry(inner, 3)(get()))
    assert inner.calls == 1

    inner = FakeService()
    inner.errors = [ConnectError("refused")]
    streamed = Request(b"POST", b"/", b"web:80", body=PipeBody(None))
    with pytest.raises(ConnectError):
        run(ConnectRetry(inner, 3)(streamed))
    assert inner.calls == 1  # the body can't be sent twice


# -- rescue ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "status", "grpc_status"), [
    (UpstreamError("upstream reset"), 502, b"14"),
    (FailFastError("web:80: service in fail-fast"), 503, b"14"),
    (ResponseTimeoutError("response timeout after 1s"), 504, b"4"),
    (ProxyError("forbidden by policy", 403), 403, b"7"),
])
def test_rescue_maps_each_error_for_http_and_grpc(error: ProxyError, status: int, grpc_status: bytes) -> None:
    inner = FakeService()
    inner.error = error
    rsp = run(Rescue(inner)(get()))
    assert isinstance(rsp, Response)
    assert rsp.status == status
    assert rsp.header(b"l5d-proxy-error") == error.reason.encode()
    g = run(Rescue(inner)(grpc_call()))
    assert isinstance(g, Response)
    # gRPC clients see errors only as a trailers-only response: HTTP 200 and grpc-status in the head.
    assert g.status == 200 and g.header(b"grpc-status") == grpc_status
    assert g.header(b"grpc-message") == error.reason.encode()
    assert g.header(b"content-type") == b"application/grpc"


def test_the_codecs_rescue_anything_else_the_same_way() -> None:
    assert rescue(ConnectionResetError("peer reset"), get()).status == 502
    body_err = rescue(BodyError("client went away"), get())
    assert body_err.status == 400 and body_err.header(b"l5d-proxy-error") == b"request body error: client went away"
    assert rescue(RuntimeError("x\r\ninjected: 1"), get()).header(b"l5d-proxy-error") == b"x  injected: 1"


# -- the stack cache ---------------------------------------------------------------------------------

def test_idle_stacks_are_dropped_and_closed_used_ones_kept() -> None:
    clock = FakeClock()
    closed: list[str] = []

    async def close(stack: Stack) -> None:
        closed.append(stack.service.name)  # type: ignore[attr-defined]

    async def main() -> None:
        cache: IdleCache[str, Stack] = IdleCache(lambda k: Stack(FakeService(name=k)), 10.0, close=close,
                                                 clock=clock)
        a = cache.get("a")
        cache.get("b")
        assert cache.get("a") is a and len(cache) == 2
        clock.t += 6
        cache.get("a")  # used: its idle age starts again
        clock.t += 6
        assert [s.service.name for s in cache.sweep()] == ["b"]  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        assert closed == ["b"] and len(cache) == 1
        assert cache.get("b") is not None and len(cache) == 2  # rebuilt on next use
        clock.t += 10
        cache.sweep()
        await asyncio.sleep(0)
        assert len(cache) == 0 and sorted(closed) == ["a", "b", "b"] and cache.evicted_total == 3

    run(main())


def test_a_kept_entry_used_between_sweeps_is_idle_from_the_sweep_that_saw_the_use() -> None:
    # use() reads no clock: the next sweep counts the entry used at its own time.
    clock = FakeClock()
    cache: IdleCache[str, Stack] = IdleCache(lambda k: Stack(FakeService(name=k)), 10.0, clock=clock)
    e = cache.entry("a")
    clock.t += 9
    assert cache.use(e) is not None
    clock.t += 3
    assert cache.sweep() == [] and e.live  # 12 s after the entry was made, 3 s after its use
    clock.t += 9.5
    assert cache.sweep() == [] and e.live  # 9.5 s after the sweep that saw the use
    clock.t += 0.5
    assert len(cache.sweep()) == 1 and not e.live


# -- the router --------------------------------------------------------------------------------------

class FakeDiscovery:
    def __init__(self, known: dict[str, EndpointSet]) -> None:
        self.known = {k: endpoint_watch(v) for k, v in known.items()}
        self.changes = Generation()

    async def resolve(self, authority: str) -> Resolution | None:
        w = self.known.get(authority)
        return Resolution(authority, w) if w is not None else None

    async def lookup(self, addr: tuple[str, int]) -> Endpoint | None:
        return None

    async def policy(self, authority: str) -> None:
        return None

    async def policy_for_addr(self, addr: tuple[str, int]) -> None:
        return None

    async def profile(self, authority: str) -> None:
        return None

    def opaque_dst(self, addr: tuple[str, int]) -> bool:
        return False

    def generation(self) -> int:
        return self.changes.value

    async def run(self) -> None:
        return None


def router(discovery: FakeDiscovery) -> tuple[Router, list[Logical], dict[Logical, FakeService]]:
    built: list[Logical] = []
    services: dict[Logical, FakeService] = {}

    def make(target: Logical) -> Stack:
        built.append(target)
        svc = services[target] = FakeService(name=target.authority)
        return Stack(svc)

    cache: IdleCache[Logical, Stack] = IdleCache(make, 60.0)
    return Router(discovery, cache, {("127.0.0.1", 4140)}, discovery.changes), built, services


def call(r: Callable[[Request], Awaitable[Response]], req: Request) -> Response:
    rsp = run(r(req))
    assert isinstance(rsp, Response)
    return rsp


def test_known_authorities_share_one_logical_stack_and_unknown_ones_go_where_they_name() -> None:
    d = FakeDiscovery({"web.ns.svc.cluster.local:80": EndpointSet([Endpoint.of("10.0.0.1:8080")])})
    r, built, services = router(d)
    for authority in (b"web.ns.svc.cluster.local", b"WEB.ns.svc.cluster.local:80", b"web.ns.svc.cluster.local."):
        call(r, get(authority))
    [known] = built
    assert known.authority == "web.ns.svc.cluster.local:80" and known.fallback is None
    assert services[known].calls == 3
    call(r, get(b"10.1.2.3:9000"))
    assert built[1] == Logical("10.1.2.3:9000", fallback=("10.1.2.3", 9000))


def test_router_rebuilds_a_stack_the_cache_dropped_while_idle() -> None:
    clock = FakeClock()
    d = FakeDiscovery({"web.ns.svc.cluster.local:80": EndpointSet([Endpoint.of("10.0.0.1:8080")])})
    built: list[Logical] = []
    closed: list[str] = []

    def make(target: Logical) -> Stack:
        built.append(target)
        return Stack(FakeService(name=f"{target.authority}#{len(built)}"))

    async def close(stack: Stack) -> None:
        closed.append(stack.service.name)  # type: ignore[attr-defined]

    async def main() -> None:
        cache: IdleCache[Logical, Stack] = IdleCache(make, 60.0, close=close, clock=clock)
        r = Router(d, cache, {("127.0.0.1", 4140)}, d.changes)
        await r(get(b"web.ns.svc.cluster.local"))
        clock.t += 50
        await r(get(b"web.ns.svc.cluster.local"))  # used: kept past the first minute
        clock.t += 50
        assert cache.sweep() == [] and len(built) == 1
        clock.t += 61
        assert len(cache.sweep()) == 1
        await asyncio.sleep(0)
        assert closed == ["web.ns.svc.cluster.local:80#1"]
        await r(get(b"web.ns.svc.cluster.local"))  # served by a new stack, not the closed one
        assert len(built) == 2 and len(cache) == 1
        assert cache.peek(built[1]).service.calls == 1  # type: ignore[union-attr]

    run(main())


def test_a_dropped_stack_is_not_kept_alive_by_the_router() -> None:
    """The router keeps each authority's cache entry; once the cache drops a stack the entry lets go
    of it, or 10,000 idle destinations would keep 10,000 stacks (connections, metric series) alive."""
    import gc
    import weakref

    clock = FakeClock()
    d = FakeDiscovery({"web.ns.svc.cluster.local:80": EndpointSet([Endpoint.of("10.0.0.1:8080")])})
    refs: list[weakref.ref[FakeService]] = []

    def make(target: Logical) -> Stack:
        service = FakeService(name=target.authority)
        refs.append(weakref.ref(service))
        return Stack(service)

    async def main() -> None:
        cache: IdleCache[Logical, Stack] = IdleCache(make, 60.0, clock=clock)
        r = Router(d, cache, {("127.0.0.1", 4140)}, d.changes)
        await r(get(b"web.ns.svc.cluster.local"))
        clock.t += 61
        assert len(cache.sweep()) == 1
        gc.collect()
        assert refs[0]() is None, "the router still holds the dropped stack"

    run(main())


def test_dst_override_wins_and_is_not_forwarded() -> None:
    d = FakeDiscovery({"api.ns.svc.cluster.local:8080": EndpointSet()})
    r, built, services = router(d)
    req = get(b"web:80", headers=[(b"l5d-dst-override", b"api.ns.svc.cluster.local:8080")])
    call(r, req)
    assert built[0].authority == "api.ns.svc.cluster.local:8080"
    assert services[built[0]].requests[0].header(b"l5d-dst-override") is None


def test_transparent_requests_fall_back_to_the_original_destination() -> None:
    r, built, _ = router(FakeDiscovery({}))
    conn = Connection("outbound", ("10.0.0.9", 40000), ("127.0.0.1", 4140), orig_dst=("10.9.9.9", 80))
    call(r, get(b"unknown.example", conn=conn))
    assert built[0] == Logical("unknown.example:80", fallback=("10.9.9.9", 80))


def test_a_request_that_would_loop_into_the_proxy_is_refused() -> None:
    r, _, _ = router(FakeDiscovery({}))
    with pytest.raises(ProxyError, match="loop back into the proxy"):
        run(r(get(b"127.0.0.1:4140")))


def test_decisions_are_forgotten_when_discovery_changes() -> None:
    d = FakeDiscovery({})
    r, built, _ = router(d)
    call(r, get(b"web.ns.svc.cluster.local:80"))
    assert built[0].fallback is not None  # unknown for now
    d.known["web.ns.svc.cluster.local:80"] = endpoint_watch(EndpointSet())
    d.changes.value += 1
    call(r, get(b"web.ns.svc.cluster.local:80"))
    assert built[1] == Logical("web.ns.svc.cluster.local:80")  # known now: balanced


def test_alternating_destinations_each_reach_their_own_stack() -> None:
    # The router remembers its last decision: a different authority, or the same one sent to
    # another original destination, must not reuse it.
    d = FakeDiscovery({"web.ns.svc.cluster.local:80": EndpointSet([Endpoint.of("10.0.0.1:8080")])})
    r, built, services = router(d)
    to_a = Connection("outbound", ("10.0.0.9", 40000), ("127.0.0.1", 4140), orig_dst=("10.9.9.1", 80))
    to_b = Connection("outbound", ("10.0.0.9", 40001), ("127.0.0.1", 4140), orig_dst=("10.9.9.2", 80))
    for _ in range(2):
        call(r, get(b"web.ns.svc.cluster.local"))
        call(r, get(b"unknown.example", conn=to_a))
        call(r, get(b"unknown.example", conn=to_b))
        call(r, get(b"unknown.example", conn=to_b))
    web, via_a, via_b = built
    assert web == Logical("web.ns.svc.cluster.local:80")
    assert via_a == Logical("unknown.example:80", fallback=("10.9.9.1", 80))
    assert via_b == Logical("unknown.example:80", fallback=("10.9.9.2", 80))
    assert [services[t].calls for t in built] == [2, 2, 4]
