"""HTTP/1.1 through a real `tether proxy` process, with curl and raw sockets."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tether import native
from tether.testing.backend import BackendServer
from tether.testing.procs import ProxyProc, http_get, wait_for

pytestmark = pytest.mark.integration


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=timeout)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``; return everything received and whether the proxy closed the connection."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(timeout)
        s.sendall(data)
        out = b""
        closed = False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                out += chunk
        except TimeoutError:
            pass
        return out, closed


def one_shot_tcp_server(handle: Callable[[socket.socket], None]) -> tuple[socket.socket, int]:
    """A loopback TCP server that serves one connection with ``handle`` on a thread."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def run() -> None:
        c, _ = srv.accept()
        with c:
            handle(c)

    threading.Thread(target=run, daemon=True).start()
    return srv, srv.getsockname()[1]


@pytest.fixture
def inbound(proxies, backend: BackendServer) -> ProxyProc:  # type: ignore[no-untyped-def]
    port = backend.server_address[1]
    return proxies("in", inbound_app_addr=f"127.0.0.1:{port}", header_read_timeout="2s")


@pytest.fixture
def outbound(proxies, backend: BackendServer, backend2: BackendServer) -> ProxyProc:  # type: ignore[no-untyped-def]
    dst = proxies.destinations({
        "web.demo:80": [f"127.0.0.1:{backend.server_address[1]}", f"127.0.0.1:{backend2.server_address[1]}"],
    })
    return proxies("out", destinations_file=str(dst))


def test_get_through_inbound_and_keepalive_reuses_connections(inbound: ProxyProc) -> None:
    url = inbound.inbound + "/"
    r = curl("-w", "%{http_code} %{num_connects}\\n", url, url, url)
    lines = [ln for ln in r.stdout.splitlines() if ln and not ln.startswith("hello")]
    assert lines == ["200 1", "200 0", "200 0"], r.stdout + r.stderr


def test_outbound_balances_by_authority_across_endpoints(outbound: ProxyProc) -> None:
    seen = set()
    for _ in range(40):
        status, body = http_get(outbound.outbound + "/", headers={"Host": "web.demo:80"})
        assert status == 200
        seen.add(body.decode().strip())
    assert seen == {"hello from b1", "hello from b2"}


def test_l5d_dst_override_routes_and_is_not_forwarded(outbound: ProxyProc) -> None:
    status, body = http_get(outbound.outbound + "/headers",
                            headers={"Host": "other.example", "l5d-dst-override": "web.demo:80"})
    assert status == 200
    headers = json.loads(body)
    assert "l5d-dst-override" not in headers
    assert headers["host"] == "other.example"


def test_explicit_proxy_absolute_form_uses_discovery(outbound: ProxyProc) -> None:
    # HTTP_PROXY-style use of the outbound listener: the authority comes from the URL.
    r = curl("-x", outbound.outbound, "http://web.demo:80/")
    assert r.stdout.strip() in ("hello from b1", "hello from b2"), r.stderr


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "interpreted"])
def test_compiled_and_interpreted_hot_paths_serve_alike(proxies, backend: BackendServer,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path, pure: bool) -> None:
    env = {native.PURE_ENV: "1" if pure else "0"}
    p = proxies("in", env=env, inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}")
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(300_000))
    r = curl("-sS", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{src}", p.inbound + "/echo",
             "-o", str(tmp_path / "down.bin"), "-w", "%{http_code}")
    assert r.stdout == "200", r.stdout + r.stderr
    assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    status, _ = http_get(p.inbound + "/")
    assert status == 200
    expected = "hot path interpreted" if pure else "hot path compiled"
    assert expected in p.log(), p.log()


