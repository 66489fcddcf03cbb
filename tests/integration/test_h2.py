"""HTTP/2 codecs end to end: real clients (curl, grpcio, h2load, a raw h2 client) through a forwarding
harness (H2ServerProtocol whose Service sends each request on an H2ClientConnection) to real
upstreams (nginx with h2c, a grpcio server).

The harness runs in its own process (``python tests/integration/test_h2.py --upstream HOST:PORT``),
so its RSS is measured alone and h2load can load it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# -- the forwarding harness (runs in a subprocess) ---------------------------------------------------


def harness_main(argv: list[str]) -> None:
    import uvloop

    from tether.proxy.config import ProxyConfig
    from tether.proxy.http.h2client import H2ClientConnection
    from tether.proxy.http.h2server import H2ServerProtocol
    from tether.proxy.http.message import Connection, Request, Response

    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--connections", type=int, default=1)
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    config = ProxyConfig.from_env()
    if "TETHER_TEST_H2_CLOSED_STREAMS" in os.environ:  # to measure h2's own default cache
        from tether.proxy.http.h2conn import BoundedH2Connection

        BoundedH2Connection.MAX_CLOSED_STREAMS = int(os.environ["TETHER_TEST_H2_CLOSED_STREAMS"])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients: list[H2ClientConnection | None] = [None] * args.connections
        lock = asyncio.Lock()
        rr = 0

        async def client() -> H2ClientConnection:
            nonlocal rr
            rr = (rr + 1) % len(clients)
            c = clients[rr]
            if c is not None and c.usable:
                return c
            async with lock:
                c = clients[rr]
                if c is None or not c.usable:
                    _, c = await loop.create_connection(lambda: H2ClientConnection(config), host, int(port))
                    clients[rr] = c
                return c

        async def forward(req: Request) -> Response:
            for attempt in range(3):
                c = await client()
                try:
                    return await c.send(req)
                except Exception as e:
                    if getattr(e, "retryable", False) and attempt < 2:
                        continue
                    raise
            raise AssertionError("unreachable")

        servers: list[H2ServerProtocol] = []

        def factory() -> H2ServerProtocol:
            p = H2ServerProtocol(forward, Connection("inbound", ("?", 0), ("?", 0), protocol="h2"), config)
            servers.append(p)
            return p

        srv = await loop.create_server(factory, "127.0.0.1", 0)
        print(srv.sockets[0].getsockname()[1], flush=True)
        stop = loop.create_future()
        loop.add_signal_handler(15, stop.set_result, None)
        await stop
        srv.close()
        await asyncio.gather(*(s.drain(5.0) for s in servers))

    uvloop.run(main())


# -- fixtures -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], object], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def wait_port(port: int, deadline: float = 10.0) -> None:
    def ok() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(ok, deadline, f"port {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Harness:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


@contextlib.contextmanager
def harness(upstream_port: int, **env: str) -> Iterator[Harness]:
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env)
    proc = subprocess.Popen(
        [PY, __file__, "--upstream", f"127.0.0.1:{upstream_port}"],
        stdout=subprocess.PIPE,
        text=True,
        env=e,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"harness did not start: {line!r}"
        yield Harness(proc, int(line))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def nginx() -> Iterator[tuple[int, Path]]:
    """nginx serving h2c (prior knowledge) static files from a temp dir."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        pytest.skip("nginx not installed")
    d = Path(tempfile.mkdtemp(prefix="tether-h2-nginx-"))
    d.chmod(0o755)  # nginx workers may run as another user
    www = d / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello over h2\n")
    with open(www / "big.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(50):
            f.write(block)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  http2_max_concurrent_streams 1000;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} http2;
    root {www};
    location /status418 {{ return 418 "teapot\\n"; }}
  }}
}}
"""
    )
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(d)], stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield port, www
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


# -- gRPC test service (generic handlers, no codegen) ---------------------------------------------------

SERVICE = "tether.test.Echo"


def _ident(b: bytes) -> bytes:
    return b


class EchoServer:
    def __init__(self) -> None:
        import grpc

        self.grpc = grpc
        self.active = 0
        self.max_active = 0
        self.cancelled = threading.Event()
        self.stream_started = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=200),
            options=[
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20),
                ("grpc.max_concurrent_streams", 1000),
            ],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, _ident, _ident),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, _ident, _ident),
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold, _ident, _ident),
            "Count": grpc.unary_stream_rpc_method_handler(self.count, _ident, _ident),
            "Forever": grpc.unary_stream_rpc_method_handler(self.forever, _ident, _ident),
            "Echo": grpc.stream_stream_rpc_method_handler(self.echo, _ident, _ident),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def unary(self, req: bytes, ctx: object) -> bytes:
        return b"echo:" + req

    def fail(self, req: bytes, ctx: object) -> bytes:
        ctx.set_trailing_metadata((("x-why", "because"),))  # type: ignore[attr-defined]
        ctx.abort(self.grpc.StatusCode.FAILED_PRECONDITION, "nope: " + req.decode())  # type: ignore[attr-defined]
        raise AssertionError("abort returns never")

    def hold(self, req: bytes, ctx: object) -> bytes:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.release.wait(30)
        finally:
            with self._lock:
                self.active -= 1
        return req

    def count(self, req: bytes, ctx: object) -> Iterator[bytes]:
        for i in range(int(req)):
            yield str(i).encode()

    def forever(self, req: bytes, ctx: object) -> Iterator[bytes]:
        ctx.add_callback(self.cancelled.set)  # type: ignore[attr-defined]
        self.stream_started.set()
        while ctx.is_active():  # type: ignore[attr-defined]
            yield b"tick"
            time.sleep(0.01)

    def echo(self, reqs: Iterator[bytes], ctx: object) -> Iterator[bytes]:
        yield from reqs

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture()
def echo() -> Iterator[EchoServer]:
    s = EchoServer()
    try:
        yield s
    finally:
        s.stop()


def channel(port: int):  # type: ignore[no-untyped-def]
    import grpc

    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
    )


def method(ch, kind: str, name: str):  # type: ignore[no-untyped-def]
    f = getattr(ch, kind)
    return f(f"/{SERVICE}/{name}", request_serializer=_ident, response_deserializer=_ident)


pytestmark = pytest.mark.integration


# -- curl ----------------------------------------------------------------------------------------------


def test_curl_http2_prior_knowledge(nginx: tuple[int, Path]) -> None:
    port, _ = nginx
    with harness(port) as h:
        out = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-D", "-", f"http://127.0.0.1:{h.port}/hello.txt"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("HTTP/2 200"), out.stdout
        assert out.stdout.endswith("hello over h2\n")
        out = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
             f"http://127.0.0.1:{h.port}/status418"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert out.stdout == "418"


def test_large_download_bounded_rss(nginx: tuple[int, Path]) -> None:
    port, www = nginx
    with harness(port) as h, tempfile.TemporaryFile() as out:
        before = h.rss_kib
        curl = subprocess.Popen(
            ["curl", "-sS", "--http2-prior-knowledge", "--limit-rate", "100M", "-o", "-",
             f"http://127.0.0.1:{h.port}/big.bin"],
            stdout=out,
        )  # fmt: skip
        peak = before
        t0 = time.monotonic()
        while curl.poll() is None:
            peak = max(peak, h.rss_kib)
            time.sleep(0.02)  # sampling RSS, not synchronisation
        assert curl.wait(120) == 0
        out.seek(0)
        assert out.read() == (www / "big.bin").read_bytes()
        print(f"RSS before {before} KiB, peak during 50 MiB download {peak} KiB, {time.monotonic() - t0:.2f}s")
        assert peak - before < 20 * 1024, (before, peak)


# -- gRPC ----------------------------------------------------------------------------------------------


def test_grpc_unary_streaming_and_errors(echo: EchoServer) -> None:
    import grpc

    with harness(echo.port) as h, channel(h.port) as ch:
        assert method(ch, "unary_unary", "Unary")(b"hi", timeout=10) == b"echo:hi"
        got = list(method(ch, "unary_stream", "Count")(b"100", timeout=10))
        assert got == [str(i).encode() for i in range(100)]
        msgs = [f"m{i}".encode() * (i + 1) for i in range(50)]
        got = list(method(ch, "stream_stream", "Echo")(iter(msgs), timeout=10))
        assert got == msgs
        with pytest.raises(grpc.RpcError) as ei:
            method(ch, "unary_unary", "Fail")(b"x", timeout=10)
        err = ei.value
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details() == "nope: x"
        assert ("x-why", "because") in tuple(err.trailing_metadata())


def test_grpc_large_bidi_stream_bounded_rss(echo: EchoServer) -> None:
    """50 MiB up and 50 MiB down through one bidirectional stream; the harness RSS stays bounded."""
    with harness(echo.port) as h, channel(h.port) as ch:
        before = h.rss_kib
        block = os.urandom(1 << 20)
        peak = [before]
        n = 0
        t0 = time.monotonic()
        for msg in method(ch, "stream_stream", "Echo")((block for _ in range(50)), timeout=120):
            assert msg == block
            n += 1
            if n % 5 == 0:
                peak.append(h.rss_kib)
        assert n == 50
        print(f"RSS before {before} KiB, peak during 50+50 MiB bidi {max(peak)} KiB, {time.monotonic() - t0:.2f}s")
        assert max(peak) - before < 24 * 1024, (before, peak)


def test_client_cancel_resets_upstream(echo: EchoServer) -> None:
    with harness(echo.port) as h, channel(h.port) as ch:
        call = method(ch, "unary_stream", "Forever")(b"", timeout=30)
        assert next(call) == b"tick"
        assert echo.stream_started.wait(10)
        call.cancel()  # grpcio sends RST_STREAM(CANCEL)
        assert echo.cancelled.wait(10), "upstream stream was not cancelled"


def test_max_concurrent_streams_enforced(echo: EchoServer) -> None:
    with harness(echo.port, TETHER_PROXY_H2_MAX_CONCURRENT_STREAMS="10") as h, channel(h.port) as ch:
        hold = method(ch, "unary_unary", "Hold")
        futs = [hold.future(str(i).encode(), timeout=30) for i in range(40)]
        wait_for(lambda: echo.active >= 10, 10, "10 held calls upstream")
        # grpcio honours SETTINGS_MAX_CONCURRENT_STREAMS: the rest queue in the client.
        assert all(not f.done() for f in futs)
        assert echo.active == 10
        echo.release.set()
        assert sorted(f.result(timeout=30) for f in futs) == sorted(str(i).encode() for i in range(40))
        assert echo.max_active == 10


def test_sigterm_drain_finishes_in_flight_grpc_call(echo: EchoServer) -> None:
    with harness(echo.port) as h, channel(h.port) as ch:
        call = method(ch, "unary_unary", "Hold").future(b"in-flight", timeout=30)
        wait_for(lambda: echo.active == 1, 10, "call held upstream")
        h.proc.send_signal(15)  # the harness calls drain() on every H2ServerProtocol

        def refused() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", h.port)) != 0

        wait_for(refused, 10, "listener closed by SIGTERM")
        assert h.proc.poll() is None  # still draining: the call is in flight
        echo.release.set()
        assert call.result(timeout=20) == b"in-flight"
        assert h.proc.wait(20) == 0


def grpc_headers(name: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
        (b":path", f"/{SERVICE}/{name}".encode()), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]  # fmt: skip


def raw_h2_client(port: int):  # type: ignore[no-untyped-def]
    import h2.config
    import h2.connection

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def read_events(sock: socket.socket, conn, until: Callable[[list[object]], bool]) -> list[object]:  # type: ignore[no-untyped-def]
    import h2.exceptions

    events: list[object] = []
    end = time.monotonic() + 10
    while not until(events) and time.monotonic() < end:
        data = sock.recv(65536)
        if not data:
            break
        try:
            events.extend(conn.receive_data(data))
        except h2.exceptions.ProtocolError:
            break
        with contextlib.suppress(OSError):  # the proxy may have shut its side after a GOAWAY
            sock.sendall(conn.data_to_send())
    return events


def test_rapid_reset_gets_goaway(echo: EchoServer) -> None:
    import h2.events
    from h2.errors import ErrorCodes

    with harness(echo.port, TETHER_PROXY_H2_MAX_RESETS_PER_WINDOW="50") as h:
        sock, conn = raw_h2_client(h.port)
        with sock:
            headers = grpc_headers("Hold")
            sent = 0
            try:
                for _ in range(500):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, headers)
                    conn.reset_stream(sid, ErrorCodes.CANCEL)
                    sock.sendall(conn.data_to_send())
                    sent += 1
            except OSError:
                pass  # the proxy closed the connection mid-flood
            events = read_events(sock, conn, lambda evs: any(
                isinstance(e, h2.events.ConnectionTerminated) for e in evs))  # fmt: skip
            goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaways, f"no GOAWAY after {sent} resets"
            assert goaways[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        echo.release.set()


def test_streams_over_limit_refused_by_raw_client(echo: EchoServer) -> None:
    """A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS gets REFUSED_STREAM beyond the bound."""
    import h2.events
    import h2.settings
    from h2.errors import ErrorCodes

    with harness(echo.port, TETHER_PROXY_H2_MAX_CONCURRENT_STREAMS="5") as h:
        sock, conn = raw_h2_client(h.port)
        with sock:
            # Send 8 held calls before reading the proxy's SETTINGS, so h2 does not hold us back.
            for _ in range(8):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, grpc_headers("Hold"))
                conn.send_data(sid, b"\x00\x00\x00\x00\x01x", end_stream=True)
            sock.sendall(conn.data_to_send())

            def refused(evs: list[object]) -> list[h2.events.StreamReset]:
                return [e for e in evs if isinstance(e, h2.events.StreamReset)]

            events = read_events(sock, conn, lambda evs: len(refused(evs)) >= 3)
            settings = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
            mcs = settings.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
            assert mcs.new_value == 5
            assert [e.error_code for e in refused(events)] == [ErrorCodes.REFUSED_STREAM] * 3
            wait_for(lambda: echo.active == 5, 10, "5 calls upstream")
            assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
            echo.release.set()
            events = read_events(sock, conn, lambda evs: sum(
                isinstance(e, h2.events.StreamEnded) for e in evs) >= 5)  # fmt: skip
            assert sum(isinstance(e, h2.events.StreamEnded) for e in events) == 5
        assert echo.max_active == 5


def test_client_goaway_with_unknown_code_still_gets_ping_answered(echo: EchoServer) -> None:
    """RFC 9113 sections 6.8 and 7: after a client's GOAWAY (with an unknown error code, which must
    trigger nothing special) the proxy still answers a PING sent right behind it, in one write."""
    import h2.events

    with harness(echo.port) as h:
        sock, conn = raw_h2_client(h.port)
        with sock:
            read_events(sock, conn, lambda evs: any(isinstance(e, h2.events.SettingsAcknowledged) for e in evs))
            conn.close_connection(error_code=0xFF)
            ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"after-ga"  # raw: h2 sends nothing after GOAWAY
            sock.sendall(conn.data_to_send() + ping)
            data = b""
            end = time.monotonic() + 10
            while b"after-ga" not in data and time.monotonic() < end:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert b"\x00\x00\x08\x06\x01\x00\x00\x00\x00after-ga" in data, data[-200:]


# -- h2 memory: an idle server after 100k streams ---------------------------------------------------------


def test_idle_rss_after_100k_streams(nginx: tuple[int, Path]) -> None:
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load not installed")
    port, _ = nginx
    with harness(port) as h:
        idle = h.rss_kib
        out = subprocess.run(
            [h2load, "-n", "100000", "-c", "1", "-m", "50", f"http://127.0.0.1:{h.port}/hello.txt"],
            capture_output=True, text=True, timeout=280,
        )  # fmt: skip
        assert "100000 succeeded" in out.stdout, out.stdout
        after = h.rss_kib
        print(f"harness RSS idle {idle} KiB, after 100k streams on one connection {after} KiB")
        assert after - idle < 16 * 1024, (idle, after)


if __name__ == "__main__":
    harness_main(sys.argv[1:])
