"""Opaque TCP through a real proxy: zero-copy (os.splice) and the copying fallback behave alike.

Bulk streams both ways with half-close, a reader that stalls (backpressure), byte counters, and a
client that sends and closes before the upstream answered.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tether.testing.backend import tcp_server
from tether.testing.procs import ProxyProc, wait_for

pytestmark = pytest.mark.integration

MODES = {"zero-copy": "true", "copy": "false"}


def echo_until_eof(c: socket.socket) -> None:
    """Echo everything, half-close when the client half-closes, then say how much it saw."""
    total = 0
    while data := c.recv(1 << 16):
        total += len(data)
        c.sendall(data)
    c.sendall(b"|%d" % total)
    c.shutdown(socket.SHUT_WR)


@pytest.fixture(params=list(MODES), ids=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tcp_proxy(proxies, mode: str) -> Iterator[Callable[[int], ProxyProc]]:  # type: ignore[no-untyped-def]
    def start(app_port: int) -> ProxyProc:
        return proxies("tcp", inbound_app_addr=f"127.0.0.1:{app_port}", opaque_ports=str(app_port),
                       tcp_zero_copy=MODES[mode], log_level="warn,tether.proxy.server=debug")

    yield start


def splice_kind(p: ProxyProc) -> str:
    log = p.log()
    return "zero-copy" if "zero-copy splice" in log else "copy"


def test_bulk_stream_both_ways_with_half_close(tcp_proxy, mode: str) -> None:  # type: ignore[no-untyped-def]
    srv, port = tcp_server(echo_until_eof)
    p = tcp_proxy(port)
    payload = os.urandom(24 * 1024 * 1024 + 7)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(30)

        def send() -> None:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := c.recv(1 << 20):
            got += chunk
        sender.join(30)
    srv.close()
    body, _, trailer = bytes(got).rpartition(b"|")
    assert trailer == str(len(payload)).encode()
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()
    assert splice_kind(p) == mode

    def counter(name: str) -> float:
        for ln in p.metrics().splitlines():
            if ln.startswith(name + '{direction="inbound",peer="src"'):
                return float(ln.split()[-1])
        return -1.0

    wait_for(lambda: counter("tcp_close_total") == 1, 10, what="connection closed in the metrics")
    assert counter("tcp_read_bytes_total") == len(payload)
    assert counter("tcp_write_bytes_total") == len(got)


def test_stalled_reader_backpressure_loses_nothing(tcp_proxy, mode: str) -> None:  # type: ignore[no-untyped-def]
    size = 32 * 1024 * 1024
    block = os.urandom(1 << 20)
    sent_all = threading.Event()

    def firehose(c: socket.socket) -> None:
        for _ in range(size // len(block)):
            c.sendall(block)
        sent_all.set()
        c.shutdown(socket.SHUT_WR)

    srv, port = tcp_server(firehose)
    p = tcp_proxy(port)
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.settimeout(30)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        first = c.recv(1 << 16)
        # Not reading: the server must block (the proxy holds no unbounded buffer), not finish.
        assert not sent_all.wait(1.0), "the server sent 32 MiB into a client that reads nothing"
        digest = hashlib.sha256(first)
        total = len(first)
        while chunk := c.recv(1 << 20):
            digest.update(chunk)
            total += len(chunk)
    srv.close()
    assert total == size
    assert digest.digest() == hashlib.sha256(block * (size // len(block))).digest()
    assert splice_kind(p) == mode


def test_client_that_sends_and_closes_before_upstream_answers(tcp_proxy, mode: str) -> None:  # type: ignore[no-untyped-def]
    got: list[bytes] = []
    done = threading.Event()

    def late_reader(c: socket.socket) -> None:
        data = b""
        while chunk := c.recv(65536):
            data += chunk
        got.append(data)
        done.set()

    srv, port = tcp_server(late_reader)
    p = tcp_proxy(port)
    with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
        c.sendall(b"fire and forget")
        c.shutdown(socket.SHUT_WR)
        assert c.recv(10) == b""  # the upstream closes after reading: EOF comes back
    assert done.wait(10)
    srv.close()
    assert got == [b"fire and forget"]
