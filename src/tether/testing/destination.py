"""A scripted Destination server (linkerd2-proxy-api messages over grpcio) for tests and benchmarks.

It answers ``Get`` with fixed endpoints per authority (``no_endpoints{exists:false}`` for any
other) and ``GetProfile`` with the profile set for the authority (an empty one otherwise),
sending a new version on every ``set_profile``. The real destination controller is tested on
its own; this stands in where the exact profile matters.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from google.protobuf.duration_pb2 import Duration

from tether.api.gen import destination_pb2 as d
from tether.api.gen import destination_pb2_grpc, http_types_pb2, net_pb2


def tcp(port: int, host: str = "127.0.0.1") -> net_pb2.TcpAddress:
    return net_pb2.TcpAddress(ip=net_pb2.IPAddress(ipv4=int(ipaddress.IPv4Address(host))), port=port)


def route(name: str, method: str, regex: str, *, retryable: bool = False, timeout: float | None = None) -> d.Route:
    """A ServiceProfile route: ``method`` and a full-path ``regex``; 5xx is a failure."""
    registered = http_types_pb2.HttpMethod.Registered.Value(method)
    r = d.Route(
        condition=d.RequestMatch(all=d.RequestMatch.Seq(matches=[
            d.RequestMatch(method=http_types_pb2.HttpMethod(registered=registered)),
            d.RequestMatch(path=d.PathMatch(regex=regex))])),
        metrics_labels={"route": name}, is_retryable=retryable,
        response_classes=[d.ResponseClass(condition=d.ResponseMatch(status=d.HttpStatusRange(min=500, max=599)),
                                          is_failure=True)])
    if timeout is not None:
        r.timeout.CopyFrom(Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)))
    return r


class ScriptedDestination(destination_pb2_grpc.DestinationServicer):
    """``endpoints``: authority -> ports on 127.0.0.1; ``profiles``: authority -> profile."""

    def __init__(self, endpoints: dict[str, list[int]],
                 profiles: dict[str, d.DestinationProfile] | None = None) -> None:
        self.endpoints = endpoints
        self.profiles = dict(profiles or {})
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    def Get(self, request: d.GetDestination, context: grpc.ServicerContext) -> Iterator[d.Update]:
        ports = self.endpoints.get(request.path)
        if ports is None:
            yield d.Update(no_endpoints=d.NoEndpoints(exists=False))
        else:
            yield d.Update(add=d.WeightedAddrSet(addrs=[d.WeightedAddr(addr=tcp(p), weight=1) for p in ports],
                                                 metric_labels={"namespace": "ns"}))
        self._stop.wait()

    def GetProfile(self, request: d.GetDestination,
                   context: grpc.ServicerContext) -> Iterator[d.DestinationProfile]:
        sent: d.DestinationProfile | None = None
        while not self._stop.is_set():
            with self._changed:
                current = self.profiles.get(request.path, d.DestinationProfile())
                if sent is current:
                    self._changed.wait(0.2)
                    continue
                sent = current
            yield current

    def set_profile(self, authority: str, profile: d.DestinationProfile) -> None:
        with self._changed:
            self.profiles[authority] = profile
            self._changed.notify_all()

    def start(self) -> ScriptedDestination:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        destination_pb2_grpc.add_DestinationServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(0)
