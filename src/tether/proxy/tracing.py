"""Spans of proxied requests, exported with OTLP to the collector named by ``--trace-collector``.

The trace layer (:mod:`tether.proxy.layers.trace`) hands each finished span to :meth:`Tracer.record`,
which appends a tuple to a bounded buffer (full: the span is dropped and counted). A background task
sends the buffer in batches (``--trace-batch-spans``, or whatever is there every
``--trace-export-interval``) as an ``ExportTraceServiceRequest``: over gRPC
(``TraceService/Export``, the collector's 4317) or over HTTP (``POST /v1/traces``, protobuf, 4318).
Encoding and sending happen off the request path; a failed export drops its batch (counted) and the
next one is tried on schedule.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from tether.api.protolite import varint as _varint
from tether.proxy.config import ConfigError, ProxyConfig

log = logging.getLogger(__name__)

EXPORT_PATH: Final = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_PATH: Final = "/v1/traces"
SCOPE: Final = "tether-proxy"

# A finished span: (trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, attributes, error)
SpanRecord = tuple[bytes, bytes, bytes, str, int, int, int, tuple[tuple[str, Any], ...], bool]

KIND_SERVER: Final = 2  # inbound: the proxy serves the request for its application
KIND_CLIENT: Final = 3  # outbound: the proxy calls another service for its application


# -- OTLP protobuf, written by hand (opentelemetry-proto's field numbers; see api/otlp_trace.proto) ----------


def _field(num: int, data: bytes) -> bytes:
    """A length-delimited field (bytes, string, message)."""
    return _varint(num << 3 | 2) + _varint(len(data)) + data


_KEYS: dict[str, bytes] = {}
_ENCODED: dict[tuple[str, Any], bytes] = {}  # attribute (key, value) -> its Span.attributes field
_ENCODED_MAX: Final = 4096  # methods, paths, hosts, statuses repeat: a bounded memo of their encodings


def _attr(key: str, value: Any) -> bytes:
    item = (key, value)
    enc = _ENCODED.get(item)
    if enc is None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        enc = _ENCODED[item] = _field(9, _kv(key, value))
    return enc


def _kv(key: str, value: Any) -> bytes:
    """A KeyValue: key (1), value (2): AnyValue string_value (1), bool_value (2) or int_value (3)."""
    k = _KEYS.get(key)
    if k is None:
        k = _KEYS[key] = _field(1, key.encode())
    if isinstance(value, bool):
        any_value = b"\x10" + (b"\x01" if value else b"\x00")
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    else:
        any_value = _field(1, str(value).encode())
    return k + _field(2, any_value)


_STATUS_ERROR: Final = b"\x18\x02"  # Status.code (3) = STATUS_CODE_ERROR


def _span(s: SpanRecord) -> bytes:
    trace, span, parent, name, kind, start, end, attrs, error = s
    out = [_field(1, trace), _field(2, span)]
    if parent:
        out.append(_field(4, parent))
    out += [_field(5, name.encode()), b"\x30" + _varint(kind),
            b"\x39" + struct.pack("<Q", start), b"\x41" + struct.pack("<Q", end)]  # fixed64 fields 7, 8
    out += [_attr(k, v) for k, v in attrs]
    if error:
        out.append(_field(15, _STATUS_ERROR))
    return b"".join(out)


def parse_attributes(text: str | None, setting: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"{setting}: {part!r} is not key=value")
        out.append((k.strip(), v.strip()))
    return tuple(out)


class Tracer:
    """Sampling decisions, ids, and the bounded buffer of spans waiting for export."""

    def __init__(self, collector: str, protocol: str = "grpc", *, service_name: str = "linkerd-proxy",
                 attributes: tuple[tuple[str, str], ...] = (), sample_rate: float = 0.0, max_buffered: int = 2048,
                 batch: int = 512, interval: float = 1.0, timeout: float = 5.0,
                 rng: Callable[[int], bytes] | None = None, uniform: Callable[[], float] | None = None) -> None:
        host, sep, port = collector.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"--trace-collector: {collector!r} is not host:port")
        if protocol not in ("grpc", "http"):
            raise ConfigError(f"--trace-collector-protocol: {protocol!r} is not grpc or http")
        if not 0.0 <= sample_rate <= 1.0:
            raise ConfigError(f"--trace-sample-rate: {sample_rate!r} is not between 0 and 1")
        self.collector = collector
        self.host, self.port = host.strip("[]"), int(port)
        self.protocol = protocol
        self.service_name = service_name
        self.attributes = attributes
        self.sample_rate = sample_rate
        self.max_buffered = max_buffered
        self.batch = max(1, batch)
        self.interval = interval
        self.timeout = timeout
        # Trace and span ids need to be unique, not secret: the Mersenne Twister, seeded from the OS.
        fast = random.Random()
        self._rng = rng or (lambda n: fast.getrandbits(8 * n).to_bytes(n, "big"))
        self._uniform = uniform or random.random
        self.buffer: deque[SpanRecord] = deque()
        self._wake: asyncio.Event | None = None
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self._channel: Any = None

    # -- the request path ---------------------------------------------------------------------------------
    def sample_new(self) -> bool:
        """A request without trace context: does it start a sampled trace?"""
        rate = self.sample_rate
        return rate > 0.0 and (rate >= 1.0 or self._uniform() < rate)

    def new_id(self, n: int) -> bytes:
        while True:
            b = self._rng(n)
            if any(b):
                return b

    def record(self, span: SpanRecord) -> None:
        if len(self.buffer) >= self.max_buffered:
            self.dropped += 1
            return
        self.buffer.append(span)
        if len(self.buffer) >= self.batch and self._wake is not None:
            self._wake.set()

    # -- export, off the request path -----------------------------------------------------------------------
    def encode(self, spans: list[SpanRecord]) -> bytes:
        """The batch as a serialized ExportTraceServiceRequest, written field by field (building protobuf
        message objects cost ~28 us a span; this, a few)."""
        resource = b"".join(_field(1, _kv(k, v)) for k, v in (("service.name", self.service_name), *self.attributes))
        scope = _field(1, _field(1, SCOPE.encode()))
        body = b"".join(_field(2, _span(s)) for s in spans)
        resource_spans = _field(1, resource) + _field(2, scope + body)
        return _field(1, resource_spans)

    async def run(self) -> None:
        """Export batches until cancelled."""
        self._wake = asyncio.Event()
        try:
            while True:
                if len(self.buffer) < self.batch:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(self.interval):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                await self.flush()
        finally:
            if self._channel is not None:
                self._channel.close()

    async def flush(self) -> None:
        while self.buffer:
            n = min(self.batch, len(self.buffer))
            spans = [self.buffer.popleft() for _ in range(n)]
            try:
                await self._send(self.encode(spans))
                self.exported += n
            except Exception as e:  # the collector is down or refused: drop this batch, keep serving
                self.failed += n
                log.info("trace export of %d spans to %s failed: %s", n, self.collector, e)
                return

    async def _send(self, body: bytes) -> None:
        if self.protocol == "grpc":
            from tether.proxy.grpc_client import GrpcChannel

            if self._channel is None:
                self._channel = GrpcChannel(f"{self.host}:{self.port}", connect_timeout=self.timeout)
            await self._channel.unary(EXPORT_PATH, body, self.timeout)
            return
        await self._post(body)

    async def _post(self, body: bytes) -> None:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                head = f"POST {HTTP_PATH} HTTP/1.1\r\nhost: {self.host}:{self.port}".encode()
                writer.write(head + b"\r\ncontent-type: application/x-protobuf\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
                await writer.drain()
                status = await reader.readline()
                parts = status.split()
                if len(parts) < 2 or not parts[1].startswith(b"2"):
                    raise OSError(f"collector answered {status.decode('latin-1').strip() or 'nothing'}")
            finally:
                writer.close()

    def lines(self) -> list[str]:
        return ["# HELP tether_trace_spans_exported_total Spans sent to the trace collector.",
                "# TYPE tether_trace_spans_exported_total counter",
                f"tether_trace_spans_exported_total {self.exported}",
                "# HELP tether_trace_spans_dropped_total Spans dropped: the export buffer was full.",
                "# TYPE tether_trace_spans_dropped_total counter",
                f"tether_trace_spans_dropped_total {self.dropped}",
                "# HELP tether_trace_spans_failed_total Spans whose export the collector did not accept.",
                "# TYPE tether_trace_spans_failed_total counter",
                f"tether_trace_spans_failed_total {self.failed}"]


def tracer_from(cfg: ProxyConfig) -> Tracer | None:
    """The tracer --trace-collector asks for, or None (tracing off, the default)."""
    if not cfg.trace_collector:
        return None
    return Tracer(cfg.trace_collector, cfg.trace_collector_protocol, service_name=cfg.trace_service_name,
                  attributes=parse_attributes(cfg.trace_attributes, "--trace-attributes"),
                  sample_rate=cfg.trace_sample_rate, max_buffered=cfg.trace_max_buffered_spans,
                  batch=cfg.trace_batch_spans, interval=cfg.trace_export_interval, timeout=cfg.trace_export_timeout)
