"""Typed targets: what a stack is built for, carrying the settings and labels its layers read.

A stack is built once per target and cached (:mod:`tether.proxy.cache`); its layers take what they
need from the target when they are built, never from the request. Targets are frozen and hashable:
they are the cache keys.

- :class:`Logical`: outbound, a destination as the application named it (its authority), either
  known to discovery (balanced over its endpoints) or forwarded to one address.
- :class:`Route`: a route of a logical destination, with its timeout, connect-retry budget and
  response classifier (the default route until the control plane streams routes).
- :class:`EndpointTarget`: one endpoint and how to reach it (plain, or mTLS to its proxy expecting
  an identity, with a transport header for opaque streams), with its metric labels.
- :class:`InboundTarget`: inbound, the local application port a connection is for, and what the
  connection proved (TLS, the client's identity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tether.core.discovery.endpoints import Addr
from tether.core.http.classify import METRICS, Classifier

if TYPE_CHECKING:
    from tether.proxy.discovery import EndpointWatch, PolicyWatch, ProfileWatch


@dataclass(frozen=True, slots=True)
class Logical:
    """An outbound destination: ``authority`` (``host:port``, the metrics label) and, when
    discovery does not know it, the one address it is forwarded to."""

    authority: str
    fallback: Addr | None = None
    # A known destination's watched endpoints (not part of its identity as a cache key).
    watch: EndpointWatch | None = field(default=None, compare=False, repr=False)
    profile: ProfileWatch | None = field(default=None, compare=False, repr=False)
    policy: PolicyWatch | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Route:
    """One route's policy (the default route: no timeout, Linkerd's default classification)."""

    name: str = "default"
    timeout: float | None = None
    connect_retry_attempts: int = 3
    classifier: Classifier = field(default=METRICS, compare=False)


@dataclass(frozen=True, slots=True)
class EndpointTarget:
    """One endpoint: ``addr`` is the workload's address (metrics), ``dial`` where the proxy
    connects (its proxy's inbound port when meshed), ``server_id`` the identity that peer must
    prove over mTLS (None: plaintext)."""

    addr: Addr
    dial: Addr
    server_id: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    transport_port: int | None = None  # over mTLS to the peer's proxy port: the application port, in a transport header
    legacy_transport_header: bool = False  # that header as tether releases before 0.2.0 read it (JSON)
    # HTTP after that header: say which version (the peer's proxy serves it), unless the endpoint's
    # hint is opaque (its proxy forwards every connection as bytes: Linkerd's client sends none then).
    header_session: bool = True


@dataclass(frozen=True, slots=True)
class InboundTarget:
    """The local application address an inbound connection is delivered to, and its client."""

    app: Addr
    tls: bool = False
    client_id: str | None = None
