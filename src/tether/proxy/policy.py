"""linkerd2-proxy-api ``OutboundPolicy`` messages read into :mod:`tether.core.routing.policy`.

The destination client (:mod:`tether.proxy.destination`) streams one ``OutboundPolicies.Watch``
per destination the proxy routes to and calls :func:`client_policy_of` on each message. A message
the proxy cannot apply (an invalid regular expression, a rule without backends) raises
:class:`PolicyError`; the caller keeps the last good policy and logs why.

Choices where the API leaves room (written down in docs/notes/issue-10-proxy.md):

- HTTP/1 and HTTP/2 routes of a ``detect`` policy are the same routes in tether's controller and in
  Linkerd's; the proxy reads the HTTP/1 list (HTTP/2 when only it is set).
- ``first_available`` distributions send to the first backend; ``random_available`` weighs them.
- A ``retry.timeout`` is the per-try timeout; ``timeouts.response`` is too when no retry sets one;
  ``timeouts.request`` bounds the whole request, retries included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tether.api.gen import (
    grpc_route_lite,
    http_route_lite,
    http_types_lite,
    meta_lite,
    outbound_lite,
)
from tether.core.routing.http_match import PathMatch, Route, RouteMatch, Rule, ValueMatch
from tether.core.routing.policy import (
    NO_FILTERS,
    Backend,
    ClientPolicy,
    FailureInjector,
    Filters,
    HeaderModifier,
    Meta,
    Redirect,
    RouteRule,
)
from tether.core.routing.retry_policy import MAX_RETRY_BODY, RetryPolicy
from tether.proxy.wire import endpoint_of, method_of, tcp_addr


class PolicyError(ValueError):
    """An outbound policy the proxy cannot apply; the message says which part."""


def _seconds(d: Any) -> float:
    return d.seconds + d.nanos / 1e9


def _opt_seconds(msg: Any, field: str) -> float | None:
    if not msg.HasField(field):
        return None
    return _seconds(getattr(msg, field)) or None


def meta_of(m: meta_lite.Metadata, port: int = 0) -> Meta:
    if m.WhichOneof("kind") == "resource":
        r = m.resource
        return Meta(r.group, r.kind, r.namespace, r.name, r.section, r.port or port)
    return Meta(kind="default", name=m.default, port=port)


def _headers(hs: http_types_lite.Headers) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((h.name.lower().encode("latin-1"), bytes(h.value)) for h in hs.headers)


def _modifier(m: Any) -> HeaderModifier:
    return HeaderModifier(add=_headers(m.add), set=_headers(m.set),
                          remove=tuple(n.lower().encode("latin-1") for n in m.remove))


def _ratio(r: http_route_lite.Ratio, has: bool) -> tuple[int, int]:
    if not has:
        return 1, 1
    return r.numerator, max(1, r.denominator)


def http_filters_of(filters: Any) -> Filters:
    req = rsp = None
    failure = None
    redirect = None
    invalid = None
    for f in filters:
        kind = f.WhichOneof("kind")
        if kind == "request_header_modifier":
            req = _modifier(f.request_header_modifier)
        elif kind == "response_header_modifier":
            rsp = _modifier(f.response_header_modifier)
        elif kind == "failure_injector":
            fi = f.failure_injector
            num, den = _ratio(fi.ratio, fi.HasField("ratio"))
            failure = FailureInjector(fi.status or 500, fi.message, num, den)
        elif kind == "redirect":
            r = f.redirect
            scheme = ""
            if r.HasField("scheme"):
                s = r.scheme
                scheme = (http_types_lite.Scheme.Registered.Name(s.registered).lower()
                          if s.WhichOneof("type") == "registered" else s.unregistered)
            full = prefix = None
            if r.HasField("path"):
                which = r.path.WhichOneof("replace")
                full = r.path.full if which == "full" else None
                prefix = r.path.prefix if which == "prefix" else None
            redirect = Redirect(status=r.status or 302, scheme=scheme, host=r.host, port=r.port,
                                full_path=full, prefix=prefix)
        else:
            invalid = f"unknown filter {kind!r}"
    return Filters(req, rsp, failure, redirect, invalid)


def grpc_filters_of(filters: Any) -> Filters:
    req = None
    failure = None
    invalid = None
    for f in filters:
        kind = f.WhichOneof("kind")
        if kind == "request_header_modifier":
            req = _modifier(f.request_header_modifier)
        elif kind == "failure_injector":
            fi = f.failure_injector
            num, den = _ratio(fi.ratio, fi.HasField("ratio"))
            failure = FailureInjector(fi.code or 13, fi.message, num, den)
        else:
            invalid = f"unknown filter {kind!r}"
    return Filters(request_headers=req, failure=failure, invalid=invalid)


def value_matches(ms: Sequence[Any]) -> tuple[ValueMatch, ...]:
    """Header or query-parameter matches (``HeaderMatch``/``QueryParamMatch``); one without a value
    is refused, as Linkerd's proxy refuses it."""
    out = []
    for m in ms:
        which = m.WhichOneof("value")
        if which == "regex":
            out.append(ValueMatch(m.name, m.regex, regex=True))
        elif which == "exact":
            v = m.exact
            out.append(ValueMatch(m.name, v.decode("latin-1") if isinstance(v, bytes) else v))
        else:
            raise PolicyError(f"match on {m.name!r}: no value")
    return tuple(out)


