"""Discovery from the destination service: linkerd2-proxy-api's ``Destination.Get`` streams.

:class:`DestinationDiscovery` implements the proxy's :class:`~tether.proxy.discovery.Discovery`
over one or more control-plane replicas. Each destination the proxy asks about gets one stream,
kept open while the proxy uses it:

- the first message says whether the destination exists (``no_endpoints{exists: false}``: the
  proxy forwards to the address the request named) and gives its endpoints;
- later messages are diffs (``add``/``remove``), applied to the watched endpoint set;
- when the stream breaks (a replica died, the server reset a slow stream), the next replica is
  dialled after a short back-off, and its first message replaces the whole set: nothing stale
  survives a reconnect. While no replica answers, the last good endpoints stay in force, and
  ``tether_destination_stale`` says so.

Endpoint metadata maps to :class:`~tether.core.discovery.endpoints.Endpoint`: the TLS identity
(``dns_like_identity``), the opaque-transport port (the peer proxy's inbound port, for opaque
streams), the weight, and the metric labels (set-level and per-address, rendered as ``dst_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tether.api.gen import destination_lite, outbound_lite
from tether.api.protolite import DecodeError
from tether.core.discovery.endpoints import Addr, Endpoint, EndpointDiff, EndpointSet, format_addr
from tether.core.http.authority import normalize_authority
from tether.core.routing.http_match import Condition
from tether.core.routing.policy import ClientPolicy
from tether.core.routing.profile import Profile, ProfileRoute, ResponseClass, StatusMatch, WeightedDst
from tether.core.routing.retry_budget import BudgetPolicy
from tether.proxy.discovery import Generation, PolicyWatch, ProfileWatch, Resolution, endpoint_watch
from tether.proxy.grpc_client import ChannelTls, GrpcChannel, GrpcError
from tether.proxy.policy import client_policy_of
from tether.proxy.wire import endpoint_of, method_of, tcp_addr, tcp_address
from tether.runtime.watch import Watched

log = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_MIN = 0.1
_GET = "/io.linkerd.proxy.destination.Destination/Get"
_GET_PROFILE = "/io.linkerd.proxy.destination.Destination/GetProfile"
_WATCH_POLICY = "/io.linkerd.proxy.outbound.OutboundPolicies/Watch"
_BACKOFF_MAX = 5.0
_ADDR = "addr:"  # the key of a policy watched by address, not by name
_NETWORK_VERDICTS = 4096  # IPs remembered as inside or outside the profile networks (then forgotten at once)


@dataclass(frozen=True, slots=True)
class DestinationSettings:
    addrs: tuple[str, ...]  # host:port of each replica
    context_token: str  # who is asking: {"ns": ..., "nodeName": ..., "pod": ...} as JSON
    resolve_timeout: float = 3.0  # how long a first answer may take before the request falls back
    max_streams: int = 10_000  # destinations watched at once (idle ones are closed by the stack cache)
    tls: ChannelTls | None = None  # mutual TLS to the replicas (None: plaintext)
    # The addresses whose profile the proxy asks for when they are an original destination (the
    # cluster's networks, as Linkerd's LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS); None: every address.
    profile_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None


def context_token(namespace: str, pod: str = "", node: str = "") -> str:
    """The context token Linkerd's proxy sends: the caller's namespace (and pod, node)."""
    doc: dict[str, str] = {"ns": namespace}
    if node:
        doc["nodeName"] = node
    if pod:
        doc["pod"] = pod
    return json.dumps(doc, separators=(",", ":"))


def condition_of(m: destination_lite.RequestMatch) -> Condition:
    kind = m.WhichOneof("match")
    if kind == "all":
        return Condition(all=tuple(condition_of(x) for x in m.all.matches))
    if kind == "any":
        return Condition(any=tuple(condition_of(x) for x in m.any.matches))
    if kind == "not":
        return Condition(not_=condition_of(getattr(m, "not")))
    if kind == "path":
        return Condition(path_regex=m.path.regex)
    if kind == "method":
        return Condition(method=method_of(m.method))
    return Condition()


def status_of(m: destination_lite.ResponseMatch) -> StatusMatch:
    kind = m.WhichOneof("match")
    if kind == "all":
        return StatusMatch(all=tuple(status_of(x) for x in m.all.matches))
    if kind == "any":
        return StatusMatch(any=tuple(status_of(x) for x in m.any.matches))
    if kind == "not":
        return StatusMatch(not_=status_of(getattr(m, "not")))
    if kind == "status":
        return StatusMatch(min=m.status.min, max=m.status.max)
    return StatusMatch(min=0, max=599)


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def profile_of(p: destination_lite.DestinationProfile) -> Profile:
    """A DestinationProfile as the proxy applies it."""
    routes = []
    for r in p.routes:
        labels = dict(r.metrics_labels)
        routes.append(ProfileRoute(
            name=labels.get("route", ""),
            condition=condition_of(r.condition),
            response_classes=tuple(ResponseClass(status_of(rc.condition), rc.is_failure)
                                   for rc in r.response_classes),
            retryable=r.is_retryable,
            timeout=_seconds(r.timeout) or None if r.HasField("timeout") else None,
            max_retries=r.tether_max_retries or None,
            retry_timeout=_seconds(r.tether_retry_timeout) or None if r.HasField("tether_retry_timeout") else None,
            labels=tuple(sorted(labels.items())),
        ))
    budget = None
    if p.HasField("retry_budget"):
        b = p.retry_budget
        budget = BudgetPolicy(ratio=b.retry_ratio, min_per_second=float(b.min_retries_per_second),
                              ttl=min(60.0, max(1.0, _seconds(b.ttl) or 10.0)))
    dsts = tuple(WeightedDst(normalize_authority(d.authority, 80), d.weight) for d in p.dst_overrides if d.weight)
    return Profile(tuple(routes), budget, dsts, p.opaque_protocol, p.fully_qualified_name)


class _Latest(Generic[T]):
    """A stream whose every message replaces the value (a profile, a policy)."""

    __slots__ = ("first", "last_used", "rejected_total", "task", "watch")

    def __init__(self, watch: Watched[T, T], first: asyncio.Event) -> None:
        self.watch = watch
        self.first = first
        self.task: asyncio.Task[None] | None = None
        self.rejected_total = 0
        self.last_used = time.monotonic()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class _Watch:
    """One destination's stream and its watched endpoints."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.endpoints = endpoint_watch(EndpointSet())
        self.exists: bool | None = None  # unknown until the first answer
        # A request was forwarded as addressed before any answer came (the resolve timeout): when
        # the first answer says the destination exists, routers must decide again.
        self.forwarded_unanswered = False
        self.first = asyncio.Event()
        self.stale = False
        self.task: asyncio.Task[None] | None = None
        self.last_used = time.monotonic()