def test_chunked_and_content_length_bodies_stream_both_ways(inbound: ProxyProc, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    f = tmp_path / "body"
    f.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    r = curl("-X", "POST", "--data-binary", f"@{f}", inbound.inbound + "/echo", "-o", str(tmp_path / "o1"))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "o1").read_bytes()).hexdigest() == want
    r = curl("-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             inbound.inbound + "/echo", "-o", str(tmp_path / "o2"))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((tmp_path / "o2").read_bytes()).hexdigest() == want
    r = curl(inbound.inbound + "/bytes/1000000?chunked=1", "-o", str(tmp_path / "o3"))
    assert (tmp_path / "o3").stat().st_size == 1_000_000


def test_expect_100_continue(inbound: ProxyProc, tmp_path: Path) -> None:
    f = tmp_path / "body"
    f.write_bytes(b"z" * 200_000)
    r = curl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{f}", inbound.inbound + "/digest")
    assert json.loads(r.stdout)["bytes"] == 200_000
    assert "HTTP/1.1 100 Continue" in r.stderr


def test_head_response_keeps_connection_usable(inbound: ProxyProc) -> None:
    url = inbound.inbound
    r = curl("-w", "%{http_code} %{num_connects}\\n", "-I", url + "/bytes/5000", "--next",
             "-w", "%{http_code} %{num_connects}\\n", url + "/")
    assert "content-length: 5000" in r.stdout.lower()
    assert r.stdout.strip().endswith("200 0"), r.stdout


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400, b"missing Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"duplicate Host"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         400, b"Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400, b"chunked"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400, b"transfer-encoding"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, b"header"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, b"Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\nab", 400, b"Content-Length"),
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n", 400, b"chunk size"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, b"too large"),
    ],
    ids=["no-host", "dup-host", "cl-and-te", "te-not-chunked", "chunked-not-final", "space-before-colon",
         "dup-cl", "invalid-cl", "bad-chunk-size", "header-too-large"],
)
def test_rfc9112_violations_rejected_and_closed(inbound: ProxyProc, backend: BackendServer,
                                                request_bytes: bytes, status: int, reason: bytes) -> None:
    before = backend.requests
    out, closed = raw_exchange(inbound.inbound_port, request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert reason.lower() in out.lower()
    assert b"l5d-proxy-error:" in out
    assert closed, "the proxy must close the connection after a framing error"
    assert backend.requests == before, "nothing may reach the application"


def test_slow_headers_closed_at_header_timeout(inbound: ProxyProc) -> None:
    # One byte a second, like slowloris: the proxy (header timeout 2s) must close the connection
    # long before the whole head has been sent.
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 30 + b"\r\n\r\n"
    sent = 0
    got = b""
    with socket.create_connection(("127.0.0.1", inbound.inbound_port)) as s:
        s.settimeout(1.0)
        for b in head:
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            try:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
    assert sent < len(head), "connection stayed open for the whole slow head"
    assert got.startswith(b"HTTP/1.1 408"), got


def test_upstream_failures_map_to_502_with_reason(proxies) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connection refused
        p = proxies("in", inbound_app_addr=f"127.0.0.1:{dead}")
        r = curl("-i", p.inbound + "/")
    assert r.stdout.startswith("HTTP/1.1 502"), r.stdout
    assert "l5d-proxy-error: connect to 127.0.0.1" in r.stdout


def test_large_body_streams_with_bounded_rss(inbound: ProxyProc) -> None:
    # 200 MiB up and 200 MiB down through the proxy; its peak RSS must stay far below that.
    size = 200 * 1024 * 1024
    block = b"q" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", inbound.inbound_port)) as s:
        s.sendall(b"POST /digest HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            s.sendall(block)
        s.settimeout(30)
        resp = b""
        while b"}" not in resp:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
    assert json.loads(resp.split(b"\r\n\r\n", 1)[1])["bytes"] == size
    r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", inbound.inbound + f"/bytes/{size}"],
                       capture_output=True, text=True, timeout=120)
    assert int(r.stdout) == size
    hwm_kb = int(next(ln.split()[1] for ln in Path(f"/proc/{inbound.pid}/status").read_text().splitlines()
                      if ln.startswith("VmHWM")))
    assert hwm_kb < 120 * 1024, f"proxy peak RSS {hwm_kb} KiB while streaming 200 MiB"


def test_sigterm_lets_in_flight_requests_finish(proxies, backend: BackendServer) -> None:  # type: ignore[no-untyped-def]
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}")
    results: list[int] = []

    def slow() -> None:
        results.append(http_get(p.inbound + "/delay/1500", timeout=10)[0])

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    wait_for(lambda: backend.requests >= 5, 5, what="5 requests in flight")
    p.signal(15)
    for t in threads:
        t.join(10)
    assert results == [200] * 5
    assert p.wait(10) == 0


