"""Static discovery: destinations and their endpoints from a YAML file, reloaded when it changes.

The file (``ProxyConfig.destinations_file``, ``TETHER_PROXY_DESTINATIONS_FILE``)::

    destinations:
      "web.default.svc.cluster.local:80":
        - "10.0.0.1:8080"                      # an address alone: weight 1, not meshed
        - addr: "10.0.0.2:8080"
          weight: 2                            # optional, >= 1
          identity: "web.default.serviceaccount.identity.linkerd.cluster.local"  # optional
          proxy_port: 4143                     # optional: the peer proxy's inbound port
          protocol_hint: h2                    # optional: h2 (with identity: HTTP/1 to it over HTTP/2) | opaque
          labels: {pod: web-1}                 # optional: string to string, for metrics

:class:`Discovery` is what the proxy needs of any source of endpoints; :class:`StaticDiscovery`
is the file's. ``resolve(authority)`` gives a known authority's watched endpoints (None for an
unknown one: the caller forwards to the address it names); a subscription yields a snapshot then
diffs, which :func:`feed` applies to a Balancer. The file is polled (``check()``, or ``run()`` every second);
an invalid new version is logged and ignored, keeping the last good one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from tether.core.discovery.endpoints import (
    PROTOCOL_HINTS,
    Addr,
    Endpoint,
    EndpointDiff,
    EndpointError,
    EndpointSet,
    format_addr,
)
from tether.core.http.authority import normalize_authority
from tether.core.routing.policy import ClientPolicy
from tether.core.routing.profile import Profile
from tether.runtime.watch import Snapshot, Subscription, Watched

log = logging.getLogger(__name__)

ENDPOINT_KEYS = frozenset({"addr", "weight", "identity", "proxy_port", "protocol_hint", "labels"})


class DiscoveryError(ValueError):
    """The destinations file is unreadable or invalid; the message names the file and the key."""


def _endpoint(item: object, where: str) -> Endpoint:
    if isinstance(item, str):
        return Endpoint.of(item)
    if not isinstance(item, dict):
        raise DiscoveryError(f'{where}: must be "ip:port" or a mapping with addr, not {type(item).__name__}')
    unknown = sorted(str(k) for k in item if k not in ENDPOINT_KEYS)
    if unknown:
        raise DiscoveryError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(ENDPOINT_KEYS)}")
    addr = item.get("addr")
    if not isinstance(addr, str):
        raise DiscoveryError(f'{where}.addr: required, a string "ip:port"')
    weight = item.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise DiscoveryError(f"{where}.weight: must be an integer >= 1, not {weight!r}")
    identity = item.get("identity")
    if identity is not None and (not isinstance(identity, str) or not identity):
        raise DiscoveryError(f"{where}.identity: must be a non-empty string, not {identity!r}")
    proxy_port = item.get("proxy_port")
    if proxy_port is not None and (
        isinstance(proxy_port, bool) or not isinstance(proxy_port, int) or not 0 < proxy_port <= 65535
    ):
        raise DiscoveryError(f"{where}.proxy_port: must be a port 1-65535, not {proxy_port!r}")
    hint = item.get("protocol_hint")
    if hint is not None and hint not in PROTOCOL_HINTS:
        raise DiscoveryError(f"{where}.protocol_hint: must be one of {sorted(PROTOCOL_HINTS)}, not {hint!r}")
    labels = item.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise DiscoveryError(f"{where}.labels: must map strings to strings")
    return Endpoint.of(
        addr, weight=weight, identity=identity, protocol_hint=hint, proxy_port=proxy_port, labels=labels
    )


def parse_destinations(data: object, source: str) -> dict[str, EndpointSet]:
    """Validate a loaded destinations document; errors name ``source`` and the offending key."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DiscoveryError(f"{source}: the top level must be a mapping with a 'destinations' key")
    unknown = sorted(str(k) for k in data if k != "destinations")
    if unknown:
        raise DiscoveryError(f"{source}: unknown top-level key(s) {unknown}; expected 'destinations'")
    dests = data.get("destinations") or {}
    if not isinstance(dests, dict):
        raise DiscoveryError(f'{source}: destinations: must map "authority:port" to a list of endpoints')
    out: dict[str, EndpointSet] = {}
    for key, items in dests.items():
        where = f"{source}: destinations[{key!r}]"
        if not isinstance(key, str):
            raise DiscoveryError(f'{where}: the authority must be a string "host:port"')
        try:
            authority = normalize_authority(key)
        except ValueError as e:
            raise DiscoveryError(f"{where}: {e}") from None
        if authority in out:
            raise DiscoveryError(f"{where}: the same authority as another key ({authority})")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise DiscoveryError(f"{where}: must be a list of endpoints, not {type(items).__name__}")
        endpoints: list[Endpoint] = []
        seen: set[tuple[str, int]] = set()
        for i, item in enumerate(items):
            try:
                ep = _endpoint(item, f"{where}[{i}]")
            except EndpointError as e:
                raise DiscoveryError(f"{where}[{i}]: {e}") from None
            if ep.addr in seen:
                raise DiscoveryError(f"{where}[{i}]: duplicate address {format_addr(ep.addr)}")
            seen.add(ep.addr)
            endpoints.append(ep)
        out[authority] = EndpointSet(endpoints)
    return out


