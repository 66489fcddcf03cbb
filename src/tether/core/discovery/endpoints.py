"""Endpoint sets and the diffs between them, as discovery streams them (snapshot, then add/remove).

An :class:`Endpoint` is an address plus the metadata discovery knows about it (weight, the
identity its proxy must present, a protocol hint, the port of its proxy's inbound listener, and
labels for metrics). An :class:`EndpointSet` is an immutable map from address to endpoint;
``old.diff(new)`` gives the :class:`EndpointDiff` that turns one into the other and
``old.apply(diff)`` applies one. Adding an address that is present replaces its metadata;
removing an absent address is a no-op, so a replayed diff is harmless.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

Addr = tuple[str, int]

PROTOCOL_HINTS = frozenset({"h2", "opaque"})


class EndpointError(ValueError):
    """An endpoint or address is malformed; the message says which and why."""


def parse_addr(text: str) -> Addr:
    """Parse ``ip:port`` or ``[ipv6]:port`` into ``(ip, port)`` with the IP normalized."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise EndpointError(f"{text!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(f"{text!r}: {host!r} is not an IP address") from None
    p = int(port)
    if not 0 < p <= 65535:
        raise EndpointError(f"{text!r}: port {p} is out of range 1-65535")
    return str(ip), p


def format_addr(addr: Addr) -> str:
    """``ip:port`` (``[ipv6]:port``), the inverse of :func:`parse_addr`."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend address and what discovery says about it."""

    addr: Addr
    weight: int = 1
    identity: str | None = None  # the TLS identity the endpoint's proxy must present (None: not meshed)
    protocol_hint: str | None = None  # "h2" (speak HTTP/2 to the peer proxy) | "opaque" | None
    proxy_port: int | None = None  # the peer proxy's inbound port (4143) for meshed traffic
    labels: tuple[tuple[str, str], ...] = field(default=())  # sorted (key, value) pairs
    # The peer proxy is a tether release before 0.2.0: it reads the transport header as JSON, and
    # serves no session protocol after it (the destination service says so).
    legacy_transport_header: bool = False

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise EndpointError(f"{format_addr(self.addr)}: weight must be >= 1, not {self.weight}")
        if self.protocol_hint is not None and self.protocol_hint not in PROTOCOL_HINTS:
            raise EndpointError(
                f"{format_addr(self.addr)}: protocol hint {self.protocol_hint!r} is not one of "
                f"{sorted(PROTOCOL_HINTS)}"
            )
        if self.proxy_port is not None and not 0 < self.proxy_port <= 65535:
            raise EndpointError(f"{format_addr(self.addr)}: proxy_port {self.proxy_port} is out of range")
        if list(self.labels) != sorted(self.labels):
            object.__setattr__(self, "labels", tuple(sorted(self.labels)))

    @classmethod
    def of(
        cls,
        addr: str | Addr,
        *,
        weight: int = 1,
        identity: str | None = None,
        protocol_hint: str | None = None,
        proxy_port: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Endpoint:
        """Build an endpoint from ``"ip:port"`` (or a tuple) and a label mapping."""
        a = parse_addr(addr) if isinstance(addr, str) else addr
        return cls(a, weight, identity, protocol_hint, proxy_port, tuple(sorted((labels or {}).items())))

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    def same_connection(self, other: Endpoint) -> bool:
        """True when ``other`` can reuse this endpoint's connections (only weight or labels differ)."""
        return (self.addr, self.identity, self.protocol_hint, self.proxy_port, self.legacy_transport_header) == (
            other.addr,
            other.identity,
            other.protocol_hint,
            other.proxy_port,
            other.legacy_transport_header,
        )

    def __str__(self) -> str:
        return format_addr(self.addr)


@dataclass(frozen=True, slots=True)
class EndpointDiff:
    """Endpoints to add (or update) and addresses to remove; removals apply first."""

    add: tuple[Endpoint, ...] = ()
    remove: tuple[Addr, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


class EndpointSet:
    """An immutable set of endpoints keyed by address."""

    __slots__ = ("_by_addr",)

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        by_addr: dict[Addr, Endpoint] = {}
        for ep in endpoints:
            by_addr[ep.addr] = ep  # a later duplicate wins, as a later add would
        self._by_addr = by_addr

    def __len__(self) -> int:
        return len(self._by_addr)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._by_addr.values())

    def __contains__(self, addr: object) -> bool:
        return addr in self._by_addr

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndpointSet) and self._by_addr == other._by_addr

    def __hash__(self) -> int:
        return hash(frozenset(self._by_addr.values()))

    def __repr__(self) -> str:
        return f"EndpointSet({[str(e) for e in self]})"

    def get(self, addr: Addr) -> Endpoint | None:
        return self._by_addr.get(addr)

    @property
    def addrs(self) -> frozenset[Addr]:
        return frozenset(self._by_addr)

    def diff(self, new: EndpointSet) -> EndpointDiff:
        """The diff that turns this set into ``new`` (changed metadata appears as an add)."""
        add = tuple(ep for a, ep in new._by_addr.items() if self._by_addr.get(a) != ep)
        remove = tuple(a for a in self._by_addr if a not in new._by_addr)
        return EndpointDiff(add, remove)

    def apply(self, diff: EndpointDiff) -> EndpointSet:
        """This set with ``diff`` applied (removals first, then adds)."""
        by_addr = dict(self._by_addr)
        for a in diff.remove:
            by_addr.pop(a, None)
        for ep in diff.add:
            by_addr[ep.addr] = ep
        out = EndpointSet()
        out._by_addr = by_addr
        return out
