"""Trace context headers (pure), the tracer's sampling and bounded buffer, and the access log's lines."""

from __future__ import annotations

import json
import re

from tether.core.tracecontext import B3_MULTI, B3_SINGLE, W3C, TraceContext, extract, inject
from tether.proxy.http.message import Request
from tether.proxy.layers.access_log import AccessLogWriter, format_line, timestamp
from tether.proxy.tracing import Tracer

T = "4bf92f3577b34da6a3ce929d0e0e4736"
S = "00f067aa0ba902b7"
NEW = bytes.fromhex("1111111111111111")


def test_w3c_traceparent_is_read_and_forwarded_with_our_span_as_parent() -> None:
    ctx = extract([(b"traceparent", f"00-{T}-{S}-01".encode()), (b"tracestate", b"k=v")])
    assert ctx == TraceContext(bytes.fromhex(T), bytes.fromhex(S), True, W3C)
    out = inject([(b"traceparent", b"x"), (b"tracestate", b"k=v")], ctx, NEW, True)
    assert (b"traceparent", f"00-{T}-{NEW.hex()}-01".encode()) in out and (b"tracestate", b"k=v") in out
    assert [k for k, _ in out].count(b"traceparent") == 1
    assert extract([(b"traceparent", f"00-{T}-{S}-00".encode())]).sampled is False  # type: ignore[union-attr]


def test_b3_single_keeps_a_64_bit_trace_id_and_names_the_parent() -> None:
    ctx = extract([(b"b3", f"{T[16:]}-{S}-1".encode())])
    assert ctx is not None and ctx.format == B3_SINGLE and ctx.trace_id_len == 8 and ctx.sampled
    out = inject([(b"b3", b"old")], ctx, NEW, True)
    assert out == [(b"b3", f"{T[16:]}-{NEW.hex()}-1-{S}".encode())]
    assert extract([(b"b3", f"{T}-{S}-d".encode())]).sampled is True  # type: ignore[union-attr]  # debug
    assert extract([(b"b3", f"{T}-{S}".encode())]).sampled is None  # type: ignore[union-attr]  # deferred


def test_b3_multi_headers_and_the_debug_flag() -> None:
    h = [(b"x-b3-traceid", T.encode()), (b"x-b3-spanid", S.encode()), (b"x-b3-sampled", b"0"), (b"x-b3-flags", b"1")]
    ctx = extract(h)
    assert ctx is not None and ctx.format == B3_MULTI and ctx.sampled is True  # flags=1 (debug) wins
    out = dict(inject(h, ctx, NEW, True))
    assert out == {b"x-b3-traceid": T.encode(), b"x-b3-spanid": NEW.hex().encode(), b"x-b3-parentspanid": S.encode(),
                   b"x-b3-sampled": b"1"}


def test_malformed_or_all_zero_contexts_are_ignored() -> None:
    for bad in ([(b"traceparent", b"00-" + b"0" * 32 + b"-" + S.encode() + b"-01")],
                [(b"traceparent", b"ff-" + T.encode() + b"-" + S.encode() + b"-01")],
                [(b"traceparent", b"00-xyz-" + S.encode() + b"-01")],
                [(b"b3", b"0")], [(b"b3", b"nothex-" + S.encode())],
                [(b"x-b3-traceid", T.encode())]):
        assert extract(bad) is None, bad
    # A bad traceparent falls back to a good b3.
    assert extract([(b"traceparent", b"garbage"), (b"b3", f"{T}-{S}-1".encode())]).format == B3_SINGLE  # type: ignore[union-attr]


def test_tracer_samples_by_rate_and_drops_spans_beyond_its_buffer() -> None:
    draws = iter([0.05, 0.5])
    t = Tracer("127.0.0.1:4317", sample_rate=0.1, max_buffered=2, uniform=lambda: next(draws))
    assert t.sample_new() and not t.sample_new()
    assert not Tracer("127.0.0.1:4317", sample_rate=0.0).sample_new()
    span = (bytes(16), NEW, b"", "GET /", 2, 1, 2, (), False)
    for _ in range(5):
        t.record(span)
    assert len(t.buffer) == 2 and t.dropped == 3
    assert "tether_trace_spans_dropped_total 3" in t.lines()


