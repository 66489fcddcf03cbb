"""HTTP/1 framing under hostile bytes, through a real `tether proxy` process (RFC 9112, RFC 9110).

Raw sockets on both sides: the client sends exact bytes, and a recording origin keeps every
request line that reached it, so a test sees both what the client got and what got through.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tether.testing.backend import tcp_server
from tether.testing.procs import ProxyProc, wait_for

pytestmark = pytest.mark.integration


class Origin:
    """A strict keep-alive origin on loopback that records the request lines it was sent."""

    def __init__(self, respond: Callable[[socket.socket, bytes], bool] | None = None) -> None:
        self.lines: list[bytes] = []
        self._lock = threading.Lock()
        self._respond = respond
        self.srv, self.port = tcp_server(self._serve)

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(10)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            with self._lock:
                self.lines.append(head.split(b"\r\n", 1)[0])
            if self._respond is not None:
                if not self._respond(c, head):
                    return
                continue
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(buf) < length:
                data = c.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            body = b"seen " + head.split(b"\r\n", 1)[0]
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))

    def close(self) -> None:
        self.srv.close()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``; return everything received and whether the proxy closed the connection."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(timeout)
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
            return out, True
        except TimeoutError:
            return out, False


def statuses(out: bytes) -> list[int]:
    """The status codes of the responses in ``out`` (the origin's bodies carry no status line)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", out)]


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture
def proxy(proxies, origin: Origin) -> ProxyProc:  # type: ignore[no-untyped-def]
    return proxies("in", inbound_app_addr=f"127.0.0.1:{origin.port}", header_read_timeout="3s")


# -- the last request on a connection (RFC 9112 section 9.6) --------------------------------------

FOLLOWER = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("first", [
    b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /first HTTP/1.1\r\nHost: a\r\nconnection: CLOSE\r\n\r\n",
    b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n",
    b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: x-custom\r\nConnection: close\r\n\r\n",
    b"GET /first HTTP/1.0\r\n\r\n",
    b"GET /first HTTP/1.0\r\nHost: a\r\n\r\n",
    b"POST /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
], ids=["close", "close-lower-upper", "close-in-list", "close-second-field", "http10", "http10-host",
        "close-with-length-body", "close-with-chunked-body"])
def test_request_that_closes_is_answered_and_nothing_after_it_is_forwarded(
        proxy: ProxyProc, origin: Origin, first: bytes) -> None:
    out, closed = exchange(proxy.inbound_port, first + FOLLOWER)
    assert statuses(out) == [200], out
    assert b"seen " + first.split(b" HTTP/", 1)[0] in out
    assert b"connection: close" in out.lower()
    assert closed
    assert [ln.split(b" ")[1] for ln in origin.lines] == [b"/first"]


def test_bytes_after_the_last_request_in_a_later_packet_are_dropped(proxy: ProxyProc, origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", proxy.inbound_port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        wait_for(lambda: origin.lines, 5, what="the first request at the origin")
        try:
            s.sendall(b"junk that is not HTTP\r\n\r\n" + FOLLOWER)
        except OSError:
            pass  # the proxy may have closed already: also fine
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert statuses(out) == [200]
    assert [ln.split(b" ")[1] for ln in origin.lines] == [b"/first"]


def test_http10_keep_alive_still_serves_the_next_request(proxy: ProxyProc, origin: Origin) -> None:
    out, _ = exchange(proxy.inbound_port, b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                      b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200, 200]
    assert [ln.split(b" ")[1] for ln in origin.lines] == [b"/one", b"/two"]


def test_client_still_sending_gets_the_response_not_a_reset(proxy: ProxyProc, origin: Origin) -> None:
    # The client keeps writing after its last request: closing with unread bytes would reset
    # the connection and could destroy the response in the client's kernel.
    with socket.create_connection(("127.0.0.1", proxy.inbound_port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + b"x" * 200_000)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert statuses(out) == [200]


# -- an upstream that answers before the request body was sent ----------------------------------

def early_origin(status: bytes, then: str) -> Origin:
    """An origin that answers as soon as it has the head, then closes, lingers, or keeps reading."""
    def respond(c: socket.socket, head: bytes) -> bool:
        c.sendall(b"HTTP/1.1 " + status + b"\r\ncontent-length: 5\r\n\r\nearly")
        if then == "close":
            return False
        if then == "linger":
            c.shutdown(socket.SHUT_WR)
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass
        return False
    return Origin(respond)


@pytest.mark.parametrize(("status", "then", "size", "sent"), [
    (b"413 Content Too Large", "close", 10**9, 0),
    (b"413 Content Too Large", "linger", 10**9, 300_000),
    (b"401 Unauthorized", "read", 5_000_000, 1_000_000),
    (b"401 Unauthorized", "close", 100_000, 100),
    (b"403 Forbidden", "read", None, 400_000),
], ids=["413-close-head-only", "413-linger-streaming", "401-keeps-reading", "401-close-partial", "403-chunked"])
def test_early_response_is_relayed_and_body_stops(proxies, status: bytes, then: str,  # type: ignore[no-untyped-def]
                                                  size: int | None, sent: int) -> None:
    origin = early_origin(status, then)
    try:
        p = proxies("in", inbound_app_addr=f"127.0.0.1:{origin.port}")
        framing = b"Transfer-Encoding: chunked" if size is None else b"Content-Length: %d" % size
        with socket.create_connection(("127.0.0.1", p.inbound_port)) as s:
            s.settimeout(5)
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n\r\n")
            s.setblocking(False)
            block = b"z" * 65536 if size is not None else b"10000\r\n" + b"z" * 65536 + b"\r\n"
            out = b""
            pushed = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if pushed < sent:
                    try:
                        pushed += s.send(block)
                    except BlockingIOError:
                        pass
                    except OSError:
                        pushed = sent  # the proxy closed: stop sending
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    time.sleep(0.005)
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
        assert out.startswith(b"HTTP/1.1 " + status + b"\r\n"), out[:200]
        assert out.endswith(b"early")
        assert b"connection: close" in out.lower()
        # The proxy ended the exchange (EOF) instead of waiting for the rest of the body.
        assert time.monotonic() < deadline
        assert re.search(r"\b502\b", p.log()) is None  # a status, not digits inside a timestamp
    finally:
        origin.close()


def test_upstream_connection_cut_short_is_not_reused(proxies) -> None:  # type: ignore[no-untyped-def]
    # The early response leaves the upstream connection mid-request: the next request must go on a
    # fresh connection, never be framed as the rest of the first one's body.
    conns: list[int] = []

    def respond(c: socket.socket, head: bytes) -> bool:
        conns.append(c.fileno())
        if head.startswith(b"POST"):
            c.sendall(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n")
            try:
                while c.recv(65536):
                    pass
            except OSError:
                pass
            return False
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        return True

    origin = Origin(respond)
    try:
        p = proxies("in", inbound_app_addr=f"127.0.0.1:{origin.port}")
        out, _ = exchange(p.inbound_port, b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
                          + b"q" * 1000, timeout=5)
        assert statuses(out) == [413]
        out, _ = exchange(p.inbound_port, b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert statuses(out) == [200]
        assert [ln.split(b" ")[1] for ln in origin.lines] == [b"/big", b"/next"]
        assert len(conns) == 2
    finally:
        origin.close()


# -- bytes that begin like a request but whose request line is malformed ------------------------

@pytest.mark.parametrize(("line", "status"), [
    (b"GET  / HTTP/1.1", 400),            # two spaces before the target
    (b"GET /  HTTP/1.1", 400),            # two spaces before the version
    (b"GET\t/ HTTP/1.1", 400),            # tab as separator
    (b"GET /\tHTTP/1.1", 400),
    (b"GET / HTTP/1.1 ", 400),            # trailing space
    (b" GET / HTTP/1.1", 400),            # leading space
    (b"GET /a b HTTP/1.1", 400),          # space inside the target
    (b"GET /#frag HTTP/1.1", 400),        # fragment in the target
    (b"GET /\x7f HTTP/1.1", 400),         # control character in the target
    (b"GET / HTTP/1.1x", 400),
    (b"GET / http/1.1", 400),             # the version name is case-sensitive
    (b"GET / HTTP/1", 400),
    (b"GET / HTTP/01.1", 400),
    (b"GET / HTTP/2.0", 505),
    (b"GET / HTTP/0.9", 505),
    (b"GET /", 400),                      # HTTP/0.9-style line
    (b"G@T / HTTP/1.1", 400),             # not a token
    (b"get / HTTP/1.1", 400),             # methods are case-sensitive
    (b"GET relative HTTP/1.1", 400),      # neither origin-form nor absolute-form
    (b"GET * HTTP/1.1", 400),             # asterisk-form is for OPTIONS only
    (b"GET ftp://a/ HTTP/1.1", 400),
], ids=lambda v: v if isinstance(v, int) else v.decode("latin-1").replace(" ", "_").replace("\t", "TAB"))
def test_malformed_request_line_is_400_and_never_forwarded(proxy: ProxyProc, origin: Origin,
                                                           line: bytes, status: int) -> None:
    out, closed = exchange(proxy.inbound_port, line + b"\r\nHost: a\r\n\r\n")
    assert statuses(out)[:1] == [status], out[:200]
    assert b"l5d-proxy-error:" in out
    assert closed
    assert origin.lines == []


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\r\n"], ids=["bare-lf", "bare-cr", "cr-cr-lf"])
def test_request_line_endings_other_than_crlf_are_400(proxy: ProxyProc, origin: Origin, ending: bytes) -> None:
    out, closed = exchange(proxy.inbound_port, b"GET / HTTP/1.1" + ending + b"Host: a\r\n\r\n")
    assert statuses(out) == [400], out[:200]
    assert closed
    assert origin.lines == []


def test_request_line_split_across_packets_is_judged_whole(proxy: ProxyProc, origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", proxy.inbound_port)) as s:
        s.settimeout(5)
        for piece in (b"GET", b" /a ", b" HTTP/1.1\r", b"\nHost: a\r\n\r\n"):
            s.sendall(piece)
            time.sleep(0.05)  # separate packets; not a synchronisation
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert statuses(out) == [400]
    assert origin.lines == []


def test_empty_lines_before_the_request_line_are_ignored(proxy: ProxyProc, origin: Origin) -> None:
    out, _ = exchange(proxy.inbound_port, b"\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200]
    assert origin.lines == [b"GET /ok HTTP/1.1"]


def test_second_request_on_keep_alive_connection_is_also_checked(proxy: ProxyProc, origin: Origin) -> None:
    with socket.create_connection(("127.0.0.1", proxy.inbound_port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        first = b""
        while not first.endswith(b"seen GET /one HTTP/1.1"):
            first += s.recv(65536)
        s.sendall(b"GET /two  HTTP/1.1\r\nHost: a\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert statuses(out) == [400]
    assert origin.lines == [b"GET /one HTTP/1.1"]


def test_text_protocol_that_is_not_http_is_still_forwarded_as_tcp(proxies) -> None:  # type: ignore[no-untyped-def]
    # A method-less text command (memcached/redis style) on an unlisted port is not HTTP.
    def echo(c: socket.socket) -> None:
        while data := c.recv(65536):
            c.sendall(data)

    srv, port = tcp_server(echo)
    try:
        p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
            c.settimeout(5)
            c.sendall(b"set greeting 0 0 5\r\nhello\r\n")
            got = b""
            while len(got) < 27:
                got += c.recv(100)
        assert got == b"set greeting 0 0 5\r\nhello\r\n"
    finally:
        srv.close()


def test_malformed_http_on_an_opaque_port_is_forwarded_untouched(proxies) -> None:  # type: ignore[no-untyped-def]
    def echo(c: socket.socket) -> None:
        while data := c.recv(65536):
            c.sendall(data)

    srv, port = tcp_server(echo)
    try:
        p = proxies("tcp", inbound_app_addr=f"127.0.0.1:{port}", opaque_ports=str(port))
        payload = b"GET  /  HTTP/9.9\n\n"
        with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
            c.settimeout(5)
            c.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += c.recv(100)
        assert got == payload
    finally:
        srv.close()


# -- userinfo in Host or in an absolute-form target ---------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: user:pass@a:8080\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: @a\r\n\r\n",
    b"GET / HTTP/1.1\r\nhOST: a@evil.example\r\n\r\n",
    b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://user:pw@a:80/x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET HTTP://a@b/ HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: x@a\r\n\r\n",
    b"CONNECT user@a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
], ids=["host", "host-with-password", "host-empty-user", "host-name-case", "target", "target-with-password",
        "target-scheme-case", "host-with-absolute-target", "connect", "host-space", "host-path"])
def test_userinfo_or_invalid_host_is_400(proxy: ProxyProc, origin: Origin, request_bytes: bytes) -> None:
    out, closed = exchange(proxy.inbound_port, request_bytes)
    assert statuses(out) == [400], out[:200]
    assert b"l5d-proxy-error:" in out
    assert closed
    assert origin.lines == []


def test_valid_hosts_and_absolute_targets_still_pass(proxy: ProxyProc, origin: Origin) -> None:
    reqs = [
        b"GET /a HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
        b"GET /b HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        b"GET /c HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
        b"GET http://a.example/d?x=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ]
    out, _ = exchange(proxy.inbound_port, b"".join(reqs))
    assert statuses(out) == [200] * 5, out
    assert origin.lines == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1", b"GET /c HTTP/1.1",
                            b"GET /d?x=1 HTTP/1.1", b"OPTIONS * HTTP/1.1"]


def test_higher_minor_version_is_served_as_http11(proxy: ProxyProc, origin: Origin) -> None:
    # RFC 9110 section 2.5: a 1.x the proxy doesn't know is read as the highest it does (1.1).
    out, _ = exchange(proxy.inbound_port, b"GET /a HTTP/1.2\r\nHost: a\r\n\r\n"
                      b"GET /b HTTP/1.9\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200, 200], out
    assert origin.lines == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]


def test_pipelined_request_with_another_major_version_is_505(proxy: ProxyProc, origin: Origin) -> None:
    out, closed = exchange(proxy.inbound_port, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/3.0\r\nHost: a\r\n\r\n")
    assert statuses(out) == [200, 505], out
    assert closed
    assert origin.lines == [b"GET /a HTTP/1.1"]
