"""The proxy's destination client against scripted Destination servers on loopback (real gRPC).

The scripts stand in for control-plane replicas so that each stream's behaviour (first answer,
diffs, a replica dying, a reset) is exact; the real controller is exercised end to end in
tests/integration/test_destination_proxy.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from tether.api.gen import destination_pb2 as d
from tether.api.gen import destination_pb2_grpc, net_pb2
from tether.core.discovery.endpoints import Endpoint
from tether.proxy.destination import DestinationDiscovery, DestinationSettings, context_token
from tether.testing.fakes import until

Script = Callable[[d.GetDestination, asyncio.Queue[d.Update | None]], None]


def addr(ip: str, port: int) -> net_pb2.TcpAddress:
    return net_pb2.TcpAddress(ip=net_pb2.IPAddress(ipv4=int(ipaddress.IPv4Address(ip))), port=port)


def weighted(ip: str, port: int, identity: str | None = None, **labels: str) -> d.WeightedAddr:
    w = d.WeightedAddr(addr=addr(ip, port), weight=10000, metric_labels=labels)
    if identity:
        w.tls_identity.CopyFrom(d.TlsIdentity(dns_like_identity=d.TlsIdentity.DnsLikeIdentity(name=identity)))
        w.protocol_hint.CopyFrom(d.ProtocolHint(h2=d.ProtocolHint.H2()))
    return w


class Replica(destination_pb2_grpc.DestinationServicer):
    """A Destination server whose streams send what the test puts in their queue (None ends it)."""

    def __init__(self) -> None:
        self.requests: list[d.GetDestination] = []
        self.streams: list[asyncio.Queue[d.Update | None]] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.on_get: Callable[[d.GetDestination], list[d.Update]] = lambda req: []
        self.profile_requests: list[d.GetDestination] = []
        self.profile_streams: list[asyncio.Queue[d.DestinationProfile | None]] = []
        self.profile_streams_open = 0

    async def Get(self, request: d.GetDestination, context: grpc.aio.ServicerContext) -> AsyncIterator[d.Update]:
        self.requests.append(request)
        q: asyncio.Queue[d.Update | None] = asyncio.Queue()
        for u in self.on_get(request):
            q.put_nowait(u)
        self.streams.append(q)
        while (u := await q.get()) is not None:
            yield u

    async def GetProfile(self, request: d.GetDestination,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[d.DestinationProfile]:
        self.profile_requests.append(request)
        q: asyncio.Queue[d.DestinationProfile | None] = asyncio.Queue()
        self.profile_streams.append(q)
        self.profile_streams_open += 1
        try:
            while (p := await q.get()) is not None:
                yield p
        finally:
            self.profile_streams_open -= 1

    async def start(self) -> Replica:
        self.server = grpc.aio.server()
        destination_pb2_grpc.add_DestinationServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)


def run(coro: Callable[[], object]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coro()  # type: ignore[misc]

    asyncio.run(bounded())


def test_known_destination_snapshot_then_diffs_with_identity_and_labels() -> None:
    async def main() -> None:
        r = await Replica().start()
        r.on_get = lambda req: [d.Update(add=d.WeightedAddrSet(
            addrs=[weighted("10.0.0.1", 8080, "web.ns.serviceaccount.identity.linkerd.cluster.local", pod="web-1")],
            metric_labels={"namespace": "ns", "service": "web"}))]
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), context_token("client-ns")))
        try:
            res = await dd.resolve("Web.NS.svc.cluster.local")
            assert res is not None and res.authority == "web.ns.svc.cluster.local:80"
            assert r.requests[0].path == "web.ns.svc.cluster.local:80"
            assert r.requests[0].context_token == '{"ns":"client-ns"}'
            [ep] = list(res.endpoints.state)
            assert ep == Endpoint.of("10.0.0.1:8080", weight=10000,
                                     identity="web.ns.serviceaccount.identity.linkerd.cluster.local",
                                     protocol_hint="h2",  # its proxy takes HTTP/1 over HTTP/2
                                     labels={"dst_namespace": "ns", "dst_service": "web", "dst_pod": "web-1"})
            r.streams[0].put_nowait(d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.2", 8080)])))
            r.streams[0].put_nowait(d.Update(remove=d.AddrSet(addrs=[addr("10.0.0.1", 8080)])))
            await until(lambda: res.endpoints.state.addrs == {("10.0.0.2", 8080)}, "diffs applied")
            assert (await dd.resolve("web.ns.svc.cluster.local:80")) is not None
            assert len(r.requests) == 1  # one stream per destination
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_an_unknown_destination_resolves_to_none_and_the_router_is_told_when_it_appears() -> None:
    async def main() -> None:
        r = await Replica().start()
        r.on_get = lambda req: [d.Update(no_endpoints=d.NoEndpoints(exists=False))]
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), context_token("ns")))
        try:
            assert await dd.resolve("example.com:443") is None
            gen = dd.generation()
            r.streams[0].put_nowait(d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.9", 443)])))
            r.streams[0].put_nowait(None)  # the replica ends the stream; the client reconnects
            r.on_get = lambda req: [d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.9", 443)]))]
            await until(lambda: dd.generation() != gen, "generation bumped", steps=1_000_000)
            res = await dd.resolve("example.com:443")
            assert res is not None and res.endpoints.state.addrs == {("10.0.0.9", 443)}
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_a_destination_appearing_on_the_same_stream_is_known_at_once() -> None:
    # The Service is applied after a client asked for its name: the stream that said "unknown"
    # now adds endpoints. The router must decide again (mesh it), not keep forwarding as addressed.
    async def main() -> None:
        r = await Replica().start()
        r.on_get = lambda req: [d.Update(no_endpoints=d.NoEndpoints(exists=False))]
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), context_token("ns")))
        try:
            assert await dd.resolve("web.ns.svc.cluster.local:80") is None
            gen = dd.generation()
            r.streams[0].put_nowait(d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.7", 80)])))
            await until(lambda: dd.generation() != gen, "generation bumped", steps=1_000_000)
            res = await dd.resolve("web.ns.svc.cluster.local:80")
            assert res is not None and res.endpoints.state.addrs == {("10.0.0.7", 80)}
            assert len(r.streams) == 1  # no reconnect was needed
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_failover_keeps_the_last_good_answer_and_a_reconnect_replaces_the_whole_set() -> None:
    async def main() -> None:
        a, b = await Replica().start(), await Replica().start()
        a.on_get = lambda req: [d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.1", 80),
                                                                      weighted("10.0.0.2", 80)]))]
        b.on_get = lambda req: [d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.2", 80),
                                                                      weighted("10.0.0.3", 80)]))]
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"), "{}"))
        dd._rng.seed(0)
        try:
            res = await dd.resolve("web:80")
            assert res is not None
            first, other = (a, b) if a.requests else (b, a)
            await first.stop()  # the replica dies: the next one answers with its own view
            await until(lambda: bool(other.requests), "failed over", steps=10_000_000)
            expected = {("10.0.0.2", 80), ("10.0.0.3", 80)} if other is b else {("10.0.0.1", 80), ("10.0.0.2", 80)}
            await until(lambda: res.endpoints.state.addrs == expected, "set replaced", steps=1_000_000)
            assert "tether_destination_stale 0" in dd.metrics_lines()
            await other.stop()  # no replica left: the last good answer stays, marked stale
            await until(lambda: "tether_destination_stale 1" in dd.metrics_lines(), "stale", steps=10_000_000)
            assert res.endpoints.state.addrs == expected
            assert await dd.resolve("web:80") is not None
        finally:
            await dd.aclose()

    run(main)


def test_no_replica_answering_falls_back_after_the_resolve_timeout() -> None:
    async def main() -> None:
        dd = DestinationDiscovery(DestinationSettings(("127.0.0.1:1",), "{}", resolve_timeout=0.2))
        try:
            assert await dd.resolve("web:80") is None
        finally:
            await dd.aclose()

    run(main)


def test_a_first_answer_after_the_resolve_timeout_makes_routers_decide_again() -> None:
    # A loaded replica answers after the resolve timeout: the request that waited was forwarded as
    # addressed; when the answer says the destination exists, routers must mesh it from then on.
    async def main() -> None:
        r = await Replica().start()
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), "{}", resolve_timeout=0.2))
        try:
            assert await dd.resolve("web.ns.svc.cluster.local:80") is None
            gen = dd.generation()
            await until(lambda: bool(r.streams), "stream opened", steps=1_000_000)
            r.streams[0].put_nowait(d.Update(add=d.WeightedAddrSet(addrs=[weighted("10.0.0.7", 80)])))
            await until(lambda: dd.generation() != gen, "generation bumped", steps=1_000_000)
            res = await dd.resolve("web.ns.svc.cluster.local:80")
            assert res is not None and res.endpoints.state.addrs == {("10.0.0.7", 80)}
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_whether_an_original_destination_is_opaque_comes_from_its_profile() -> None:
    # The outbound side asks before detecting: the first time it waits for the answer, then it knows
    # at once, and follows the stream's later answers.
    async def main() -> None:
        r = await Replica().start()
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), "{}", resolve_timeout=20))
        try:
            first = dd.opaque_dst(("10.0.0.9", 5432))
            assert not isinstance(first, bool)
            pending = asyncio.ensure_future(first)
            await until(lambda: bool(r.profile_streams), "profile stream opened", steps=1_000_000)
            assert [q.path for q in r.profile_requests] == ["10.0.0.9:5432"]
            r.profile_streams[0].put_nowait(d.DestinationProfile(opaque_protocol=True))
            assert await pending is True
            assert dd.opaque_dst(("10.0.0.9", 5432)) is True  # known now: no lookup, no new stream
            r.profile_streams[0].put_nowait(d.DestinationProfile(opaque_protocol=False))
            await until(lambda: dd.opaque_dst(("10.0.0.9", 5432)) is False, "the later answer applied",
                        steps=1_000_000)
            assert len(r.profile_requests) == 1
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_without_an_answer_a_destination_is_not_opaque_after_the_resolve_timeout() -> None:
    async def main() -> None:
        dd = DestinationDiscovery(DestinationSettings(("127.0.0.1:1",), "{}", resolve_timeout=0.2))
        try:
            verdict = dd.opaque_dst(("10.0.0.9", 5432))
            assert not isinstance(verdict, bool) and await verdict is False
        finally:
            await dd.aclose()

    run(main)


def test_only_addresses_in_the_profile_networks_are_asked_about() -> None:
    # As Linkerd's proxy (its profile networks are the cluster's): egress gets no stream and no wait.
    async def main() -> None:
        r = await Replica().start()
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), "{}", resolve_timeout=20,
                                                      profile_networks=(ipaddress.ip_network("10.0.0.0/8"),)))
        try:
            assert dd.opaque_dst(("8.8.8.8", 443)) is False
            assert dd.opaque_dst(("2001:db8::1", 443)) is False
            inside = dd.opaque_dst(("10.1.2.3", 5432))
            assert not isinstance(inside, bool)
            pending = asyncio.ensure_future(inside)
            await until(lambda: bool(r.profile_streams), "profile stream opened", steps=1_000_000)
            r.profile_streams[0].put_nowait(d.DestinationProfile(opaque_protocol=True))
            assert await pending is True
            assert [q.path for q in r.profile_requests] == ["10.1.2.3:5432"]
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_opaque_lookups_by_address_keep_at_most_max_streams_open() -> None:
    # Every original destination an application dials gets a stream: they are bounded, the least
    # recently used closed first.
    async def main() -> None:
        r = await Replica().start()
        dd = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{r.port}",), "{}", resolve_timeout=20,
                                                      max_streams=2))
        try:
            for i in range(3):
                verdict = dd.opaque_dst((f"10.0.0.{i}", 80))
                pending = asyncio.ensure_future(verdict) if not isinstance(verdict, bool) else None
                await until(lambda i=i: len(r.profile_streams) == i + 1, "profile stream opened", steps=1_000_000)
                r.profile_streams[i].put_nowait(d.DestinationProfile(opaque_protocol=i == 2))
                assert pending is not None and await pending is (i == 2)
            await until(lambda: r.profile_streams_open == 2, "the oldest stream closed", steps=1_000_000)
            assert "tether_destination_address_profiles 2" in dd.metrics_lines()
            assert dd.opaque_dst(("10.0.0.2", 80)) is True
            assert dd.opaque_dst(("10.0.0.1", 80)) is False
            again = dd.opaque_dst(("10.0.0.0", 80))  # asked again
            assert not isinstance(again, bool)
            again.close()  # type: ignore[attr-defined]
        finally:
            await dd.aclose()
            await r.stop()

    run(main)


def test_settings_need_an_address() -> None:
    with pytest.raises(ValueError):
        DestinationDiscovery(DestinationSettings((), "{}"))


def test_the_proxy_refuses_bad_destination_settings_naming_the_flag() -> None:
    from tether.proxy.app import discovery_from
    from tether.proxy.config import ConfigError, ProxyConfig

    with pytest.raises(ConfigError, match="--destination-addrs: 'x' is not host:port"):
        discovery_from(ProxyConfig(destination_addrs="x"))
    with pytest.raises(ConfigError, match="choose one source of endpoints"):
        discovery_from(ProxyConfig(destination_addrs="127.0.0.1:8086", destinations_file="/tmp/d.yaml"))