def file_version(path: str) -> object:
    """What changes when the file changes: mtime, size and inode (an atomic rename counts)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


EndpointWatch = Watched[EndpointSet, EndpointDiff]
ProfileWatch = Watched[Profile, Profile]  # each change is a whole new profile
PolicyWatch = Watched[ClientPolicy | None, ClientPolicy | None]  # None until the first policy


def endpoint_watch(endpoints: EndpointSet) -> EndpointWatch:
    """A watched endpoint set (changes are diffs)."""
    return Watched(endpoints, EndpointSet.apply)


class Resolution(NamedTuple):
    """A known destination: its normalized authority and its watched endpoints."""

    authority: str
    endpoints: EndpointWatch


class Generation:
    """A counter that changes whenever the set of known destinations may have changed. Routers
    read ``value`` per request: an attribute read, not a call into an interpreted method (about
    400 instructions)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class Discovery(Protocol):
    """Where a proxy learns destinations and their endpoints (the static file, the destination
    service). Both lookups may wait on the source; a known destination's endpoints are then
    watched: a snapshot, then diffs (:mod:`tether.runtime.watch`)."""

    changes: Generation  # bumped whenever the set of known destinations may have changed

    async def resolve(self, authority: str) -> Resolution | None:
        """The endpoints of ``authority`` (``host:port``), or None when the destination is unknown
        (the proxy forwards the request to the address it names)."""
        ...

    async def lookup(self, addr: Addr) -> Endpoint | None:
        """What discovery knows of one endpoint address (whether it is meshed), or None."""
        ...

    async def profile(self, authority: str) -> ProfileWatch | None:
        """The destination's watched ServiceProfile (routes, retries, timeouts, splits), or None."""
        ...

    async def policy(self, authority: str) -> PolicyWatch | None:
        """The destination's watched outbound policy (HTTPRoute/GRPCRoute rules), or None."""
        ...

    async def policy_for_addr(self, addr: Addr) -> PolicyWatch | None:
        """The watched outbound policy of an address no destination names (egress), or None."""
        ...

    def opaque_dst(self, addr: Addr) -> bool | Awaitable[bool]:
        """Whether connections to the original destination ``addr`` are opaque, so that the outbound
        side forwards them without detecting a protocol: known now, or after a lookup."""
        ...

    def generation(self) -> int:
        """``changes.value``."""
        ...

    async def run(self) -> None:
        """Keep the source up to date until cancelled."""
        ...


class EndpointSink(Protocol):
    def apply(self, diff: EndpointDiff) -> None: ...

    def replace(self, endpoints: EndpointSet) -> None: ...


async def feed(sub: Subscription[EndpointSet, EndpointDiff], sink: EndpointSink) -> None:
    """Keep ``sink``'s endpoints (a Balancer) equal to the watched set, until cancelled or closed."""
    async for update in sub:
        if isinstance(update, Snapshot):
            sink.replace(update.state)
        else:
            sink.apply(update.change)


def _opaque_addrs(destinations: dict[str, EndpointSet]) -> frozenset[Addr]:
    return frozenset(ep.addr for eps in destinations.values() for ep in eps if ep.protocol_hint == "opaque")