class DestinationDiscovery:
    """The proxy's Discovery over the destination service's replicas."""

    def __init__(self, settings: DestinationSettings) -> None:
        if not settings.addrs:
            raise ValueError("the destination service needs at least one address")
        self.settings = settings
        self._channels: dict[str, GrpcChannel] = {}
        self._watches: dict[str, _Watch] = {}
        self._profiles: dict[str, _Latest[Profile]] = {}
        self._policies: dict[str, _Latest[ClientPolicy | None]] = {}
        # By original destination (opaque or not), least recently used first.
        self._dst_profiles: OrderedDict[Addr, _Latest[Profile]] = OrderedDict()
        self._profile_network_ips: dict[str, bool] = {}  # IP -> within profile_networks (bounded)
        self.changes = Generation()
        self._rng = random.Random()
        self.reconnects_total = 0

    # -- Discovery -------------------------------------------------------------------------------------
    async def resolve(self, authority: str) -> Resolution | None:
        try:
            key = normalize_authority(authority, 80)
        except ValueError:
            return None
        w = self._watch(key)
        if w.exists is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.resolve_timeout):
                    await w.first.wait()
        if not w.exists:
            if w.exists is None:
                w.forwarded_unanswered = True
            return None  # unknown (or no answer yet): forward to the address the request named
        return Resolution(key, w.endpoints)

    async def lookup(self, addr: Addr) -> Endpoint | None:
        resolved = await self.resolve(format_addr(addr))
        return resolved.endpoints.state.get(addr) if resolved is not None else None

    async def profile(self, authority: str) -> ProfileWatch | None:
        """The destination's profile, streamed by GetProfile (an empty profile until one arrives)."""
        return await self._latest(self._profiles, authority, Profile(), self._open_profile, profile_of)

    async def policy(self, authority: str) -> PolicyWatch | None:
        """The destination's outbound policy, streamed by OutboundPolicies.Watch (None until one
        arrives, or when the control plane serves none: the destination has no routes)."""
        return await self._latest(self._policies, authority, None, self._open_policy, client_policy_of)

    async def policy_for_addr(self, addr: Addr) -> PolicyWatch | None:
        """The outbound policy of an address that is no known destination (an EgressNetwork's, or a
        forwarding default), streamed by OutboundPolicies.Watch on the address."""
        return await self._latest(self._policies, _ADDR + format_addr(addr), None, self._open_policy,
                                  client_policy_of)

    def _open_profile(self, channel: GrpcChannel, key: str) -> AsyncIterator[Any]:
        req = destination_lite.GetDestination(scheme="k8s", path=key, context_token=self.settings.context_token)
        return _decoded(channel.server_stream(_GET_PROFILE, req.SerializeToString()),
                        destination_lite.DestinationProfile.FromString)

    def _open_policy(self, channel: GrpcChannel, key: str) -> AsyncIterator[Any]:
        if key.startswith(_ADDR):
            host, _, port = key[len(_ADDR):].rpartition(":")
            req = outbound_lite.TrafficSpec(source_workload=self.settings.context_token,
                                           addr=tcp_address((host.strip("[]"), int(port))))
        else:
            req = outbound_lite.TrafficSpec(source_workload=self.settings.context_token, authority=key)
        return _decoded(channel.server_stream(_WATCH_POLICY, req.SerializeToString()),
                        outbound_lite.OutboundPolicy.FromString)

    def opaque_dst(self, addr: Addr) -> bool | Awaitable[bool]:
        """Whether the destination service says connections to ``addr`` (an original destination)
        are opaque: GetProfile on the address, whose ``opaque_protocol`` is its Service's
        ``config.linkerd.io/opaque-ports`` for a cluster IP and its pod's for a pod's address, as
        Linkerd's proxy asks before detecting. Known after the first answer (or the resolve
        timeout: then not opaque until one comes); the streams are kept per address, at most
        ``max_streams``, closed when unused for five minutes. An address outside
        ``profile_networks`` is not asked about (not opaque)."""
        entry = self._dst_profiles.get(addr)
        if entry is not None and entry.first.is_set():
            entry.last_used = time.monotonic()
            self._dst_profiles.move_to_end(addr)  # least recently used first
            return entry.watch.state.opaque
        if entry is None and not self._in_profile_networks(addr):
            return False  # outside the cluster: no profile to ask for, detected as always
        return self._opaque_dst_later(addr)

    def _in_profile_networks(self, addr: Addr) -> bool:
        nets = self.settings.profile_networks
        if nets is None:
            return True
        inside = self._profile_network_ips.get(addr[0])
        if inside is None:
            try:
                ip = ipaddress.ip_address(addr[0])
            except ValueError:
                return False
            inside = any(ip.version == n.version and ip in n for n in nets)
            if len(self._profile_network_ips) >= _NETWORK_VERDICTS:
                self._profile_network_ips.clear()
            self._profile_network_ips[addr[0]] = inside
        return inside

    async def _opaque_dst_later(self, addr: Addr) -> bool:
        entry = self._dst_profiles.get(addr)
        if entry is None:
            if len(self._dst_profiles) >= self.settings.max_streams:
                self._dst_profiles.popitem(last=False)[1].cancel()
            entry = self._dst_profiles[addr] = self._start_latest(format_addr(addr), Profile(), self._open_profile,
                                                                  profile_of)
        await self._first_answer(entry)
        return bool(entry.watch.state.opaque)

    async def _latest(self, table: dict[str, _Latest[Any]], authority: str, empty: Any,
                      open_call: Callable[[GrpcChannel, str], AsyncIterator[Any]],
                      convert: Callable[[Any], Any]) -> Any:
        """A watched value that each message of a stream replaces whole (profiles, policies)."""
        try:
            key = authority if authority.startswith(_ADDR) else normalize_authority(authority, 80)
        except ValueError:
            return None
        entry = table.get(key)
        if entry is None:
            entry = table[key] = self._start_latest(key, empty, open_call, convert)
        await self._first_answer(entry)
        return entry.watch

    def _start_latest(self, key: str, empty: Any, open_call: Callable[[GrpcChannel, str], AsyncIterator[Any]],
                      convert: Callable[[Any], Any]) -> _Latest[Any]:
        watch: Watched[Any, Any] = Watched(empty, lambda _old, new: new)
        entry: _Latest[Any] = _Latest(watch, asyncio.Event())
        entry.task = asyncio.get_running_loop().create_task(self._follow_latest(key, entry, open_call, convert))
        return entry

    async def _first_answer(self, entry: _Latest[Any]) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.resolve_timeout):
                await entry.first.wait()

    async def _follow_latest(self, key: str, entry: _Latest[Any],
                             open_call: Callable[[GrpcChannel, str], AsyncIterator[Any]],
                             convert: Callable[[Any], Any]) -> None:
        addrs = list(self.settings.addrs)
        attempt = self._rng.randrange(len(addrs))
        backoff = _BACKOFF_MIN
        watch = entry.watch
        while True:
            addr = addrs[attempt % len(addrs)]
            attempt += 1
            try:
                async for msg in open_call(self._channel(addr), key):
                    backoff = _BACKOFF_MIN
                    try:
                        value = convert(msg)
                    except (ValueError, re.error) as e:
                        # A message the proxy cannot apply: keep the last good value, say why.
                        entry.rejected_total += 1
                        log.warning("destination %s: update not applied: %s", key, e)
                        continue
                    if value != watch.state:
                        watch.change(value)
                    entry.first.set()
            except asyncio.CancelledError:
                raise
            except GrpcError as e:
                log.info("destination %s: replica %s: %s %s", key, addr, e.name, e.details)
            except DecodeError as e:
                log.warning("destination %s: replica %s sent an undecodable message: %s", key, addr, e)
            entry.first.set()  # no answer: the last value (or none) stays in force
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def generation(self) -> int:
        return self.changes.value

    async def run(self) -> None:
        """Close streams nobody resolved for a while (the stacks that used them were dropped)."""
        while True:
            await asyncio.sleep(30)
            horizon = time.monotonic() - 300
            for key, w in list(self._watches.items()):
                if w.last_used < horizon and w.endpoints.subscribers == 0:
                    self._drop(key)
            while self._dst_profiles:
                addr, entry = next(iter(self._dst_profiles.items()))
                if entry.last_used >= horizon:
                    break
                del self._dst_profiles[addr]
                entry.cancel()

    async def aclose(self) -> None:
        for key in list(self._watches):
            self._drop(key)
        for table in (self._profiles, self._policies, self._dst_profiles):
            for entry in table.values():
                entry.cancel()
            table.clear()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    # -- metrics ---------------------------------------------------------------------------------------
    def metrics_lines(self) -> list[str]:
        stale = sum(1 for w in self._watches.values() if w.stale)
        return [
            "# HELP tether_destination_streams Destinations the proxy watches on the destination service.",
            "# TYPE tether_destination_streams gauge",
            f"tether_destination_streams {len(self._watches)}",
            "# HELP tether_destination_stale Destinations served from their last good answer while no "
            "replica of the destination service answers.",
            "# TYPE tether_destination_stale gauge",
            f"tether_destination_stale {stale}",
            "# HELP tether_destination_address_profiles Original destinations whose profile the proxy follows "
            "(GetProfile on the address: whether connections to it are opaque).",
            "# TYPE tether_destination_address_profiles gauge",
            f"tether_destination_address_profiles {len(self._dst_profiles)}",
            "# HELP tether_destination_reconnects_total Destination streams re-established.",
            "# TYPE tether_destination_reconnects_total counter",
            f"tether_destination_reconnects_total {self.reconnects_total}",
        ]

    # -- streams ---------------------------------------------------------------------------------------
    def _watch(self, key: str) -> _Watch:
        w = self._watches.get(key)
        if w is None:
            if len(self._watches) >= self.settings.max_streams:
                oldest = min(self._watches.values(), key=lambda x: x.last_used)
                self._drop(oldest.authority)
            w = self._watches[key] = _Watch(key)
            w.task = asyncio.get_running_loop().create_task(self._follow(w))
        w.last_used = time.monotonic()
        return w

    def _drop(self, key: str) -> None:
        w = self._watches.pop(key, None)
        if w is not None and w.task is not None:
            w.task.cancel()

    def _channel(self, addr: str) -> GrpcChannel:
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = GrpcChannel(addr, connect_timeout=self.settings.resolve_timeout,
                                                    tls=self.settings.tls)
        return ch

    async def _follow(self, w: _Watch) -> None:
        addrs = list(self.settings.addrs)
        start = self._rng.randrange(len(addrs))
        backoff = _BACKOFF_MIN
        attempt = 0
        while True:
            addr = addrs[(start + attempt) % len(addrs)]
            attempt += 1
            try:
                got_any = await self._stream(w, addr)
            except asyncio.CancelledError:
                raise
            except GrpcError as e:
                got_any = False
                log.info("destination %s: replica %s: %s %s", w.authority, addr, e.name, e.details)
            except Exception:
                got_any = False
                log.exception("destination %s: replica %s failed", w.authority, addr)
            if w.exists is not None:
                w.stale = True  # keep the last good answer until a replica answers again
            if got_any:
                backoff = _BACKOFF_MIN
                self.reconnects_total += 1
            else:
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _stream(self, w: _Watch, addr: str) -> bool:
        """Follow one replica's stream until it ends; True when it sent anything."""
        request = destination_lite.GetDestination(scheme="k8s", path=w.authority,
                                                  context_token=self.settings.context_token)
        first = True
        got_any = False
        snapshot: dict[Addr, Endpoint] = {}
        async for raw in self._channel(addr).server_stream(_GET, request.SerializeToString()):
            got_any = True
            update = destination_lite.Update.FromString(raw)
            kind = update.WhichOneof("update")
            if first:
                # The first message after (re)connecting is the whole set: replace, never merge.
                first = False
                if kind == "no_endpoints":
                    self._answer(w, update.no_endpoints.exists, EndpointSet())
                    continue
                if kind == "add":
                    labels = dict(update.add.metric_labels)
                    snapshot = {ep.addr: ep for ep in (endpoint_of(a, labels) for a in update.add.addrs)}
                self._answer(w, True, EndpointSet(snapshot.values()))
                continue
            if kind == "add":
                labels = dict(update.add.metric_labels)
                w.endpoints.change(EndpointDiff(add=tuple(endpoint_of(a, labels) for a in update.add.addrs)))
                if not w.exists:
                    w.exists = True
                    self.changes.value += 1  # appeared: routers decide again (it was forwarded as addressed)
            elif kind == "remove":
                w.endpoints.change(EndpointDiff(remove=tuple(tcp_addr(a) for a in update.remove.addrs)))
            elif kind == "no_endpoints":
                if update.no_endpoints.exists != bool(w.exists):
                    self.changes.value += 1  # appeared or gone: routers decide again
                w.exists = update.no_endpoints.exists
                if w.endpoints.state:
                    w.endpoints.replace(EndpointSet())
        return got_any

    def _answer(self, w: _Watch, exists: bool, endpoints: EndpointSet) -> None:
        if w.exists != exists and (w.exists is not None or w.forwarded_unanswered):
            self.changes.value += 1  # appeared or disappeared (or came after a fallback): routers decide again
        w.exists = exists
        w.stale = False
        if endpoints != w.endpoints.state:
            w.endpoints.replace(endpoints)
        w.first.set()


async def _decoded(stream: AsyncIterator[bytes], parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    """A stream's messages, decoded (DecodeError ends the stream: the caller reconnects)."""
    async for raw in stream:
        yield parse(raw)
