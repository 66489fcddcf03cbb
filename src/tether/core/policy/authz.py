"""Who may talk to an inbound port: authorizations and how a client is checked against them.

An :class:`Authz` permits clients from some networks (each with exceptions) that authenticate in
one way: no authentication at all, any mesh identity, or identities named exactly or by suffix
(``*.ns.serviceaccount.identity.linkerd.cluster.local``; an empty suffix is every identity).
The first authorization that permits a client wins; none means denied. These are the semantics of
linkerd2-proxy's ``is_authorized`` over the authorizations the policy controller streams.

Default policies (``all-unauthenticated``, ``all-authenticated``, ``cluster-authenticated``,
``cluster-unauthenticated``, ``deny``, ``audit``) are authorization lists built here, the same
ones the control plane sends for a port no Server selects; ``audit`` permits everyone and the
proxy logs what it permitted.

Pure: addresses are parsed with :mod:`ipaddress`; nothing here reads a socket or a clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

ALL_NETWORKS = ("0.0.0.0/0", "::/0")
DEFAULT_POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-authenticated",
                    "cluster-unauthenticated", "deny", "audit")


class PolicyError(ValueError):
    """A policy that cannot be evaluated (the port then denies)."""


class Meta(NamedTuple):
    """A policy object's metric labels: ``group``/``kind``/``name`` (``kind=default`` for defaults).

    A tuple: it is part of every metric key counted per request, and tuples hash in C."""

    group: str
    kind: str
    name: str

    @classmethod
    def default(cls, name: str) -> Meta:
        return cls("", "default", name)

    @property
    def is_audit(self) -> bool:
        return self.kind == "default" and self.name == "audit"


@dataclass(frozen=True, slots=True)
class Network:
    """A client network (CIDR) minus exceptions."""

    net: IPNet
    except_: tuple[IPNet, ...] = ()

    @classmethod
    def parse(cls, cidr: str, except_: Iterable[str] = ()) -> Network:
        try:
            return cls(ipaddress.ip_network(cidr, strict=False),
                       tuple(ipaddress.ip_network(e, strict=False) for e in except_))
        except ValueError as e:
            raise PolicyError(f"network {cidr!r}: {e}") from None

    def contains(self, ip: IPAddr) -> bool:
        if ip.version != self.net.version or ip not in self.net:
            return False
        return not any(ip.version == e.version and ip in e for e in self.except_)


# How a client must authenticate.
UNAUTHENTICATED = "unauthenticated"  # anyone, TLS or not
TLS_UNAUTHENTICATED = "tls-unauthenticated"  # any mesh identity (ServerAuthorization unauthenticatedTLS)
IDENTITIES = "identities"  # named identities or suffixes


@dataclass(frozen=True, slots=True)
class Authn:
    kind: str
    identities: frozenset[str] = frozenset()
    suffixes: tuple[tuple[str, ...], ...] = ()  # dotted labels; () matches every identity

    def permits(self, client_id: str | None) -> bool:
        if self.kind == UNAUTHENTICATED:
            return True
        if client_id is None:
            return False
        if self.kind == TLS_UNAUTHENTICATED:
            return True
        if client_id in self.identities:
            return True
        # A suffix matches names with at least one more label in front ("." + suffix), as Linkerd's.
        labels = tuple(client_id.split("."))
        return any(not s or (len(labels) > len(s) and labels[-len(s):] == s) for s in self.suffixes)


def identities_authn(names: Iterable[str]) -> Authn:
    """MeshTLSAuthentication's ``identities``: exact names, ``*`` (any), ``*.suffix`` wildcards."""
    exact: set[str] = set()
    suffixes: list[tuple[str, ...]] = []
    for n in names:
        if n == "*":
            suffixes.append(())
        elif n.startswith("*."):
            suffixes.append(tuple(n[2:].split(".")))
        elif "*" in n:
            raise PolicyError(f"identity {n!r}: a wildcard may only be a leading '*.' or '*' alone")
        else:
            exact.add(n)
    return Authn(IDENTITIES, frozenset(exact), tuple(suffixes))


@dataclass(frozen=True, slots=True)
class Authz:
    networks: tuple[Network, ...]
    authn: Authn
    meta: Meta

    def permits(self, ip: IPAddr, client_id: str | None) -> bool:
        return any(n.contains(ip) for n in self.networks) and self.authn.permits(client_id)


def authorize(authzs: Sequence[Authz], ip: IPAddr, client_id: str | None) -> Authz | None:
    """The first authorization permitting a client at ``ip`` with ``client_id`` (None: no mTLS)."""
    for a in authzs:
        if a.permits(ip, client_id):
            return a
    return None


def parse_ip(text: str) -> IPAddr:
    """A peer address as the socket reports it (``::ffff:a.b.c.d`` counts as IPv4)."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(Network.parse(c) for c in cidrs)


def default_authorizations(policy: str, cluster_networks: Sequence[str]) -> tuple[Authz, ...]:
    """The authorizations of a default policy; PolicyError for an unknown name."""
    if policy not in DEFAULT_POLICIES:
        raise PolicyError(f"default policy {policy!r} is not one of {', '.join(DEFAULT_POLICIES)}")
    if policy == "deny":
        return ()
    nets = networks(cluster_networks if policy.startswith("cluster-") else ALL_NETWORKS)
    authn = Authn(IDENTITIES, suffixes=((),)) if policy.endswith("-authenticated") else Authn(UNAUTHENTICATED)
    return (Authz(nets, authn, Meta.default(policy)),)


def localhost_authz() -> Authz:
    """Linkerd's proxy always permits clients on the loopback addresses 127.0.0.1 and ::1."""
    return Authz(networks(("127.0.0.1/32", "::1/128")), Authn(UNAUTHENTICATED), Meta.default("localhost"))