def test_websocket_echo_through_upgrade(proxies) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import websockets

    async def scenario() -> str:
        async def echo(ws):  # type: ignore[no-untyped-def]
            async for msg in ws:
                await ws.send(msg)

        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            p = await asyncio.to_thread(proxies, "ws", inbound_app_addr=f"127.0.0.1:{port}")
            async with websockets.connect(f"ws://127.0.0.1:{p.inbound_port}/chat") as ws:
                await ws.send("ping" * 1000)
                reply = await ws.recv()
                await ws.send(b"\x00binary")
                reply2 = await ws.recv()
            assert reply2 == b"\x00binary"
            return str(reply)

    assert asyncio.run(scenario()) == "ping" * 1000


def test_server_speaks_first_on_opaque_port(proxies) -> None:  # type: ignore[no-untyped-def]
    # A MySQL-like server that greets first: on an opaque port the proxy must not wait for the
    # client to speak (detection would stall 10 s).
    def serve(c: socket.socket) -> None:
        c.sendall(b"220 hello, I speak first\r\n")
        data = c.recv(100)
        c.sendall(b"you said " + data)
        c.shutdown(socket.SHUT_WR)

    srv, port = one_shot_tcp_server(serve)
    p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}", opaque_ports=str(port), detect_timeout="30s")
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(5)
        greeting = c.recv(100)
        assert greeting == b"220 hello, I speak first\r\n"
        c.sendall(b"QUIT")
        rest = b""
        while chunk := c.recv(100):
            rest += chunk
    assert rest == b"you said QUIT"
    srv.close()
    metrics = p.metrics()
    assert 'tcp_open_total{direction="inbound",peer="src"' in metrics


def test_dead_endpoint_is_ejected_and_probed_back_in(proxies, backend: BackendServer) -> None:  # type: ignore[no-untyped-def]
    from tether.testing.backend import start_in_thread

    spare = start_in_thread("b2")
    port2 = spare.server_address[1]
    dst = proxies.destinations({"web.demo:80": [f"127.0.0.1:{backend.server_address[1]}", f"127.0.0.1:{port2}"]})
    p = proxies("out", destinations_file=str(dst))
    get = lambda: http_get(p.outbound + "/", headers={"Host": "web.demo:80"})  # noqa: E731
    assert {get()[1] for _ in range(30)} == {b"hello from b1\n", b"hello from b2\n"}
    spare.kill()
    # Every request still succeeds: refused connections are retried on the live endpoint, and
    # the dead one is ejected by failure accrual.
    assert [get() for _ in range(60)] == [(200, b"hello from b1\n")] * 60
    # It comes back on the same port: after its penalty a real request probes it back in.
    revived = start_in_thread("b2", port=port2)
    try:
        wait_for(lambda: get()[1] == b"hello from b2\n", 30, what="revived endpoint probed back in")
    finally:
        revived.shutdown()
        revived.server_close()


def test_response_timeout_is_504_with_reason(proxies, backend: BackendServer) -> None:  # type: ignore[no-untyped-def]
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{backend.server_address[1]}", response_timeout="0.3s")
    r = curl("-i", p.inbound + "/delay/3000")
    assert r.stdout.startswith("HTTP/1.1 504"), r.stdout
    assert "l5d-proxy-error: response timeout after 0.3s" in r.stdout


def test_no_destination_endpoints_is_503_after_failfast(proxies) -> None:  # type: ignore[no-untyped-def]
    dst = proxies.destinations({"empty.demo:80": []})
    p = proxies("out", destinations_file=str(dst), failfast_timeout="0.3s")
    status, body = http_get(p.outbound + "/", headers={"Host": "empty.demo:80"})
    assert status == 503
    assert b"empty.demo:80" in body


def test_detection_timeout_falls_back_to_tcp(proxies) -> None:  # type: ignore[no-untyped-def]
    # A server-speaks-first protocol on a port nobody listed as opaque: the client waits, and
    # after the detection timeout the proxy forwards the connection as TCP.
    def serve(c: socket.socket) -> None:
        c.sendall(b"* OK IMAP-like greeting\r\n")
        c.recv(100)

    srv, port = one_shot_tcp_server(serve)
    p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}", detect_timeout="1s")
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(10)
        assert c.recv(100) == b"* OK IMAP-like greeting\r\n"
    srv.close()


