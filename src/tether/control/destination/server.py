"""`tether controller destination`: Destination, OutboundPolicies and InboundServerPolicies over gRPC.

The gRPC layer is thin: the controller follows every kind of the store into one watched
:class:`World` (a :class:`tether.runtime.watch.Watched`); each stream subscribes to it, computes its
answer with the pure functions of :mod:`translate` on the snapshot and again after each batch of
changes that concern it, and sends what differs (endpoint adds/removes for Get; the whole message,
when it changed, for profiles and policies). A subscriber's queue is bounded (``queue_limit``): one
that falls behind is reset, and the stream ends with UNAVAILABLE so the proxy reconnects for a fresh
snapshot. Any number of replicas can run over the same store; they share nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tether.api.gen import (
    destination_pb2,
    destination_pb2_grpc,
    inbound_pb2,
    inbound_pb2_grpc,
    outbound_pb2,
    outbound_pb2_grpc,
)
from tether.control.admin import serve_admin
from tether.control.destination import translate as tr
from tether.control.destination.translate import format_tcp_address
from tether.control.destination.world import Context, LookupError_, World, split_authority
from tether.control.store import Store
from tether.control.tlsfront import TlsFront, start_serving
from tether.core.resources import KINDS
from tether.core.resources.events import KindState, ResourceEvent, apply_event
from tether.runtime.watch import Change, Snapshot, Subscription, Watched

if TYPE_CHECKING:
    from tether.control.owncert import OwnCertificate

log = logging.getLogger("tether.destination")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# What each RPC's answer depends on: a change to another kind cannot change it.
ENDPOINT_KINDS = frozenset({"Service", "Workload", "ExternalWorkload", "Namespace"})
PROFILE_KINDS = ENDPOINT_KINDS | {"ServiceProfile", "TrafficSplit"}
# Outbound answers read Services and their routes, workloads (forwarding to a pod address) and
# EgressNetworks (traffic to addresses outside the mesh).
OUTBOUND_KINDS = frozenset({"Service", "Namespace", "HTTPRoute", "GRPCRoute", "TCPRoute", "EgressNetwork", "Workload",
                            "ExternalWorkload"})
INBOUND_KINDS = frozenset(
    {
        "Workload",
        "Namespace",
        "Server",
        "ServerAuthorization",
        "AuthorizationPolicy",
        "MeshTLSAuthentication",
        "NetworkAuthentication",
        "HTTPLocalRateLimitPolicy",
        "HTTPRoute",
    }
)

WorldChange = tuple[str, "ResourceEvent | KindState"]
T = TypeVar("T")


def _apply(world: World, change: WorldChange) -> World:
    kind, what = change
    if isinstance(what, ResourceEvent):
        return world.replace(kind, apply_event(world.of(kind), what))
    return world.replace(kind, what)


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    addr: tuple[str, int] = ("0.0.0.0", 8086)
    admin_addr: tuple[str, int] = ("127.0.0.1", 9996)
    settings: tr.Settings = field(default_factory=tr.Settings)
    queue_limit: int = 1000
    max_concurrent_rpcs: int | None = None
    # With an own certificate (tether.control.owncert), ``addr`` serves mutual TLS only; this address,
    # if set, serves plaintext too: for operators and the local supervisor on the same host (Linkerd's
    # `kubectl port-forward` to the destination container reaches it in plaintext the same way).
    plaintext_addr: tuple[str, int] | None = None
    # With an own certificate: ``addr`` also serves plaintext gRPC (tether.control.tlsfront tells it
    # from TLS), for the proxies of a release before control-plane TLS while an upgrade replaces them.
    accept_plaintext: bool = False


@dataclass
class Counters:
    streams: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    resets: int = 0
    lookups_failed: int = 0


class Reset(Exception):
    """The subscriber fell behind; the stream must end so the client reconnects."""


class DestinationController:
    """The world, the three gRPC services over it, and an admin server (/metrics, /ready, /live)."""

    def __init__(self, store: Store, cfg: DestinationConfig | None = None,
                 own_cert: OwnCertificate | None = None) -> None:
        self.store = store
        self.cfg = cfg or DestinationConfig()
        self.own_cert = own_cert
        self.settings = self.cfg.settings
        self.world: Watched[World, WorldChange] = Watched(World(), _apply, queue_limit=self.cfg.queue_limit)
        self.counters = Counters()
        self.synced = asyncio.Event()
        # Answers computed for the current world, shared by every stream asking the same question
        # (a thousand proxies watching one service cost one computation per change, not a thousand).
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._memo_world: World | None = None
        self.grpc_port = 0
        self.plaintext_port = 0
        self.admin_port = 0
        self.front: TlsFront | None = None  # with an own certificate, once certified

    # --- following the store ---------------------------------------------------------------------

    async def _follow(self, kind: str, sub: Subscription[KindState, ResourceEvent]) -> None:
        async for u in sub:
            if isinstance(u, Snapshot):
                self.world.change((kind, u.state))
            else:
                assert isinstance(u, Change)
                self.world.change((kind, u.change))

    # --- streams ---------------------------------------------------------------------------------

    async def _updates(
        self, rpc: str, kinds: frozenset[str], compute: Callable[[World], Iterable[T]]
    ) -> AsyncGenerator[T, None]:
        """Messages of one stream: compute on the snapshot, then after each relevant batch of changes."""
        sub = self.world.subscribe()
        self.counters.streams[rpc] = self.counters.streams.get(rpc, 0) + 1
        try:
            while True:
                u: Snapshot[World] | Change[WorldChange] | None = await sub.next()
                relevant = False
                while u is not None:
                    if isinstance(u, Snapshot):
                        if u.reset:
                            self.counters.resets += 1
                            raise Reset
                        relevant = True
                    elif u.change[0] in kinds:
                        relevant = True
                    u = sub.poll()
                if relevant:
                    for msg in compute(self.world.state):
                        self.counters.messages[rpc] = self.counters.messages.get(rpc, 0) + 1
                        yield msg
        finally:
            sub.close()
            self.counters.streams[rpc] -= 1

    async def _run_stream(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        kinds: frozenset[str],
        compute: Callable[[World], Iterable[T]],
    ) -> AsyncIterator[T]:
        try:
            async for msg in self._updates(rpc, kinds, compute):
                yield msg
        except Reset:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "stream fell behind the control plane's updates; reconnect for a fresh snapshot",
            )
        except LookupError_ as e:
            self.counters.lookups_failed += 1
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    def memo(self, world: World, key: tuple[Any, ...], fn: Callable[[], T]) -> T:
        """``fn()``, computed once per world for ``key``."""
        if world is not self._memo_world:
            self._memo.clear()
            self._memo_world = world
        if key in self._memo:
            return self._memo[key]
        value = self._memo[key] = fn()
        return value

    def endpoint_stream(self, path: str, ctx: Context) -> Callable[[World], list[destination_pb2.Update]]:
        last: list[tr.EndpointSet | None] = [None]

        def current(world: World) -> tr.EndpointSet:
            try:
                target = tr.resolve(world, path, ctx, self.settings.cluster_domain)
                return tr.endpoints(world, target, self.settings)
            except LookupError_:
                return tr.EndpointSet({}, {}, exists=False)

        def compute(world: World) -> list[destination_pb2.Update]:
            now = self.memo(world, ("Get", path, ctx), lambda: current(world))
            before = last[0]
            if before is now:
                return []
            updates = self.memo(world, ("diff", id(before), id(now)), lambda: tr.endpoint_updates(before, now))
            last[0] = now
            return updates

        return compute

    def whole_stream(self, key: tuple[Any, ...], build: Callable[[World], T]) -> Callable[[World], list[T]]:
        last: list[T | None] = [None]

        def compute(world: World) -> list[T]:
            msg = self.memo(world, key, lambda: build(world))
            before = last[0]
            if msg is before or self.memo(world, ("same", id(before), id(msg)), lambda: msg == before):
                return []
            last[0] = msg
            return [msg]

        return compute

    # --- admin -----------------------------------------------------------------------------------

    def metrics_text(self) -> str:
        c = self.counters
        lines = [
            "# HELP destination_streams Open watch streams by RPC.",
            "# TYPE destination_streams gauge",
        ]
        lines += [f'destination_streams{{rpc="{k}"}} {v}' for k, v in sorted(c.streams.items())]
        lines += [
            "# HELP destination_messages_total Messages sent on watch streams.",
            "# TYPE destination_messages_total counter",
        ]
        lines += [f'destination_messages_total{{rpc="{k}"}} {v}' for k, v in sorted(c.messages.items())]
        lines += [
            "# HELP destination_stream_resets_total Streams ended because their subscriber fell behind.",
            "# TYPE destination_stream_resets_total counter",
            f"destination_stream_resets_total {c.resets}",
            "# HELP destination_lookups_failed_total Streams refused: the target names nothing known.",
            "# TYPE destination_lookups_failed_total counter",
            f"destination_lookups_failed_total {c.lookups_failed}",
        ]
        if self.front is not None:
            lines += self.front.metrics_lines("destination")
        store_metrics = getattr(self.store, "metrics_text", None)
        text = "\n".join(lines) + "\n"
        if callable(store_metrics):
            text += str(store_metrics())
        return text

    def errors_json(self) -> str:
        return (
            json.dumps(
                {"sourceErrors": [{"source": e.source, "errors": list(e.errors)} for e in self.store.source_errors()]},
                indent=2,
            )
            + "\n"
        )

    def ready(self) -> bool:
        return self.synced.is_set() and (self.own_cert is None or self.own_cert.certified.is_set())

    async def _admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_admin(reader, writer, metrics=self.metrics_text, ready=self.ready,
                          views={"/store-errors.json": lambda: (self.errors_json(), "application/json")})

    # --- running ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None, started: Callable[[], None] | None = None) -> None:
        stop = stop or asyncio.Event()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 3_000),
            ],
            maximum_concurrent_rpcs=self.cfg.max_concurrent_rpcs,
        )
        destination_pb2_grpc.add_DestinationServicer_to_server(_Destination(self), server)
        outbound_pb2_grpc.add_OutboundPoliciesServicer_to_server(_Outbound(self), server)
        inbound_pb2_grpc.add_InboundServerPoliciesServicer_to_server(_Inbound(self), server)
        host, port = self.cfg.addr
        admin = await asyncio.start_server(self._admin, *self.cfg.admin_addr, limit=16 * 1024)
        self.admin_port = admin.sockets[0].getsockname()[1]
        subs = {kind: self.store.watch(kind) for kind in KINDS}
        async with asyncio.TaskGroup() as tg:
            for kind, sub in subs.items():
                tg.create_task(self._follow(kind, sub))
            run_store = getattr(self.store, "run", None)
            if callable(run_store):
                tg.create_task(run_store(stop))
            await asyncio.sleep(0)  # let every follower take its snapshot before serving
            self.synced.set()
            front: TlsFront | None = None
            if self.own_cert is not None:
                # Mutual TLS only: nothing is served on addr before this service has its certificate.
                # The gRPC server listens in plaintext on loopback (plaintext_addr, or a port of its
                # own) and the TLS front relays to it (see tether.control.tlsfront).
                renew = tg.create_task(self.own_cert.run())
                certified = tg.create_task(self.own_cert.certified.wait())
                stopped = tg.create_task(stop.wait())
                await asyncio.wait({certified, stopped}, return_when=asyncio.FIRST_COMPLETED)
                certified.cancel()
                stopped.cancel()
                if stop.is_set():
                    renew.cancel()
                    admin.close()
                    for sub in subs.values():
                        sub.close()
                    return
                backend = self.cfg.plaintext_addr or ("127.0.0.1", 0)
                self.plaintext_port = server.add_insecure_port(_bind(*backend))
                front = TlsFront(self.own_cert.ssl_context, (backend[0], self.plaintext_port), "destination",
                                 accept_plaintext=self.cfg.accept_plaintext)
                self.front = front
            else:
                self.grpc_port = server.add_insecure_port(_bind(host, port))
            def undo() -> None:
                admin.close()
                for sub in subs.values():
                    sub.close()
                if self.own_cert is not None:
                    renew.cancel()

            front_port = await start_serving(server, front, host, port, undo)
            if front_port is not None:
                self.grpc_port = front_port
            log.info(
                "destination service on %s:%d%s (admin %s:%d)%s",
                host,
                self.grpc_port,
                (f" (mutual TLS as {self.own_cert.cfg.identity.dns_name}"
                 f"{', plaintext too' if self.cfg.accept_plaintext else ''})" if self.own_cert is not None else ""),
                self.cfg.admin_addr[0],
                self.admin_port,
                f", plaintext on {self.cfg.plaintext_addr[0]}:{self.plaintext_port}" if self.cfg.plaintext_addr else "",
            )
            if started is not None:
                started()
            await stop.wait()
            if front is not None:
                await front.close()
            await server.stop(grace=1.0)
            admin.close()
            for sub in subs.values():
                sub.close()
            if self.own_cert is not None:
                renew.cancel()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ctx(token: str) -> Context:
    return Context.parse(token)


class _Destination(destination_pb2_grpc.DestinationServicer):
    def __init__(self, c: DestinationController) -> None:
        self.c = c

    async def Get(
        self, request: destination_pb2.GetDestination, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[destination_pb2.Update]:
        try:
            split_authority(request.path)
        except LookupError_ as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        compute = self.c.endpoint_stream(request.path, _ctx(request.context_token))
        async for msg in self.c._run_stream(context, "Get", ENDPOINT_KINDS, compute):
            yield msg

    async def GetProfile(
        self, request: destination_pb2.GetDestination, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[destination_pb2.DestinationProfile]:
        try:
            split_authority(request.path)
        except LookupError_ as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ctx = _ctx(request.context_token)
        s = self.c.settings
        compute = self.c.whole_stream(("GetProfile", request.path, ctx), lambda w: tr.profile(w, request.path, ctx, s))
        async for msg in self.c._run_stream(context, "GetProfile", PROFILE_KINDS, compute):
            yield msg


def _traffic_target(spec: outbound_pb2.TrafficSpec) -> tuple[str | None, str | None]:
    which = spec.WhichOneof("target")
    if which == "authority":
        return spec.authority, None
    if which == "addr":
        return None, format_tcp_address(spec.addr)
    raise LookupError_("TrafficSpec has no target (authority or addr)")


class _Outbound(outbound_pb2_grpc.OutboundPoliciesServicer):
    def __init__(self, c: DestinationController) -> None:
        self.c = c

    def _build(self, spec: outbound_pb2.TrafficSpec) -> Callable[[World], outbound_pb2.OutboundPolicy]:
        authority, addr = _traffic_target(spec)
        ctx = Context(namespace=_source_ns(spec.source_workload))
        return lambda w: tr.outbound_policy(w, authority, addr, ctx, self.c.settings)

    async def Get(
        self, request: outbound_pb2.TrafficSpec, context: grpc.aio.ServicerContext
    ) -> outbound_pb2.OutboundPolicy:
        try:
            return self._build(request)(self.c.world.state)
        except LookupError_ as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise

    async def Watch(
        self, request: outbound_pb2.TrafficSpec, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[outbound_pb2.OutboundPolicy]:
        try:
            build = self._build(request)
        except LookupError_ as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        key = ("Outbound", request.SerializeToString(deterministic=True))
        compute = self.c.whole_stream(key, build)
        async for msg in self.c._run_stream(context, "OutboundPolicies.Watch", OUTBOUND_KINDS, compute):
            yield msg


def _source_ns(workload: str) -> str | None:
    """The client's namespace from TrafficSpec.source_workload: the proxy's context token (JSON
    {"ns": ..., "pod": ...}, the pod optional) or "ns:name"."""
    return Context.parse(workload).namespace if workload else None


class _Inbound(inbound_pb2_grpc.InboundServerPoliciesServicer):
    def __init__(self, c: DestinationController) -> None:
        self.c = c

    async def GetPort(self, request: inbound_pb2.PortSpec, context: grpc.aio.ServicerContext) -> inbound_pb2.Server:
        try:
            return tr.inbound_server(self.c.world.state, request.workload, request.port, self.c.settings)
        except LookupError_ as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            raise

    async def WatchPort(
        self, request: inbound_pb2.PortSpec, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inbound_pb2.Server]:
        if not 0 < request.port < 65536:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"port {request.port} is out of range")
        s = self.c.settings
        compute = self.c.whole_stream(
            ("WatchPort", request.workload, request.port),
            lambda w: tr.inbound_server(w, request.workload, request.port, s),
        )
        async for msg in self.c._run_stream(context, "InboundServerPolicies.WatchPort", INBOUND_KINDS, compute):
            yield msg


def describe(obj: Any) -> str:
    """A message as JSON (for logs and diagnostics)."""
    from google.protobuf import json_format

    return json_format.MessageToJson(obj, preserving_proto_field_name=True)