def _req(version: str = "1.1") -> Request:
    from tether.proxy.http.message import Connection

    req = Request(b"GET", b"/ping?x=1", b"web.demo:8080", headers=[
        (b"host", b"web.demo:8080"), (b"user-agent", b"curl/8.5.0"), (b"x-b3-traceid", b"abc"),
        (b"content-length", b"0")], version=version,
        conn=Connection("inbound", ("10.42.0.1", 43682), ("10.42.0.2", 4143)))
    return req


def test_access_log_lines_have_linkerds_fields_and_format() -> None:
    start = 1661286503_049685223  # 2022-08-23T20:28:23.049685223Z
    assert timestamp(start) == "2022-08-23T20:28:23.049685223Z"
    entry = ("10.42.0.1:43682", "-", start, _req(), 200, "12", 1500)
    assert format_line("apache", entry) == \
        '10.42.0.1:43682 - - [2022-08-23T20:28:23.049685223Z] "GET /ping?x=1 HTTP/1.1" 200'
    h2 = ("10.42.0.63:51160", "traffic.booksapp.serviceaccount.identity.linkerd.cluster.local", start, _req("2"), 303,
          "", 99)
    assert format_line("apache", h2) == (
        "10.42.0.63:51160 traffic.booksapp.serviceaccount.identity.linkerd.cluster.local - "
        '[2022-08-23T20:28:23.049685223Z] "GET http://web.demo:8080/ping?x=1 HTTP/2.0" 303')
    doc = json.loads(format_line("json", entry))
    assert list(doc) == ["client.addr", "client.id", "timestamp", "method", "uri", "version", "trace_id",
                         "request_bytes", "status", "response_bytes", "total_ns", "processing_ns", "user_agent", "host"]
    assert doc == {"client.addr": "10.42.0.1:43682", "client.id": "-", "timestamp": "2022-08-23T20:28:23.049685223Z",
                   "method": "GET", "uri": "/ping?x=1", "version": "HTTP/1.1", "trace_id": "abc", "request_bytes": "0",
                   "status": 200, "response_bytes": "12", "total_ns": "1500", "processing_ns": "1500",
                   "user_agent": "curl/8.5.0", "host": "web.demo:8080"}


def test_access_log_writer_drops_and_counts_when_full() -> None:
    w = AccessLogWriter("apache", None, max_lines=3)  # not started: nothing drains the queue
    for _ in range(5):
        w.emit(("1.2.3.4:5", "-", 0, _req(), 200, "", 1))
    assert w.dropped == 2
    assert re.search(r"tether_access_log_lines_dropped_total 2$", "\n".join(w.lines()), re.M)


def test_span_batches_are_otlp_protobuf_as_the_generated_classes_read_them() -> None:
    from tether.api.gen import otlp_trace_pb2 as pb

    t = Tracer("127.0.0.1:4317", service_name="linkerd-proxy", attributes=(("k8s.pod.name", "web-0"),))
    start, end = 1_700_000_000_000_000_000, 1_700_000_000_000_500_000
    spans = [(bytes.fromhex(T), NEW, bytes.fromhex(S), "GET /x", 3, start, end,
              (("http.method", "GET"), ("http.status_code", 503), ("ok", True)), True),
             (bytes.fromhex(T), bytes.fromhex("2222222222222222"), b"", "POST /y", 2, 5, 6, (), False)]
    req = pb.ExportTraceServiceRequest()
    req.ParseFromString(t.encode(spans))
    (rs,) = req.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes} == {"service.name": "linkerd-proxy",
                                                                            "k8s.pod.name": "web-0"}
    (ss,) = rs.scope_spans
    assert ss.scope.name == "tether-proxy"
    a, b = ss.spans
    assert (a.trace_id.hex(), a.span_id, a.parent_span_id.hex(), a.name, a.kind) == (T, NEW, S, "GET /x", 3)
    assert (a.start_time_unix_nano, a.end_time_unix_nano) == (1_700_000_000_000_000_000, 1_700_000_000_000_500_000)
    attrs = {kv.key: kv.value for kv in a.attributes}
    assert attrs["http.method"].string_value == "GET" and attrs["http.status_code"].int_value == 503
    assert attrs["ok"].bool_value is True and a.status.code == pb.Status.STATUS_CODE_ERROR
    assert b.parent_span_id == b"" and b.status.code == pb.Status.STATUS_CODE_UNSET and b.kind == 2
