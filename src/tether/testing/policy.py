"""A scripted inbound policy server (``InboundServerPolicies`` over grpcio) for benchmarks and tests.

Every ``WatchPort`` gets the ``inbound.Server`` message set for its port (``default`` for any
other), computed by the destination controller's own translation from YAML resources so the
proxy sees exactly what the controller would send, without a store or a controller process.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from tether.api.gen import inbound_pb2 as inb
from tether.api.gen import inbound_pb2_grpc


def server_from_yaml(text: str, namespace: str, workload: str, port: int, **settings: object) -> inb.Server:
    """The inbound.Server the controller serves for ``workload``'s ``port`` given the YAML resources."""
    from tether.control.destination import translate as tr
    from tether.control.destination.world import World
    from tether.core.resources import load_text

    result = load_text(text, "policy.yaml")
    if not result.ok:
        raise ValueError("; ".join(str(e) for e in result.errors))
    world = World()
    for item in result.loaded:
        r = item.resource
        world = world.replace(r.KIND, {**world.of(r.KIND), r.key: r})
    ref = json.dumps({"ns": namespace, "pod": workload})
    return tr.inbound_server(world, ref, port, tr.Settings(**settings))  # type: ignore[arg-type]


class ScriptedInboundPolicy(inbound_pb2_grpc.InboundServerPoliciesServicer):
    def __init__(self, servers: dict[int, inb.Server], default: inb.Server | None = None) -> None:
        self.servers = servers
        self.default = default
        self._stop = threading.Event()
        self._server: grpc.Server | None = None
        self.port = 0

    def _answer(self, request: inb.PortSpec, context: grpc.ServicerContext) -> inb.Server:
        msg = self.servers.get(request.port, self.default)
        if msg is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no policy for port {request.port}")
        assert msg is not None
        return msg

    def GetPort(self, request: inb.PortSpec, context: grpc.ServicerContext) -> inb.Server:
        return self._answer(request, context)

    def WatchPort(self, request: inb.PortSpec, context: grpc.ServicerContext) -> Iterator[inb.Server]:
        yield self._answer(request, context)
        self._stop.wait()

    def start(self) -> ScriptedInboundPolicy:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        inbound_pb2_grpc.add_InboundServerPoliciesServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(0)


# A Server on the port, an HTTPRoute on /echo authorized from 127.0.0.0/8 by an AuthorizationPolicy,
# and a total rate limit far above any load a benchmark offers (checked on every request, never hit).
BENCH_POLICY = """\
apiVersion: workload.tether.io/v1alpha1
kind: Workload
metadata: {{name: bench, namespace: default, labels: {{app: bench}}}}
spec: {{serviceAccount: bench, ports: [{{name: http, port: {port}}}]}}
---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {{name: bench, namespace: default}}
spec: {{podSelector: {{matchLabels: {{app: bench}}}}, port: http, proxyProtocol: HTTP/1}}
---
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {{name: echo, namespace: default}}
spec:
  parentRefs: [{{name: bench, kind: Server, group: policy.linkerd.io}}]
  rules: [{{matches: [{{path: {{type: PathPrefix, value: /echo}}, method: GET}}]}}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {{name: loopback, namespace: default}}
spec: {{networks: [{{cidr: 127.0.0.0/8}}]}}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: echo-from-loopback, namespace: default}}
spec:
  targetRef: {{group: policy.linkerd.io, kind: HTTPRoute, name: echo}}
  requiredAuthenticationRefs: [{{group: policy.linkerd.io, kind: NetworkAuthentication, name: loopback}}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: bench, namespace: default}}
spec:
  targetRef: {{group: policy.linkerd.io, kind: Server, name: bench}}
  total: {{requestsPerSecond: {rps}}}
"""


def bench_policy_server(app_port: int, rps: int = 10_000_000) -> ScriptedInboundPolicy:
    """A started policy server giving ``app_port`` the benchmark's Server, route authorization and rate limit."""
    msg = server_from_yaml(BENCH_POLICY.format(port=app_port, rps=rps), "default", "bench", app_port)
    return ScriptedInboundPolicy({app_port: msg}).start()


BENCH_WORKLOAD = json.dumps({"ns": "default", "pod": "bench"})
