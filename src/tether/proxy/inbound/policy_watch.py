"""Where an inbound port's policy comes from: the control plane's ``InboundServerPolicies.WatchPort``,
or, without a control plane, one default policy for every port.

:class:`PolicyWatch` keeps one stream per inbound port the proxy has seen a connection for (as
linkerd2-proxy discovers ports lazily), over the destination service's replicas:

- the first message is the port's policy; each later one replaces it, and the next request on
  every connection reads the new one (no reconnect needed);
- a message the proxy cannot apply is logged and counted, and the last good policy stays; with no
  good policy yet the port denies;
- when the stream breaks the next replica is dialled after a back-off; meanwhile the last good
  policy stays in force and ``tether_inbound_policy_stale`` says so;
- a port whose first answer does not come within ``wait_timeout`` denies that connection
  (fail closed) and the watch goes on.

The workload the proxy asks for is a JSON ``{"ns": ..., "pod": ...}`` string, the form recent
Linkerd proxies send in ``PortSpec.workload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from tether.api.protolite import DecodeError
from tether.core.policy.authz import PolicyError
from tether.proxy.grpc_client import ChannelTls, GrpcChannel, GrpcError
from tether.proxy.inbound.policy import PortPolicy
from tether.proxy.inbound.policy_wire import port_policy

log = logging.getLogger(__name__)

_WATCH_PORT = "/io.linkerd.proxy.inbound.InboundServerPolicies/WatchPort"

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0


@dataclass(frozen=True, slots=True)
class PolicyWatchSettings:
    addrs: tuple[str, ...]  # host:port of each policy (destination) replica
    workload: str  # PortSpec.workload: {"ns": ..., "pod": ...}
    wait_timeout: float = 3.0  # how long a connection waits for a port's first policy
    permit_localhost: bool = True
    tls: ChannelTls | None = None  # mutual TLS to the replicas (None: plaintext)


class _Port:
    __slots__ = ("first", "invalid", "policy", "port", "stale", "task")

    def __init__(self, port: int) -> None:
        self.port = port
        self.policy: PortPolicy | None = None
        self.first = asyncio.Event()
        self.stale = False
        self.invalid = 0
        self.task: asyncio.Task[None] | None = None


class PolicyWatch:
    """Inbound policies streamed by the control plane, one stream per port."""

    def __init__(self, settings: PolicyWatchSettings) -> None:
        if not settings.addrs:
            raise ValueError("the policy service needs at least one address")
        self.settings = settings
        self._channels: dict[str, GrpcChannel] = {}
        self._ports: dict[int, _Port] = {}
        self._rng = random.Random()
        self._callbacks: list[Callable[[int, PortPolicy], None]] = []
        self.updates_total = 0

    def on_change(self, callback: Callable[[int, PortPolicy], None]) -> None:
        self._callbacks.append(callback)

    def current(self, port: int) -> PortPolicy | None:
        p = self._watch(port)
        return p.policy

    async def get(self, port: int) -> PortPolicy | None:
        p = self._watch(port)
        if p.policy is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.wait_timeout):
                    await p.first.wait()
        return p.policy

    async def run(self) -> None:
        return None

    async def aclose(self) -> None:
        for p in self._ports.values():
            if p.task is not None:
                p.task.cancel()
        self._ports.clear()
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def metrics_lines(self) -> list[str]:
        from tether.proxy.metrics import escape_label

        out = ["# HELP tether_inbound_policy The policy in force on each inbound port (1), by server.",
               "# TYPE tether_inbound_policy gauge"]
        for port, p in sorted(self._ports.items()):
            if p.policy is None:
                out.append(f'tether_inbound_policy{{srv_port="{port}",srv_group="",srv_kind="",srv_name=""}} 0')
                continue
            s = p.policy.server
            out.append(f'tether_inbound_policy{{srv_port="{port}",srv_group="{escape_label(s.group)}",'
                       f'srv_kind="{escape_label(s.kind)}",srv_name="{escape_label(s.name)}"}} 1')
        stale = sum(1 for p in self._ports.values() if p.stale)
        invalid = sum(p.invalid for p in self._ports.values())
        out += [
            "# HELP tether_inbound_policy_stale Inbound ports served from their last good policy while no "
            "replica of the policy service answers.",
            "# TYPE tether_inbound_policy_stale gauge",
            f"tether_inbound_policy_stale {stale}",
            "# HELP tether_inbound_policy_invalid_total Policies received that the proxy could not apply "
            "(the last good one stayed in force).",
            "# TYPE tether_inbound_policy_invalid_total counter",
            f"tether_inbound_policy_invalid_total {invalid}",
            "# HELP tether_inbound_policy_updates_total Inbound policies received and applied.",
            "# TYPE tether_inbound_policy_updates_total counter",
            f"tether_inbound_policy_updates_total {self.updates_total}",
        ]
        return out

    # -- streams ---------------------------------------------------------------------------------------
    def _watch(self, port: int) -> _Port:
        p = self._ports.get(port)
        if p is None:
            p = self._ports[port] = _Port(port)
            p.task = asyncio.get_running_loop().create_task(self._follow(p))
        return p

    def _channel(self, addr: str) -> GrpcChannel:
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = GrpcChannel(addr, tls=self.settings.tls)
        return ch

    async def _follow(self, p: _Port) -> None:
        addrs = list(self.settings.addrs)
        start = self._rng.randrange(len(addrs))
        backoff = _BACKOFF_MIN
        attempt = 0
        while True:
            addr = addrs[(start + attempt) % len(addrs)]
            attempt += 1
            got_any = False
            try:
                got_any = await self._stream(p, addr)
            except asyncio.CancelledError:
                raise
            except GrpcError as e:
                log.info("inbound policy for port %d: replica %s: %s %s", p.port, addr, e.name, e.details)
            except DecodeError as e:
                log.warning("inbound policy for port %d: replica %s sent an undecodable message: %s", p.port, addr, e)
            except Exception:
                log.exception("inbound policy for port %d: replica %s failed", p.port, addr)
            if p.policy is not None:
                p.stale = True  # the last good policy stays until a replica answers again
            if got_any:
                backoff = _BACKOFF_MIN
            else:
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _stream(self, p: _Port, addr: str) -> bool:
        from tether.api.gen import inbound_lite

        request = inbound_lite.PortSpec(workload=self.settings.workload, port=p.port).SerializeToString()
        got_any = False
        async for raw in self._channel(addr).server_stream(_WATCH_PORT, request):
            got_any = True
            msg = inbound_lite.Server.FromString(raw)
            try:
                policy = port_policy(msg, self.settings.permit_localhost)
            except PolicyError as e:
                p.invalid += 1
                log.warning("inbound policy for port %d not applied (the last good one stays): %s", p.port, e)
                p.stale = False
                p.first.set()  # an answer came: waiting longer would not help
                continue
            if policy != p.policy:
                s = policy.server
                log.info("inbound port %d: policy %s/%s/%s", p.port, s.group, s.kind, s.name)
                for route in policy.routes:
                    for rule in route.rules:
                        if rule.value.filters.invalid is not None:
                            # Said at once, not only at request time (each such request answers 500).
                            log.warning("inbound port %d: route %s: %s", p.port, rule.value.meta.name,
                                        rule.value.filters.invalid)
            changed = p.policy is not None and policy != p.policy
            if p.policy is None or changed:
                p.policy = policy  # an identical resend keeps the object (and its rate limiters' state)
            p.stale = False
            self.updates_total += 1
            p.first.set()
            if changed:
                for cb in self._callbacks:
                    try:
                        cb(p.port, policy)
                    except Exception:
                        log.exception("inbound port %d: applying the new policy failed", p.port)
        return got_any
