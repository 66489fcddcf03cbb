"""The admin server on a real loopback socket, driven by curl and the standard library's clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tether.proxy.admin import AdminServer, is_loopback
from tether.proxy.config import ProxyConfig
from tether.proxy.logging import LogControl
from tether.proxy.metrics import MetricsRegistry

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")


@dataclass
class Admin:
    server: AdminServer
    loop: asyncio.AbstractEventLoop
    port: int
    ready: threading.Event = field(default_factory=threading.Event)
    shutdowns: list[float] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body)
            rsp = conn.getresponse()
            return rsp.status, {k.lower(): v for k, v in rsp.getheaders()}, rsp.read()
        finally:
            conn.close()


@contextmanager
def running_admin(**settings: object) -> Iterator[Admin]:
    """An admin server on 127.0.0.1:<free port>, its loop in a thread of this process."""
    config = ProxyConfig(admin_addr=("127.0.0.1", 0))
    for k, v in settings.items():
        setattr(config, k, v)
    registry = MetricsRegistry()
    m = registry.http("inbound", ("127.0.0.1", 8080), authority="web.ns:8080")
    m.requests += 5
    m.status(200).latency.observe(2.5)
    m.status(200).response("success").count += 5
    root_level = logging.getLogger().level
    control = LogControl("warn,tether=info")
    loop = asyncio.new_event_loop()
    holder: dict[str, Admin] = {}

    def identity() -> dict[str, str]:
        return {"name": "web.ns.serviceaccount.identity.linkerd.cluster.local", "state": "ready"}

    def shutdown() -> None:
        holder["admin"].shutdowns.append(time.monotonic())

    server = AdminServer(
        config,
        registry,
        control,
        ready=lambda: holder["admin"].ready.is_set(),
        shutdown=shutdown,
        identity=identity,
    )
    thread = threading.Thread(target=loop.run_forever, name="admin-loop", daemon=True)
    thread.start()
    try:
        _, port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        holder["admin"] = Admin(server, loop, port)
        yield holder["admin"]
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        control.set("warn")
        logging.getLogger("tether").setLevel(logging.NOTSET)
        logging.getLogger().setLevel(root_level)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20, check=False
    )


@pytest.fixture
def admin() -> Iterator[Admin]:
    with running_admin() as a:
        yield a


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_metrics_scraped_with_curl_parse_as_prometheus_text(admin: Admin) -> None:
    out = curl("-D", "-", f"{admin.base}/metrics")
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert "content-type: text/plain; version=0.0.4" in head.lower()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert {"request", "response", "response_latency_ms", "process_resident_memory_bytes"} <= set(families)
    [req] = families["request"].samples
    assert req.value == 5 and req.labels["authority"] == "web.ns:8080"


def test_ready_follows_the_readiness_callable(admin: Admin) -> None:
    status, _, body = admin.request("GET", "/ready")
    assert (status, body) == (503, b"not ready\n")
    admin.ready.set()
    status, _, body = admin.request("GET", "/ready")
    assert (status, body) == (200, b"ready\n")
    assert admin.request("GET", "/live")[::2] == (200, b"live\n")


def test_env_json_identity_json_and_unknown_paths(admin: Admin) -> None:
    status, headers, body = admin.request("GET", "/env.json")
    assert status == 200 and headers["content-type"] == "application/json"
    env = json.loads(body)
    assert env["TETHER_PROXY_ADMIN_ADDR"] == "127.0.0.1:0"
    assert env["TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN"] == "false"
    status, _, body = admin.request("GET", "/identity.json")
    assert status == 200 and json.loads(body)["state"] == "ready"
    status, _, body = admin.request("GET", "/nope")
    assert (status, body) == (404, b"not found: /nope\n")
    status, headers, body = admin.request("POST", "/metrics")
    assert status == 405 and headers["allow"] == "GET" and b"method not allowed" in body


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_log_level_get_and_put_from_loopback(admin: Admin) -> None:
    out = curl(f"{admin.base}/proxy-log-level")
    assert out.stdout == "warn,tether=info\n"
    out = curl(
        "-X",
        "PUT",
        "--data",
        "info,tether.proxy=debug",
        "-w",
        "%{http_code}",
        f"{admin.base}/proxy-log-level",
    )
    assert out.stdout == "204"
    assert logging.getLogger("tether.proxy.http").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("tether").level == logging.NOTSET  # no longer named: inherits
    assert curl(f"{admin.base}/proxy-log-level").stdout == "info,tether.proxy=debug\n"
    out = curl(
        "-X", "PUT", "--data", "info,tether=chatty", "-w", "\n%{http_code}", f"{admin.base}/proxy-log-level"
    )
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "400"
    assert "'tether=chatty': unknown level 'chatty'" in body
    assert curl(f"{admin.base}/proxy-log-level").stdout == "info,tether.proxy=debug\n"


def test_shutdown_is_off_by_default(admin: Admin) -> None:
    status, _, body = admin.request("POST", "/shutdown")
    assert status == 404 and b"not enabled" in body
    assert admin.shutdowns == []


def test_shutdown_when_enabled_calls_back_after_responding() -> None:
    with running_admin(enable_admin_shutdown=True) as admin:
        assert admin.request("GET", "/shutdown")[0] == 405
        status, _, body = admin.request("POST", "/shutdown")
        assert (status, body) == (200, b"shutdown\n")
        deadline = time.monotonic() + 5
        while not admin.shutdowns and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(admin.shutdowns) == 1


def test_changes_refused_from_non_loopback_peers(admin: Admin) -> None:
    # A real non-loopback peer needs a second host; the route logic takes the peer address.
    admin.server.config.enable_admin_shutdown = True

    async def ask(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        rsp = await admin.server.handle(method, path, body, "10.1.2.3")
        return rsp.status, rsp.body

    put = asyncio.run_coroutine_threadsafe(ask("PUT", "/proxy-log-level", b"trace"), admin.loop).result(10)
    assert put == (403, b"log level changes are accepted from localhost only\n")
    down = asyncio.run_coroutine_threadsafe(ask("POST", "/shutdown", b""), admin.loop).result(10)
    assert down == (403, b"shutdown is accepted from localhost only\n")
    assert admin.shutdowns == []
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.2")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1")


def test_keep_alive_serves_several_requests_on_one_connection(admin: Admin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=10)
    try:
        conn.request("GET", "/live")
        first = conn.getresponse()
        assert first.read() == b"live\n"
        sock = conn.sock
        conn.request("GET", "/proxy-log-level")
        assert conn.getresponse().read() == b"warn,tether=info\n"
        assert conn.sock is sock
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_bounds_header_size_body_size_and_malformed_requests() -> None:
    with running_admin(max_header_bytes=1024) as admin:
        big = b"GET /live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
        rsp = raw(admin.port, big)
        assert rsp.startswith(b"HTTP/1.1 431 ") and b"larger than 1024 bytes" in rsp
        rsp = raw(admin.port, b"PUT /proxy-log-level HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
        assert rsp.startswith(b"HTTP/1.1 413 ")
        rsp = raw(admin.port, b"GARBAGE\r\n\r\n")
        assert rsp.startswith(b"HTTP/1.1 400 ") and b"malformed request line" in rsp
        rsp = raw(admin.port, b"GET /live HTTP/1.1\r\nBad Header : x\r\n\r\n")
        assert rsp.startswith(b"HTTP/1.1 400 ") and b"malformed header line" in rsp
        rsp = raw(admin.port, b"PUT /proxy-log-level HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert rsp.startswith(b"HTTP/1.1 501 ")


def test_slow_client_is_closed_at_the_header_timeout() -> None:
    with running_admin(header_read_timeout=0.3) as admin:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", admin.port), timeout=10) as s:
            s.sendall(b"GET /live HTTP/1.1\r\n")  # the rest never comes
            assert s.recv(1024) == b""  # the server closed the connection
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 5


# -- the admin server of a real `tether proxy` process -------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_real_proxy_metrics_after_traffic_log_level_and_shutdown(proxies, backend) -> None:  # type: ignore[no-untyped-def]
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}", enable_admin_shutdown="true")
    for _ in range(3):
        out = curl("-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: web.ns:8080", p.inbound + "/")
        assert out.stdout == "200", out.stderr
    http_samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def scraped() -> bool:
        # The response is counted when its body ends, which may land just after curl returns.
        http_samples.clear()
        for fam in text_string_to_metric_families(curl(f"{p.admin}/metrics").stdout):
            for s in fam.samples:
                if s.labels.get("direction") == "inbound":
                    http_samples.setdefault(s.name, []).append((s.labels, s.value))
        responses = sum(v for _, v in http_samples.get("response_total", []))
        return responses == 3

    deadline = time.monotonic() + 10
    while not scraped():
        assert time.monotonic() < deadline, http_samples
        time.sleep(0.05)
    [(labels, requests)] = http_samples["request_total"]
    assert requests == 3 and labels["authority"] == "web.ns:8080" and labels["tls"] == "disabled"
    [(rlabels, _)] = http_samples["response_total"]
    assert (rlabels["status_code"], rlabels["classification"]) == ("200", "success")
    [(_, count)] = http_samples["response_latency_ms_count"]
    assert count == 3
    # The garbage-collector policy is on: start-up's objects were collected once and frozen.
    gc_samples = {(s.name, s.labels.get("generation")): s.value
                  for fam in text_string_to_metric_families(curl(f"{p.admin}/metrics").stdout) for s in fam.samples
                  if s.name.startswith(("python_gc_", "tether_gc_"))}
    assert gc_samples[("python_gc_collections_total", "2")] >= 1
    assert gc_samples[("tether_gc_frozen_objects", None)] > 10_000

    out = curl("-X", "PUT", "--data", "debug", "-w", "%{http_code}", f"{p.admin}/proxy-log-level")
    assert out.stdout == "204"
    assert curl(f"{p.admin}/proxy-log-level").stdout == "debug\n"

    out = curl("-X", "POST", "-w", "\n%{http_code}", f"{p.admin}/shutdown")
    assert out.stdout == "shutdown\n\n200"
    assert p.wait(15) == 0