class StaticDiscovery:
    """Destinations from a YAML (or JSON) file; ``check()`` reloads it when it changed."""

    def __init__(
        self,
        path: str,
        *,
        version: Callable[[str], object] = file_version,
        read: Callable[[str], bytes] = read_file,
    ) -> None:
        self.path = path
        self._version_of = version
        self._read = read
        self._watches: dict[str, EndpointWatch] = {}
        self.last_error: str | None = None
        self.reloads_total = 0
        self.reload_errors_total = 0
        self.changes = Generation()
        try:
            self._version = version(path)
        except OSError as e:
            raise DiscoveryError(f"{path}: cannot read the destinations file: {e.strerror or e}") from None
        self._destinations = self._load()
        self._opaque_addrs = _opaque_addrs(self._destinations)

    def _load(self) -> dict[str, EndpointSet]:
        try:
            text = self._read(self.path)
        except OSError as e:
            raise DiscoveryError(
                f"{self.path}: cannot read the destinations file: {e.strerror or e}"
            ) from None
        if text.lstrip()[:1] == b"{":
            # JSON (a YAML document too) is read without PyYAML: json is loaded anyway (admin), and
            # PyYAML and its extension stay ~0.8 MiB of RSS for the life of the proxy. What json
            # refuses goes to YAML as before (a flow mapping, or JSON with a mistake in it).
            try:
                doc = json.loads(text)
            except ValueError:
                pass
            else:
                return parse_destinations(doc, self.path)
        # Imported here: PyYAML costs ~1.4 MiB of RSS that a proxy fed by the destination service
        # never needs.
        import yaml

        try:
            data: Any = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DiscoveryError(f"{self.path}: not valid YAML: {e}") from None
        return parse_destinations(data, self.path)

    @property
    def authorities(self) -> list[str]:
        return sorted(self._destinations)

    def resolve_now(self, authority: str | bytes, default_port: int = 80) -> EndpointSet | None:
        """The current endpoints of ``authority``, or None when the file does not name it."""
        try:
            key = normalize_authority(authority, default_port)
        except ValueError:
            return None
        return self._destinations.get(key)

    def watch(self, authority: str | bytes, default_port: int = 80) -> Resolution | None:
        """The watched endpoints of a known authority (one per authority), or None when unknown."""
        try:
            key = normalize_authority(authority, default_port)
        except ValueError:
            return None
        w = self._watches.get(key)
        if w is None:
            endpoints = self._destinations.get(key)
            if endpoints is None:
                return None
            w = self._watches[key] = endpoint_watch(endpoints)
        return Resolution(key, w)

    async def resolve(self, authority: str) -> Resolution | None:
        return self.watch(authority)

    def generation(self) -> int:
        return self.changes.value

    async def profile(self, authority: str) -> ProfileWatch | None:
        return None  # the static file has endpoints only

    async def policy(self, authority: str) -> PolicyWatch | None:
        return None

    async def policy_for_addr(self, addr: Addr) -> PolicyWatch | None:
        return None

    async def lookup(self, addr: Addr) -> Endpoint | None:
        eps = self.resolve_now(format_addr(addr))
        return eps.get(addr) if eps is not None else None

    def opaque_dst(self, addr: Addr) -> bool:
        """An address the file lists as an endpoint with ``protocol_hint: opaque``."""
        return addr in self._opaque_addrs

    def check(self) -> bool:
        """Reload the file if it changed; True when new destinations were published."""
        try:
            v = self._version_of(self.path)
        except OSError as e:
            self._failed(f"{self.path}: cannot read the destinations file: {e.strerror or e}", None)
            return False
        if v == self._version:
            return False
        try:
            destinations = self._load()
        except DiscoveryError as e:
            self._failed(str(e), v)
            return False
        self._version = v
        self.last_error = None
        self.reloads_total += 1
        self.changes.value += 1
        self._destinations = destinations
        self._opaque_addrs = _opaque_addrs(destinations)
        for key, w in self._watches.items():
            # An authority dropped from the file keeps its watch, with no endpoints (fail-fast).
            new = destinations.get(key, EndpointSet())
            if new != w.state:
                w.change(w.state.diff(new))
        log.info("reloaded %s: %d destinations", self.path, len(destinations))
        return True

    def _failed(self, error: str, version: object | None) -> None:
        if error != self.last_error:
            log.error("%s; keeping the last good destinations", error)
            self.reload_errors_total += 1
        self.last_error = error
        if version is not None:
            self._version = version  # do not re-parse the same bad version every poll

    async def run(self, interval: float = 1.0) -> None:
        """Poll the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.check()