def test_non_http_client_bytes_are_forwarded_as_tcp(proxies) -> None:  # type: ignore[no-untyped-def]
    def echo(c: socket.socket) -> None:
        while data := c.recv(65536):
            c.sendall(data)

    srv, port = one_shot_tcp_server(echo)
    p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}")
    payload = bytes(range(256)) * 1000
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(10)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)  # half-close: the echo must still come back
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    assert got == payload
    srv.close()


def test_tcp_byte_counters_move_while_the_connection_is_open(proxies) -> None:  # type: ignore[no-untyped-def]
    def echo(c: socket.socket) -> None:
        while data := c.recv(65536):
            c.sendall(data)

    srv, port = one_shot_tcp_server(echo)
    p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}", opaque_ports=str(port))
    payload = b"z" * 100_000
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(10)
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += c.recv(65536)

        def counted(name: str) -> float:
            for ln in p.metrics().splitlines():
                if ln.startswith(name + '{direction="inbound",peer="src"'):
                    return float(ln.split()[-1])
            return 0.0

        # Still open: a long-lived stream is visible in the counters before it ends.
        wait_for(lambda: counted("tcp_read_bytes_total") >= len(payload), 5, what="bytes read counted")
        assert counted("tcp_write_bytes_total") >= len(payload)
        assert counted("tcp_open_connections") == 1
    srv.close()


def _src_counter(p: ProxyProc, name: str, direction: str = "inbound") -> float:
    total = 0.0
    for ln in p.metrics().splitlines():
        if ln.startswith(name + f'{{direction="{direction}",peer="src"'):
            total += float(ln.split()[-1])
    return total


def test_http_connections_count_bytes_both_ways(inbound: ProxyProc) -> None:
    request = b"GET /bytes/5000 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    response = b""
    with socket.create_connection(("127.0.0.1", inbound.inbound_port)) as c:
        c.settimeout(10)
        c.sendall(request)
        while chunk := c.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    wait_for(lambda: _src_counter(inbound, "tcp_close_total") == 1, 10, what="connection closed in the metrics")
    assert _src_counter(inbound, "tcp_read_bytes_total") == len(request)
    assert _src_counter(inbound, "tcp_write_bytes_total") == len(response)


def test_h2_connections_count_bytes_both_ways(inbound: ProxyProc, tmp_path: Path) -> None:
    # (The backend speaks HTTP/1 only, so the proxy answers this h2 request itself: any answer
    # will do, the point is that the connection's bytes are counted both ways.)
    r = curl("-sS", "--http2-prior-knowledge", "-o", str(tmp_path / "body"), "-w", "%{http_version} %{size_download}",
             inbound.inbound + "/")
    version, size = r.stdout.split()
    assert version == "2", r.stdout + r.stderr
    wait_for(lambda: _src_counter(inbound, "tcp_close_total") == 1, 10, what="connection closed in the metrics")
    assert _src_counter(inbound, "tcp_read_bytes_total") > 24 + 9  # the preface, SETTINGS, HEADERS, ...
    assert _src_counter(inbound, "tcp_write_bytes_total") > int(size) + 9  # the body and its frames


def test_endless_upstream_response_head_is_cut_off_with_502(proxies) -> None:  # type: ignore[no-untyped-def]
    def endless(c: socket.socket) -> None:
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            for _ in range(200):  # bounded: 200 x 1 KiB header lines, far past the 64 KiB limit
                c.sendall(b"X-Junk: " + b"j" * 1024 + b"\r\n")
        except OSError:
            pass  # the proxy cut the connection, as it should

    srv, port = one_shot_tcp_server(endless)
    p = proxies("in", inbound_app_addr=f"127.0.0.1:{port}")
    r = curl("-i", p.inbound + "/")
    assert r.stdout.startswith("HTTP/1.1 502"), r.stdout[:300]
    assert "header block exceeds 65536 bytes" in r.stdout
    srv.close()

