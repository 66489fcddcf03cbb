"""Trace context in HTTP headers: W3C ``traceparent``, B3 single (``b3``) and B3 multi (``x-b3-*``).

Pure: headers in, a :class:`TraceContext` out; a context and a new span id in, the headers a proxy
forwards out (the same format the request came with, the new span as the parent of the next hop).
"""

from __future__ import annotations

import re
from typing import Final

Headers = list[tuple[bytes, bytes]]

W3C: Final = "w3c"
B3_SINGLE: Final = "b3"
B3_MULTI: Final = "b3multi"

_B3_MULTI_NAMES: Final = (b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags")
_HEX: Final = frozenset(b"0123456789abcdef")


class TraceContext:
    """A request's place in a trace: its trace, the span that sent it, and the sampling decision.

    A plain slotted class (built for every request that carries a context: a frozen dataclass's
    ``__init__`` costs several times more)."""

    __slots__ = ("format", "sampled", "span_id", "trace_id", "trace_id_len")

    def __init__(self, trace_id: bytes, span_id: bytes, sampled: bool | None, format: str,
                 trace_id_len: int = 16) -> None:
        self.trace_id = trace_id  # 16 bytes (a 64-bit B3 id is left-padded with zeros)
        self.span_id = span_id  # 8 bytes: the caller's span, the parent of ours
        self.sampled = sampled  # None: the caller left the decision to us
        self.format = format  # W3C, B3_SINGLE or B3_MULTI: how it came, and how it goes on
        self.trace_id_len = trace_id_len  # bytes the caller used (B3 allows 8): kept when forwarding

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceContext) and (
            self.trace_id, self.span_id, self.sampled, self.format, self.trace_id_len) == (
            other.trace_id, other.span_id, other.sampled, other.format, other.trace_id_len)

    def __repr__(self) -> str:
        return (f"TraceContext({self.trace_id.hex()}, {self.span_id.hex()}, sampled={self.sampled}, "
                f"{self.format})")


def _hex(v: bytes, sizes: tuple[int, ...]) -> bytes | None:
    v = v.strip().lower()
    if len(v) not in sizes or not set(v) <= _HEX:
        return None
    raw = bytes.fromhex(v.decode())
    return None if not any(raw) else raw


_TRACEPARENT: Final = re.compile(rb"\s*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\s*", re.I | re.S)


def _w3c(value: bytes) -> TraceContext | None:
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags, rest = m.groups()
    if version.lower() == b"ff" or (version == b"00" and rest):
        return None
    trace = bytes.fromhex(trace_hex.decode())
    span = bytes.fromhex(span_hex.decode())
    if not any(trace) or not any(span):
        return None
    return TraceContext(trace, span, bool(int(flags, 16) & 1), W3C)


def _sampled(v: bytes | None) -> bool | None:
    if v is None:
        return None
    v = v.strip().lower()
    if v in (b"1", b"true", b"d"):
        return True
    if v in (b"0", b"false"):
        return False
    return None


def _b3_single(value: bytes) -> TraceContext | None:
    parts = value.strip().split(b"-")
    if len(parts) < 2:
        return None  # "0" alone (deny) or "1"/"d" alone carries no ids to propagate
    trace = _hex(parts[0], (16, 32))
    span = _hex(parts[1], (16,))
    if trace is None or span is None:
        return None
    sampled = _sampled(parts[2]) if len(parts) > 2 else None
    return TraceContext(trace.rjust(16, b"\0"), span, sampled, B3_SINGLE, len(trace))


def extract(headers: Headers) -> TraceContext | None:
    """The request's trace context: traceparent first, then b3, then x-b3-*; None when it has none."""
    traceparent = b3 = None
    multi: dict[bytes, bytes] = {}
    for k, v in headers:
        if k == b"traceparent":
            traceparent = v
        elif k == b"b3":
            b3 = v
        elif k in _B3_MULTI_NAMES:
            multi[k] = v
    if traceparent is not None:
        ctx = _w3c(traceparent)
        if ctx is not None:
            return ctx
    if b3 is not None:
        ctx = _b3_single(b3)
        if ctx is not None:
            return ctx
    if b"x-b3-traceid" in multi and b"x-b3-spanid" in multi:
        trace = _hex(multi[b"x-b3-traceid"], (16, 32))
        span = _hex(multi[b"x-b3-spanid"], (16,))
        if trace is not None and span is not None:
            sampled = True if multi.get(b"x-b3-flags", b"").strip() == b"1" else _sampled(multi.get(b"x-b3-sampled"))
            return TraceContext(trace.rjust(16, b"\0"), span, sampled, B3_MULTI, len(trace))
    return None


def _without(headers: Headers, names: tuple[bytes, ...]) -> Headers:
    return [(k, v) for k, v in headers if k not in names]


def inject(headers: Headers, ctx: TraceContext, span_id: bytes, sampled: bool) -> Headers:
    """The headers to forward: the same trace, our span ``span_id`` as the next hop's parent, in the
    format the request came with (W3C for a trace this proxy starts)."""
    trace = ctx.trace_id[-ctx.trace_id_len:].hex().encode()
    span = span_id.hex().encode()
    flag = b"1" if sampled else b"0"
    if ctx.format == B3_SINGLE:
        out = _without(headers, (b"b3",))
        out.append((b"b3", b"-".join((trace, span, flag, ctx.span_id.hex().encode()))))
        return out
    if ctx.format == B3_MULTI:
        out = _without(headers, _B3_MULTI_NAMES)
        out += [(b"x-b3-traceid", trace), (b"x-b3-spanid", span), (b"x-b3-parentspanid", ctx.span_id.hex().encode()),
                (b"x-b3-sampled", flag)]
        return out
    out = _without(headers, (b"traceparent",))
    out.append((b"traceparent", b"00-" + trace + b"-" + span + (b"-01" if sampled else b"-00")))
    return out
