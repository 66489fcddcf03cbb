"""Tracing through two proxies into a real OpenTelemetry Collector (built by scripts/tools/build-otelcol.sh).

client -> proxy A (outbound, OTLP over gRPC) -> proxy B (inbound, OTLP over HTTP) -> backend echoing
its headers. The spans are read back from the collector's file exporter: a span per hop with the
caller's span as parent, the forwarded context naming the new span, in the format the request came
with (W3C traceparent, B3 single, B3 multi); an unsampled context gets no span and passes untouched;
a request without context starts a trace only where the sample rate says so.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.testing.backend import start_in_thread
from tether.testing.procs import Proc, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _otelcol() -> Path:
    r = subprocess.run([str(ROOT / "scripts/tools/build-otelcol.sh"), "--print-path"], capture_output=True, text=True,
                       check=True)
    path = Path(r.stdout.strip())
    if not path.exists():
        r = subprocess.run([str(ROOT / "scripts/tools/build-otelcol.sh")], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-2000:]
    return path


class Collector:
    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.out = tmp / "spans.jsonl"
        cfg = tmp / "otelcol.yaml"
        cfg.write_text(json.dumps({
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{host}:{self.grpc_port}"},
                                                 "http": {"endpoint": f"{host}:{self.http_port}"}}}},
            "exporters": {"file": {"path": str(self.out), "flush_interval": "100ms"}},
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}},
                        "telemetry": {"metrics": {"level": "none"}}},
        }))
        self.proc = Proc([str(_otelcol()), "--config", str(cfg)], tmp / "otelcol.log")
        wait_for(lambda: b"Everything is ready" in Path(tmp / "otelcol.log").read_bytes(), 30,
                 what="the collector to start")

    def spans(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.out.exists():
            return out
        for line in self.out.read_text().splitlines():
            doc = json.loads(line)
            for rs in doc.get("resourceSpans", []):
                res = {a["key"]: a["value"].get("stringValue") for a in rs.get("resource", {}).get("attributes", [])}
                for ss in rs.get("scopeSpans", []):
                    for s in ss.get("spans", []):
                        s["resource"] = res
                        s["attrs"] = {a["key"]: next(iter(a["value"].values())) for a in s.get("attributes", [])}
                        out.append(s)
        return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tether.testing.procs import ProxyProc

    tmp = tmp_path_factory.mktemp("tracing")
    col = Collector(tmp)
    backend = start_in_thread("traced")
    procs: list[Proc] = [col.proc]
    try:
        b = ProxyProc(tmp, name="b", inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}",
                      trace_collector=f"127.0.0.1:{col.http_port}", trace_collector_protocol="http",
                      trace_export_interval="100ms", trace_attributes="k8s.pod.name=b-0,k8s.namespace.name=demo",
                      log_level="warn,tether=info")
        procs.append(b)
        b.wait_ready()
        dst = tmp / "destinations.yaml"
        dst.write_text(json.dumps({"destinations": {"traced.demo:80": [f"127.0.0.1:{b.inbound_port}"]}}))
        a = ProxyProc(tmp, name="a", destinations_file=str(dst), trace_collector=f"127.0.0.1:{col.grpc_port}",
                      trace_export_interval="100ms", trace_sample_rate="1", log_level="warn,tether=info")
        procs.append(a)
        a.wait_ready()
        yield {"a": a, "b": b, "collector": col}
    finally:
        for p in reversed(procs):
            p.stop()
        backend.shutdown()


def _get(proxy: Any, path: str, headers: dict[str, str], via_outbound: bool = True) -> dict[str, str]:
    base = proxy.outbound if via_outbound else proxy.inbound
    req = urllib.request.Request(base + path, headers={"Host": "traced.demo", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.loads(r.read()))


def _trace_spans(col: Collector, trace_hex: str, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    def enough() -> bool:
        got[:] = [s for s in col.spans() if s["traceId"] == trace_hex]
        return len(got) >= count

    wait_for(enough, 15, what=f"{count} spans of trace {trace_hex}")
    return got


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.mark.parametrize("fmt", ["w3c", "b3", "b3multi"])
def test_a_sampled_trace_gets_a_span_per_hop_with_parents_kept(chain: dict[str, Any], fmt: str) -> None:
    trace = TRACE[:-3] + {"w3c": "001", "b3": "002", "b3multi": "003"}[fmt]
    sent = {"w3c": {"traceparent": f"00-{trace}-{PARENT}-01"},
            "b3": {"b3": f"{trace}-{PARENT}-1"},
            "b3multi": {"X-B3-TraceId": trace, "X-B3-SpanId": PARENT, "X-B3-Sampled": "1"}}[fmt]
    seen = _get(chain["a"], f"/headers/{fmt}", sent)
    spans = _trace_spans(chain["collector"], trace, 2)
    by_kind = {s["kind"]: s for s in spans}
    client, server = by_kind[3], by_kind[2]  # SPAN_KIND_CLIENT (proxy A outbound), SPAN_KIND_SERVER (B inbound)
    assert client["parentSpanId"] == PARENT
    assert server["parentSpanId"] == client["spanId"]
    assert client["spanId"] != server["spanId"]
    assert client["name"] == f"GET /headers/{fmt}" and server["attrs"]["http.status_code"] == "200"
    assert server["resource"]["k8s.pod.name"] == "b-0" and server["resource"]["service.name"] == "linkerd-proxy"
    # The application got the context in the format it was sent, naming B's span as its parent.
    if fmt == "w3c":
        assert seen["traceparent"] == f"00-{trace}-{server['spanId']}-01"
    elif fmt == "b3":
        assert seen["b3"] == f"{trace}-{server['spanId']}-1-{client['spanId']}"
    else:
        assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-parentspanid"], seen["x-b3-sampled"]) == \
            (trace, server["spanId"], client["spanId"], "1")


def test_unsampled_context_passes_untouched_and_no_context_follows_the_sample_rate(chain: dict[str, Any]) -> None:
    col: Collector = chain["collector"]
    trace = TRACE[:-3] + "00a"
    seen = _get(chain["a"], "/headers/unsampled", {"traceparent": f"00-{trace}-{PARENT}-00"})
    assert seen["traceparent"] == f"00-{trace}-{PARENT}-00"
    # Proxy B alone (sample rate 0): a request without context starts no trace.
    plain = _get(chain["b"], "/headers/plain", {}, via_outbound=False)
    assert "traceparent" not in plain
    # Proxy A (sample rate 1): a request without context starts one, and B continues it.
    started = _get(chain["a"], "/headers/started", {})
    _, new_trace, b_span, flags = started["traceparent"].split("-")
    assert flags == "01"
    spans = _trace_spans(col, new_trace, 2)
    root = next(s for s in spans if s["kind"] == 3)
    assert not root.get("parentSpanId") and next(s for s in spans if s["kind"] == 2)["spanId"] == b_span
    # Each proxy exports its spans in the order it recorded them, and the later trace has arrived: a span
    # recorded for the unsampled or the context-free request would be in the collector's file by now.
    assert not [s for s in col.spans() if s["traceId"] == trace]
    assert not [s for s in col.spans() if s.get("attrs", {}).get("http.path") == "/headers/plain"]