def http_route_match(m: http_route_lite.HttpRouteMatch) -> RouteMatch:
    path = None
    if m.HasField("path"):
        which = m.path.WhichOneof("kind")
        if which is not None:
            path = PathMatch(which, getattr(m.path, which))
    method = method_of(m.method) if m.HasField("method") else None
    return RouteMatch(path, value_matches(m.headers), value_matches(m.query_params), method)


def grpc_route_match(m: grpc_route_lite.GrpcRouteMatch) -> RouteMatch:
    """A gRPC match on ``/service/method`` as a path match (gRPC requests are POSTs to it)."""
    path = None
    if m.HasField("rpc"):
        svc, method = m.rpc.service, m.rpc.method
        if svc and method:
            path = PathMatch("exact", f"/{svc}/{method}")
        elif svc:
            path = PathMatch("prefix", f"/{svc}")
        elif method:
            path = PathMatch("regex", f"/[^/]+/{re.escape(method)}")
    return RouteMatch(path, value_matches(m.headers))


def _backend(rb: Any, weight: int, grpc: bool, opaque: bool = False) -> Backend:
    b = rb.backend
    meta = meta_of(b.metadata)
    # An opaque route's backend has no request timeout, and its filters (invalid, forbidden) are
    # read by the caller.
    filters = NO_FILTERS if opaque else grpc_filters_of(rb.filters) if grpc else http_filters_of(rb.filters)
    timeout = None if opaque else _opt_seconds(rb, "requestTimeout")
    kind = b.WhichOneof("kind")
    if kind == "forward":
        ip, port = tcp_addr(b.forward.addr)
        ep = endpoint_of(b.forward, {})
        where = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return Backend(meta, forward=where, forward_identity=ep.identity, weight=weight, filters=filters,
                       timeout=timeout)
    if kind == "balancer":
        path = b.balancer.discovery.dst.path
        if not path:
            raise PolicyError(f"backend {meta.name or meta.kind}: a balancer without a discovery path")
        return Backend(meta, authority=path, weight=weight, filters=filters, timeout=timeout)
    if kind is None and filters.failure is not None:
        # An invalid backend (a Service or EgressNetwork the controller cannot serve): its failure
        # filter answers every request sent to it, as Linkerd's controller encodes it.
        return Backend(meta, weight=weight, filters=filters, timeout=timeout)
    raise PolicyError(f"backend {meta.name or meta.kind}: no forward address and no balancer")


def _distribution(d: Any, grpc: bool) -> tuple[tuple[Backend, ...], bool]:
    kind = d.WhichOneof("kind")
    if kind == "first_available":
        return tuple(_backend(rb, 1, grpc) for rb in d.first_available.backends), True
    if kind == "random_available":
        backends = tuple(_backend(w.backend, w.weight, grpc) for w in d.random_available.backends if w.weight)
        return backends, False
    return (), False


def _retry(r: Any, grpc: bool) -> RetryPolicy:
    per_try = _opt_seconds(r, "timeout")
    max_body = r.max_request_bytes or MAX_RETRY_BODY
    if grpc:
        c = r.conditions
        codes = frozenset(code for code, on in ((1, c.cancelled), (4, c.deadine_exceeded), (8, c.resource_exhausted),
                                                (13, c.internal), (14, c.unavailable)) if on)
        return RetryPolicy(limit=r.max_retries, grpc_codes=codes, per_try_timeout=per_try, max_body=max_body)
    ranges = tuple((sr.start, sr.end or sr.start) for sr in r.conditions.status_ranges)
    return RetryPolicy(limit=r.max_retries, http_statuses=ranges, per_try_timeout=per_try, max_body=max_body)


