"""A destination's outbound policy as the proxy applies it (pure): HTTPRoute and GRPCRoute rules.

The policy controller streams an ``OutboundPolicy`` per destination (linkerd2-proxy-api
``OutboundPolicies.Watch``); :mod:`tether.proxy.policy` reads it into these types. A policy names
its *parent* (the Service and port the traffic was addressed to), the protocol, and its routes.
Each route has rules; per request the most specific matching rule (Gateway API precedence,
:func:`~tether.core.routing.http_match.select_rule`) decides:

- the filters applied to the request (header modifiers, a failure injector, a redirect);
- the request timeout (the whole request, retries included) and the per-try timeout;
- the retry policy (statuses or gRPC codes, a limit, bodies up to ``max_request_bytes``);
- the backends, weighted: each request goes to one of them (``backendRefs`` weights), each
  backend its own balancer (or one address, for a forwarded destination).

Metadata (:class:`Meta`) labels the ``outbound_http_route_*`` / ``outbound_grpc_route_*`` series
with ``parent_*``, ``route_*`` and ``backend_*`` as Linkerd's proxy does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tether.core.durations import parse_duration
from tether.core.routing.http_match import Route
from tether.core.routing.retry_policy import (
    RetryPolicy,
    RetryPolicyError,
    parse_grpc_codes,
    parse_http_statuses,
    parse_limit,
)

# Per-request overrides a rule may allow (``allow_l5d_request_headers``), as Linkerd spells them.
L5D_REQUEST_HEADERS = frozenset({b"l5d-retry-limit", b"l5d-retry-http", b"l5d-retry-grpc", b"l5d-retry-timeout",
                                 b"l5d-timeout", b"l5d-response-timeout"})


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass(frozen=True, slots=True)
class Meta:
    """Where a piece of policy came from: a resource (group, kind, namespace, name, section,
    port) or a built-in default (``kind="default"``, ``name`` the default's name)."""

    group: str = ""
    kind: str = "default"
    namespace: str = ""
    name: str = ""
    section: str = ""
    port: int = 0

    def labels(self, scope: str, *, with_port: bool) -> str:
        """``scope_group="..",scope_kind="..",...`` (parents and backends add port and section)."""
        text = (f'{scope}_group="{_escape(self.group)}",{scope}_kind="{_escape(self.kind)}",'
                f'{scope}_namespace="{_escape(self.namespace)}",{scope}_name="{_escape(self.name)}"')
        if with_port:
            port = str(self.port) if self.port else ""
            text += f',{scope}_port="{port}",{scope}_section_name="{_escape(self.section)}"'
        return text


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: names lower case."""

    add: tuple[tuple[bytes, bytes], ...] = ()
    set: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = set(self.remove) | {k for k, _ in self.set}
        out = [(k, v) for k, v in headers if k not in drop] if drop else list(headers)
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclass(frozen=True, slots=True)
class FailureInjector:
    """Answer ``status`` (gRPC: ``status`` is a gRPC code) to ``numerator/denominator`` of requests."""

    status: int
    message: str
    numerator: int = 1
    denominator: int = 1

    def fires(self, r: float) -> bool:
        """For a uniform ``r`` in [0, 1)."""
        if self.denominator <= 0 or self.numerator <= 0:
            return False
        return r * self.denominator < self.numerator


@dataclass(frozen=True, slots=True)
class Redirect:
    """RequestRedirect: a 3xx with a Location built from the request and these parts."""

    status: int = 302
    scheme: str = ""
    host: str = ""
    port: int = 0
    full_path: str | None = None
    prefix: str | None = None  # replaces the matched path prefix

    def location(self, scheme: str, authority: str, path: str, matched_prefix: str | None) -> str:
        new_path = path
        if self.full_path is not None:
            new_path = self.full_path
        elif self.prefix is not None and matched_prefix is not None:
            rest = path[len(matched_prefix.rstrip("/")):]
            new_path = self.prefix.rstrip("/") + rest if rest else self.prefix
        host, sep, port = authority.rpartition(":")
        if not sep or "]" in port:
            host, port = authority, ""
        if self.host:
            host, port = self.host, ""
        if self.port:
            port = str(self.port)
        where = f"{host}:{port}" if port else host
        return f"{self.scheme or scheme}://{where}{new_path}"


@dataclass(frozen=True, slots=True)
class Filters:
    """A rule's (or a backend's) filters, in the order they apply."""

    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    failure: FailureInjector | None = None
    redirect: Redirect | None = None
    invalid: str | None = None  # a filter the proxy does not know: the route answers 500

    @property
    def empty(self) -> bool:
        return (self.request_headers is None and self.response_headers is None and self.failure is None
                and self.redirect is None and self.invalid is None)


NO_FILTERS = Filters()


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of a rule: a discovered destination (``authority``, balanced over its
    endpoints), one forwarded address (``forward``: ``ip:port``), or neither: an invalid backend
    whose failure filter answers."""

    meta: Meta
    authority: str | None = None
    forward: str | None = None
    forward_identity: str | None = None
    weight: int = 1
    filters: Filters = NO_FILTERS
    timeout: float | None = None  # backendRequest timeout (per try)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """What a matching rule decides for a request."""

    route: Meta  # the HTTPRoute/GRPCRoute (or the default route)
    backends: tuple[Backend, ...]
    filters: Filters = NO_FILTERS
    request_timeout: float | None = None  # the whole request, retries included
    response_timeout: float | None = None  # each try's response head
    retry: RetryPolicy | None = None
    allow_l5d_request_headers: bool = False
    first_available: bool = False  # backends in order of preference, not weighted

    def with_request_headers(self, values: dict[bytes, bytes], grpc: bool) -> RouteRule:
        """This rule with the ``l5d-retry-*`` / ``l5d-timeout`` overrides of one request applied.
        A value that does not parse is ignored (the rule's own setting stays), as Linkerd does."""
        retry = self.retry or RetryPolicy(limit=1)
        retry_set = False
        request_timeout, response_timeout = self.request_timeout, self.response_timeout
        for name, raw in values.items():
            text = raw.decode("latin-1")
            try:
                if name == b"l5d-retry-limit":
                    retry, retry_set = replace(retry, limit=parse_limit(text)), True
                elif name == b"l5d-retry-http" and not grpc:
                    retry, retry_set = replace(retry, http_statuses=parse_http_statuses(text)), True
                elif name == b"l5d-retry-grpc" and grpc:
                    retry, retry_set = replace(retry, grpc_codes=parse_grpc_codes(text)), True
                elif name == b"l5d-retry-timeout":
                    retry, retry_set = replace(retry, per_try_timeout=parse_duration(text) or None), True
                elif name == b"l5d-timeout":
                    request_timeout = parse_duration(text) or None
                elif name == b"l5d-response-timeout":
                    response_timeout = parse_duration(text) or None
            except (RetryPolicyError, ValueError):
                continue
        return replace(self, retry=retry if retry_set or self.retry is not None else None,
                       request_timeout=request_timeout, response_timeout=response_timeout)


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """A destination's outbound policy: ``protocol`` is ``"http"``, ``"grpc"`` or ``"opaque"``."""

    parent: Meta
    protocol: str = "http"
    routes: tuple[Route[RouteRule], ...] = ()
    failure_accrual: tuple[int, float, float, float] | None = None  # max failures, min/max backoff, jitter
    forbidden: str | None = None  # opaque traffic is refused (an EgressNetwork with trafficPolicy Deny): why
    # Where opaque connections go: the first opaque route's backends (a TCPRoute's weighted
    # Services, the destination's own balancer, or the original destination forwarded). A backend
    # with ``filters.invalid`` refuses the connection saying why.
    opaque_backends: tuple[Backend, ...] = ()

    @property
    def applies(self) -> bool:
        """Whether its HTTP routes replace the plain path: a Service's or an EgressNetwork's policy
        (a forwarding default for any other address changes nothing)."""
        return self.parent.kind in ("Service", "EgressNetwork") and bool(self.routes) and self.protocol != "opaque"

    @property
    def grpc(self) -> bool:
        return self.protocol == "grpc"
