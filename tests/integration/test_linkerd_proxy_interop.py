"""What Linkerd's proxy sends, tether's inbound proxy takes: HTTP/1 requests that a Linkerd proxy
carried over HTTP/2 (the l5d-orig-proto header) reach an HTTP/1 application as HTTP/1 again.

Real processes: tether's proxy, an HTTP/1.1-only application, curl as the HTTP/2 client sending
what linkerd2-proxy's outbound side sends.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.backend import BackendServer, start_in_thread
from tether.testing.procs import ProxyProc, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def inbound(tmp_path: Path) -> Iterator[tuple[ProxyProc, BackendServer]]:
    app = start_in_thread("web")
    port = free_port()
    proxy = ProxyProc(tmp_path, inbound_port=port, inbound_app_addr=f"127.0.0.1:{app.server_address[1]}")
    try:
        proxy.wait_ready()
        yield proxy, app
    finally:
        proxy.stop()
        app.shutdown()


def h2_request(proxy: ProxyProc, path: str, *headers: str) -> tuple[int, dict[str, str], str]:
    """curl over HTTP/2 (prior knowledge) to the inbound listener: status, response headers, body."""
    args = ["curl", "-s", "-i", "--http2-prior-knowledge", "--max-time", "10"]
    for h in headers:
        args += ["-H", h]
    r = subprocess.run([*args, f"http://{proxy.host}:{proxy.inbound_port}{path}"], capture_output=True,
                       text=True, timeout=30)
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    assert lines and lines[0].startswith("HTTP/2"), (r.stdout, r.stderr)
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, fields, body


def test_an_upgraded_http1_request_reaches_the_application_as_http1(inbound: tuple[ProxyProc, BackendServer]) -> None:
    proxy, _ = inbound
    status, fields, body = h2_request(proxy, "/headers", "l5d-orig-proto: HTTP/1.1")
    assert status == 200, (fields, body)
    assert fields["x-request-version"] == "HTTP/1.1" and fields["x-request-target"] == "/headers"
    # The header is the proxies' business: the application never sees it; the response names its protocol.
    assert "l5d-orig-proto" not in json.loads(body)
    assert fields["l5d-orig-proto"] == "HTTP/1.1"


def test_an_absolute_form_request_keeps_its_absolute_target(inbound: tuple[ProxyProc, BackendServer]) -> None:
    proxy, _ = inbound
    status, fields, _ = h2_request(proxy, "/headers", "l5d-orig-proto: HTTP/1.1; absolute-form",
                                   "Host: web.default.svc.cluster.local")
    # (The test application routes by origin-form path: an absolute target is a 404 to it.)
    assert status == 404
    assert fields["x-request-target"] == "http://web.default.svc.cluster.local/headers", fields


def test_without_the_header_an_http2_request_stays_http2(inbound: tuple[ProxyProc, BackendServer]) -> None:
    proxy, app = inbound
    before = app.requests
    status, fields, _ = h2_request(proxy, "/headers")
    # HTTP/2 goes to the application as HTTP/2 (gRPC needs it): this HTTP/1-only one cannot answer.
    assert status == 502, fields
    assert "l5d-proxy-error" in fields
    assert app.requests == before
    status, _, _ = h2_request(proxy, "/headers", "l5d-orig-proto: HTTP/3")  # a value it does not know
    assert status == 502
