"""Tap messages on the wire: an ObserveRequest read into a match, queued events encoded as TapEvents.

Imported only when a tap runs: a proxy nobody taps never loads the tap message classes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from tether.api.gen import http_types_lite, net_lite, tap_lite
from tether.api.protolite import DecodeError, Duration
from tether.api.protolite import varint as _varint
from tether.core.discovery.endpoints import Addr
from tether.proxy.grpc_client import frame_message
from tether.proxy.http.body import Headers
from tether.proxy.tap import Event, Facts, Match
from tether.proxy.wire import method_of, tcp_address

MAX_DEPTH = 16  # nested all/any/not in one match


class TapRequestError(ValueError):
    """An ObserveRequest the proxy cannot serve; the message says which part."""


@dataclass(frozen=True, slots=True)
class ObserveSpec:
    match: Match
    limit: int
    max_rps: float
    extract_headers: bool


def parse_observe(raw: bytes) -> ObserveSpec:
    """The gRPC request body (one framed ObserveRequest) as what the tap does."""
    if len(raw) < 5 or raw[0] != 0:
        raise TapRequestError("not one uncompressed gRPC message")
    size = int.from_bytes(raw[1:5], "big")
    if len(raw) != 5 + size:
        raise TapRequestError("the body is not exactly one message")
    try:
        req = tap_lite.ObserveRequest.FromString(raw[5:])
    except DecodeError as e:
        raise TapRequestError(f"cannot decode: {e}") from None
    match = compile_match(req.match, 0) if req.HasField("match") else _always
    if req.max_rps < 0:
        raise TapRequestError("max_rps must not be negative")
    extract = req.HasField("extract") and req.extract.WhichOneof("extract") == "http" and \
        req.extract.http.WhichOneof("extract") == "headers"
    return ObserveSpec(match, req.limit, req.max_rps, extract)


def _always(f: Facts) -> bool:
    return True


def compile_match(m: tap_lite.ObserveRequest.Match, depth: int) -> Match:
    """One Match message as a predicate over a request's facts (an empty match matches everything)."""
    if depth > MAX_DEPTH:
        raise TapRequestError(f"match nested deeper than {MAX_DEPTH}")
    which = m.WhichOneof("match")
    if which is None:
        return _always
    if which == "all":
        parts = [compile_match(x, depth + 1) for x in m.all.matches]
        return lambda f: all(p(f) for p in parts)
    if which == "any":
        parts = [compile_match(x, depth + 1) for x in m.any.matches]
        return lambda f: any(p(f) for p in parts)
    if which == "not":
        inner = compile_match(getattr(m, "not"), depth + 1)
        return lambda f: not inner(f)
    if which == "source":
        tcp = _tcp(m.source)
        return lambda f: tcp(f.src)
    if which == "destination":
        tcp = _tcp(m.destination)
        return lambda f: tcp(f.dst)
    if which == "http":
        return _http(m.http)
    # Labels of the destination and route: the proxy does not carry them per request yet; a tap that
    # asks for them matches nothing rather than everything.
    return lambda f: False


def _tcp(t: tap_lite.ObserveRequest.Match.Tcp) -> Callable[[Addr], bool]:
    """A source or destination match: a netmask, or a port range (one port when max is 0)."""
    which = t.WhichOneof("match")
    if which == "netmask":
        ip = t.netmask.ip
        if ip.WhichOneof("ip") == "ipv6":
            n = (ip.ipv6.first << 64) | ip.ipv6.last
            addr: str = str(ipaddress.IPv6Address(n))
            bits = 128
        else:
            addr, bits = str(ipaddress.IPv4Address(ip.ipv4)), 32
        mask = t.netmask.mask
        if mask > bits:
            raise TapRequestError(f"netmask /{mask} is longer than the address")
        net = ipaddress.ip_network(f"{addr}/{mask}", strict=False)
        return lambda a: _in(a, net)
    if which == "ports":
        lo = t.ports.min
        hi = t.ports.max or lo
        if hi < lo or hi > 65535:
            raise TapRequestError(f"port range {lo}-{hi} is not a range of ports")
        return lambda a: lo <= a[1] <= hi
    return lambda a: True