def _rule(rule: Any, route_meta: Meta, grpc: bool) -> Rule[RouteRule]:
    matches = tuple(grpc_route_match(m) if grpc else http_route_match(m) for m in rule.matches)
    backends, first = _distribution(rule.backends, grpc)
    request_timeout = response_timeout = None
    if rule.HasField("timeouts"):
        request_timeout = _opt_seconds(rule.timeouts, "request")
        response_timeout = _opt_seconds(rule.timeouts, "response")
    if request_timeout is None:
        request_timeout = _opt_seconds(rule, "requestTimeout")
    retry = _retry(rule.retry, grpc) if rule.HasField("retry") else None
    if retry is not None and retry.per_try_timeout is None and response_timeout is not None:
        retry = RetryPolicy(limit=retry.limit, http_statuses=retry.http_statuses, grpc_codes=retry.grpc_codes,
                            per_try_timeout=response_timeout, max_body=retry.max_body)
    filters = grpc_filters_of(rule.filters) if grpc else http_filters_of(rule.filters)
    return Rule(matches, RouteRule(
        route=route_meta, backends=backends, filters=filters if not filters.empty else NO_FILTERS,
        request_timeout=request_timeout, response_timeout=response_timeout, retry=retry,
        allow_l5d_request_headers=rule.allow_l5d_request_headers, first_available=first))


def _host(h: http_route_lite.HostMatch) -> str:
    if h.WhichOneof("match") == "suffix":
        return "*." + ".".join(reversed(h.suffix.reverse_labels))
    return h.exact


def _routes(routes: Any, grpc: bool) -> tuple[Route[RouteRule], ...]:
    out = []
    for r in routes:
        meta = meta_of(r.metadata)
        out.append(Route(tuple(_host(h) for h in r.hosts), tuple(_rule(rule, meta, grpc) for rule in r.rules)))
    return tuple(out)


def _accrual(fa: outbound_lite.FailureAccrual) -> tuple[int, float, float, float] | None:
    if fa.WhichOneof("kind") != "consecutive_failures":
        return None
    c = fa.consecutive_failures
    b = c.backoff
    return c.max_failures, _seconds(b.min_backoff), _seconds(b.max_backoff), b.jitter_ratio


def _forbidden(routes: Any, parent: Meta) -> str | None:
    """Why opaque traffic is refused, when every route's rules forbid it."""
    for r in routes:
        for rule in r.rules:
            if any(f.WhichOneof("kind") == "forbidden" for f in rule.filters):
                name = f"{parent.kind} {parent.namespace}/{parent.name}" if parent.name else parent.kind
                return f"traffic forbidden by {name}"
    return None


def _opaque_backends(routes: Any) -> tuple[Backend, ...]:
    """The backends of the first opaque route's first rule (a TCPRoute has no matches: one decides)."""
    for r in routes:
        for rule in r.rules:
            d = rule.backends
            which = d.WhichOneof("kind")
            if which == "first_available":
                pairs = [(rb, 1) for rb in d.first_available.backends[:1]]
            elif which == "random_available":
                pairs = [(w.backend, w.weight) for w in d.random_available.backends if w.weight]
            else:
                pairs = []
            out = []
            for rb, weight in pairs:
                meta = meta_of(rb.backend.metadata)
                invalid = next((f.invalid.message for f in rb.filters if f.WhichOneof("kind") == "invalid"), None)
                if invalid is not None or rb.backend.WhichOneof("kind") is None:
                    out.append(Backend(meta, weight=weight, filters=Filters(
                        invalid=invalid or f"backend {meta.name or meta.kind} has no address")))
                else:
                    out.append(_backend(rb, weight, False, opaque=True))
            return tuple(out)
    return ()


def client_policy_of(p: outbound_lite.OutboundPolicy, port: int = 0) -> ClientPolicy:
    """One OutboundPolicy message as the proxy applies it; PolicyError when it cannot be."""
    parent = meta_of(p.metadata, port)
    proto = p.protocol
    kind = proto.WhichOneof("kind")
    forbidden = None
    opaque: tuple[Backend, ...] = ()
    try:
        if kind == "detect":
            forbidden = _forbidden(proto.detect.opaque.routes, parent)
            opaque = _opaque_backends(proto.detect.opaque.routes)
        elif kind == "opaque":
            forbidden = _forbidden(proto.opaque.routes, parent)
            opaque = _opaque_backends(proto.opaque.routes)
        if kind == "grpc":
            g = proto.grpc
            return ClientPolicy(parent, "grpc", _routes(g.routes, True),
                                _accrual(g.failure_accrual) if g.HasField("failure_accrual") else None)
        if kind in ("detect", "http1", "http2"):
            if kind == "detect":
                h = proto.detect.http1 if proto.detect.http1.routes else proto.detect.http2
            else:
                h = getattr(proto, kind)
            return ClientPolicy(parent, "http", _routes(h.routes, False),
                                _accrual(h.failure_accrual) if h.HasField("failure_accrual") else None, forbidden,
                                opaque)
        return ClientPolicy(parent, kind or "opaque", forbidden=forbidden, opaque_backends=opaque)
    except (re.error, ValueError) as e:
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(f"policy for {parent.name or parent.kind}: {e}") from None