def _http(h: tap_lite.ObserveRequest.Match.Http) -> Match:
    which = h.WhichOneof("match")
    if which == "scheme":
        want = _scheme_of(h.scheme)
        return lambda f: f.scheme.lower() == want
    if which == "method":
        method = method_of(h.method)
        return lambda f: f.method == method
    if which in ("authority", "path"):
        sm = h.authority if which == "authority" else h.path
        kind = sm.WhichOneof("match")
        if kind is None:
            return _always
        text = (sm.exact if kind == "exact" else sm.prefix).encode("latin-1")
        if which == "path":
            if kind == "exact":
                return lambda f: f.path == text
            return lambda f: f.path.startswith(text)
        if kind == "exact":
            return lambda f: f.authority.lower() == text.lower()
        return lambda f: f.authority.lower().startswith(text.lower())
    return _always


def _scheme_of(s: http_types_lite.Scheme) -> bytes:
    if s.WhichOneof("type") == "unregistered":
        return s.unregistered.lower().encode("latin-1")
    return http_types_lite.Scheme.Registered.Name(s.registered).lower().encode()


# -- events ---------------------------------------------------------------------------------------------


def frame(msg: bytes) -> bytes:
    return frame_message(msg)


_REGISTERED = {n.encode(): v for n, v in http_types_lite.HttpMethod.Registered.items()}


def _method(m: bytes) -> http_types_lite.HttpMethod:
    v = _REGISTERED.get(m)
    if v is not None:
        return http_types_lite.HttpMethod(registered=v)
    return http_types_lite.HttpMethod(unregistered=m.decode("latin-1"))


def _scheme(s: bytes) -> http_types_lite.Scheme:
    low = s.lower()
    if low == b"http":
        return http_types_lite.Scheme(registered=http_types_lite.Scheme.HTTP)
    if low == b"https":
        return http_types_lite.Scheme(registered=http_types_lite.Scheme.HTTPS)
    return http_types_lite.Scheme(unregistered=s.decode("latin-1"))


def _headers(hs: Headers | None) -> http_types_lite.Headers | None:
    if not hs:
        return None
    return http_types_lite.Headers(headers=[http_types_lite.Headers.Header(name=k.decode("latin-1"), value=v)
                                           for k, v in hs])


def _addr(a: Addr) -> net_lite.TcpAddress:
    try:
        return tcp_address(a)
    except ValueError:  # not an IP address (unknown peer)
        return tcp_address(("0.0.0.0", a[1]))


def _common(f: Facts) -> bytes:
    """The fields every event of one request shares (addresses, metadata, direction), encoded once."""
    if f.wire is None:
        ev = tap_lite.TapEvent(
            source=_addr(f.src),
            destination=_addr(f.dst),
            proxy_direction=f.direction,
            source_meta=tap_lite.TapEvent.EndpointMeta(labels={"tls": f.src_tls}),
            destination_meta=tap_lite.TapEvent.EndpointMeta(labels={"tls": f.dst_tls}),
        )
        f.wire = ev.SerializeToString()
    return f.wire


def encode(base: int, e: Event) -> bytes:
    """One queued event as a serialized TapEvent: the request's shared fields, then its ``http`` (3)."""
    kind, stream = e[0], e[1]
    f: Facts = e[2]
    Http = tap_lite.TapEvent.Http
    sid = Http.StreamId(base=base, stream=stream)
    if kind == "req":
        http = Http(request_init=Http.RequestInit(
            id=sid, method=_method(f.method), scheme=_scheme(f.scheme),
            authority=f.authority.decode("latin-1"), path=f.path.decode("latin-1"), headers=_headers(e[3])))
    elif kind == "rsp":
        http = Http(response_init=Http.ResponseInit(
            id=sid, since_request_init=Duration.of_nanos(e[3]), http_status=e[4], headers=_headers(e[5])))
    else:
        eos = None
        if e[6] is not None:
            eos = tap_lite.Eos(grpc_status_code=e[6])
        elif e[7] is not None:
            eos = tap_lite.Eos(reset_error_code=e[7])
        http = Http(response_end=Http.ResponseEnd(
            id=sid, since_request_init=Duration.of_nanos(e[3]), since_response_init=Duration.of_nanos(e[4]),
            response_bytes=e[5], eos=eos, trailers=_headers(e[8])))
    body = http.SerializeToString()
    return _common(f) + b"\x1a" + _varint(len(body)) + body  # field 3 (http), length-delimited


def _in(a: Addr, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(a[0]) in net
    except ValueError:
        return False
