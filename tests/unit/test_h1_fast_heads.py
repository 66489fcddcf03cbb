"""The common HTTP/1 head parsed without llhttp (h1.parse_fields, h1.parse_status_line) takes only
heads llhttp accepts, and reads them as llhttp does; the proxy's server and client give the same
requests and responses either way.

llhttp (through httptools) is the oracle: for any head the fast parsers accept, llhttp must parse
the same bytes without error into the same fields (names lower-cased), status and body.
"""

from __future__ import annotations

import asyncio

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http import h1
from tether.proxy.config import H1ServerSettings, ProxyConfig, client_settings
from tether.proxy.errors import UpstreamError
from tether.proxy.http.body import BytesBody
from tether.proxy.http.h1client import H1Pool
from tether.proxy.http.h1server import ConnectionRegistry, H1ServerProtocol
from tether.proxy.http.message import Connection, Request, Response


class _Seen:
    """What llhttp reports through httptools' callbacks."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0
        self.keep_alive: bool | None = None
        self.parser: httptools.HttpResponseParser | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.parser is not None:  # asked where the client asks it
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


# Bytes that matter to the field grammar, so random heads often come close to valid ones.
_FIELD_BYTES = st.sampled_from([b"a", b"X-Y", b"Host", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x7f",
                                b"\x80", b"\xff", b"(", b"content-length", b"Connection", b"Upgrade", b"1", b"/",
                                b"transfer-encoding", b",", b"\"", b"=", b"host: a\r\n", b"x: y\r\n"])
_FIELDS = st.lists(_FIELD_BYTES, max_size=16).map(b"".join) | st.binary(max_size=30)
_STATUS_LINES = st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 404 Not Found\r\n", b"HTTP/1.1 200 \r\n",
                                 b"HTTP/1.1 999 x\r\n", b"HTTP/1.1 199 x\r\n", b"HTTP/1.1 100 Continue\r\n",
                                 b"HTTP/1.0 200 OK\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 200OK\r\n",
                                 b"HTTP/1.1 200 O\x01K\r\n", b"HTTP/1.1 2x0 OK\r\n", b"HTTP/1.1 204 No\r\n"])


_LINE_BYTES = st.sampled_from([b"GET", b" ", b"/", b"#", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"\r", b"\n", b"\r\n",
                               b"\x80", b"\t", b"*", b"a", b"\x00", b"1", b"."])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_LINE_BYTES, max_size=12).map(b"".join) | st.binary(max_size=30))
def test_the_one_scan_request_line_agrees_with_the_line_check(data: bytes) -> None:
    method_length, eol = h1.request_line_end(data)
    if eol < 0:
        return
    assert eol == data.find(b"\n")
    assert h1.check_request_line(data[:eol]) == method_length


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", b"M-X * HTTP/1.9\r\n"])
def test_the_one_scan_request_line_takes_valid_lines(data: bytes) -> None:
    assert h1.request_line_end(data) == (data.find(b" "), data.find(b"\n"))


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\n", b"GET  / HTTP/1.1\r\n",
                                  b"GET / HTTP/2.0\r\n", b"\r\nGET / HTTP/1.1\r\n", b"GET /#a HTTP/1.1\r\n",
                                  b"GET / HTTP/1.1 \r\n", b""])
def test_the_one_scan_request_line_leaves_the_rest_to_the_line_check(data: bytes) -> None:
    assert h1.request_line_end(data) == (0, -1)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
                                    b"get", b"FOO", b"CONNECT", b"M-SEARCH"])
@pytest.mark.parametrize("target", [b"/", b"/a?b=%22c%22&d=~!$'()*+,;=:@[]{}|^`\\<>\"", b"*", b"a", b"http://a/",
                                    b"//x"])
def test_requests_the_fast_path_takes_llhttp_accepts(method: bytes, target: bytes) -> None:
    data = method + b" " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    if not h1.fast_request_target(method, target) or h1.request_line_end(data)[1] < 0:
        return
    seen = _Seen()
    httptools.HttpRequestParser(seen).feed_data(data)
    assert (seen.url, seen.complete) == (target, 1)


@settings(max_examples=3000, deadline=None)
@given(_FIELDS)
def test_request_fields_the_fast_path_takes_parse_the_same_in_llhttp(fields: bytes) -> None:
    data = b"GET /x HTTP/1.1\r\n" + fields + b"\r\n"
    out: h1.Headers = []
    end = h1.parse_fields(data, 17, out, h1.LLHTTP_FIELDS)
    if end < 0:
        return
    seen = _Seen()
    httptools.HttpRequestParser(seen).feed_data(data[:end])  # raises if llhttp refuses the head
    assert (seen.url, seen.headers, seen.complete) == (b"/x", out, 1)
    assert not any(k in h1.LLHTTP_FIELDS for k, _ in out)


@settings(max_examples=3000, deadline=None)
@given(_STATUS_LINES, _FIELDS, st.binary(max_size=4))
def test_responses_the_fast_path_takes_parse_the_same_in_llhttp(line: bytes, fields: bytes, body: bytes) -> None:
    data = line + fields + b"content-length: %d\r\n\r\n" % len(body) + body
    status, start = h1.parse_status_line(data)
    if status < 0:
        return
    out: h1.Headers = []
    end = h1.parse_fields(data, start, out, h1.LLHTTP_RESPONSE_FIELDS)
    if end < 0:
        return
    if h1.simple_content_length(out) != len(body):
        return  # the client's fast path takes only a response whose body is all here
    seen = _Seen()
    parser = seen.parser = httptools.HttpResponseParser(seen)
    parser.feed_data(data)  # raises if llhttp refuses the response
    assert (parser.get_status_code(), seen.headers, seen.body, seen.complete, seen.keep_alive) == (
        status, out, body, 1, True)


@pytest.mark.parametrize(("fields", "want"), [
    (b"content-length: 5\r\n", 5), (b"content-length: 0005\r\n", 5), (b"x: 1\r\ncontent-length: 0\r\n", 0),
    (b"", -1), (b"content-length: 5 \r\n", -1), (b"content-length: 5,5\r\n", -1), (b"content-length: +5\r\n", -1),
    (b"content-length: 5\r\ncontent-length: 5\r\n", -1), (b"content-length: 1234567890123456789\r\n", -1),
])
def test_the_fast_path_reads_only_one_plain_content_length(fields: bytes, want: int) -> None:
    out: h1.Headers = []
    h1.parse_fields(fields + b"\r\n", 0, out, h1.LLHTTP_RESPONSE_FIELDS)
    assert h1.simple_content_length(out) == want


@pytest.mark.parametrize(("fields", "want"), [
    (b"Host: a\r\nX-A:  b c \r\n\r\n", [(b"host", b"a"), (b"x-a", b"b c ")]),  # OWS before dropped, after kept
    (b"X:\r\n\r\n", [(b"x", b"")]),
    (b"X:\t\xff\r\n\r\n", [(b"x", b"\xff")]),
    (b"ETag: 1\r\nCONTENT-TYPE: a\r\nUser-agent: u\r\nX-Forwarded-For: f\r\n\r\n",
     [(b"etag", b"1"), (b"content-type", b"a"), (b"user-agent", b"u"), (b"x-forwarded-for", b"f")]),
])
def test_fields_are_read_as_llhttp_reads_them(fields: bytes, want: h1.Headers) -> None:
    out: h1.Headers = []
    assert h1.parse_fields(fields, 0, out, h1.LLHTTP_FIELDS) == len(fields)
    assert out == want


@pytest.mark.parametrize("fields", [
    b"X : a\r\n\r\n", b" X: a\r\n\r\n", b"X: a\nY: b\r\n\r\n", b"X: a\x00\r\n\r\n", b"X: a\r\n", b"X: a\r\n\r",
    b"Content-Length: 0\r\n\r\n", b"Connection: close\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n",
    b"Upgrade: x\r\n\r\n", b"Proxy-Connection: keep-alive\r\n\r\n", b"X\r\n\r\n",
    b"CONTENT-LENGTH: 0\r\n\r\n", b"cOnnection: close\r\n\r\n", b"proxy-connection: x\r\n\r\n",
    b"TRANSFER-encoding: chunked\r\n\r\n", b"upgrade: x\r\n\r\n", b"A: b\r\nUPGRADE: x\r\n\r\n",
])
def test_heads_left_to_llhttp(fields: bytes) -> None:
    assert h1.parse_fields(fields, 0, [], h1.LLHTTP_FIELDS) == -1


_SERVER = H1ServerSettings(max_header_bytes=65536, header_read_timeout=5.0, idle_timeout=30.0,
                           body_buffer_high=65536, linger_timeout=1.0, write_stall_timeout=10.0)


async def _echo_head(req: Request) -> Response:
    """Answers with what the proxy made of the request head."""
    body = b"%s %s %s %s %r" % (req.method, req.authority, req.path, req.version.encode(), req.headers)
    return Response(200, [(b"x-app", b"1")], BytesBody(body))


async def _exchange(writes: list[bytes], responses: int) -> list[bytes]:
    server = await asyncio.get_running_loop().create_server(
        lambda: H1ServerProtocol(_echo_head, Connection("inbound", ("127.0.0.1", 0), ("127.0.0.1", 0)), _SERVER,
                                 ConnectionRegistry()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got: list[bytes] = []
    try:
        for w in writes:
            writer.write(w)
            await writer.drain()
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            got.append(head + await asyncio.wait_for(reader.readexactly(length), 5))
    finally:
        writer.close()
        server.close()
    return got


def test_a_request_in_one_read_and_the_same_request_byte_by_byte_are_served_alike() -> None:
    head = b"GET /p?q=1 HTTP/1.1\r\nHost: a.example\r\nX-A: b\r\nAccept:  */* \r\n\r\n"
    whole = asyncio.run(_exchange([head, head], 2))  # one read each: the fast path
    split = asyncio.run(_exchange([head[:20], head[20:]], 1))  # llhttp
    assert whole[0] == whole[1] == split[0]
    assert whole[0].endswith(b"GET a.example /p?q=1 1.1 [(b'x-a', b'b'), (b'accept', b'*/* ')]")


@pytest.mark.parametrize(("request_head", "status"), [
    (b"GET / HTTP/1.1\r\nX: a\r\n\r\n", b"400"),                        # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),          # two
    (b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),           # userinfo
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", b"400"),          # a CTL in a value
    (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),                     # llhttp: not a method it knows
    (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),
    (b"GET http://a|b/ HTTP/1.1\r\nHost: a\r\n\r\n", b"400"),           # llhttp: not a URL char
])
def test_bad_heads_in_one_read_are_still_refused(request_head: bytes, status: bytes) -> None:
    (resp,) = asyncio.run(_exchange([request_head], 1))
    assert resp.split(b" ")[1] == status
    assert b"connection: close" in resp


async def _upstream_exchange(answer: bytes) -> tuple[Response, bytes, int]:
    """One GET through an H1Pool to a server that answers ``answer`` in one write, then a second
    GET: (first response, its body, connections the pool opened)."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = H1Pool(("127.0.0.1", port), client_settings(ProxyConfig(), 5.0))
    try:
        resp = await pool(Request(b"GET", b"/", b"a"))
        body = await resp.body.read()
        while chunk := await resp.body.read():
            body += chunk
        again = await pool(Request(b"GET", b"/", b"a"))
        while await again.body.read():
            pass
        return resp, body, accepted
    finally:
        await pool.aclose()
        server.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nX-A:  v \r\n\r\nhello",  # fast path
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A:  v \r\nTransfer-Encoding: chunked\r\n\r\n"  # llhttp
    b"5\r\nhello\r\n0\r\n\r\n",
])
def test_upstream_responses_arrive_alike_and_the_connection_is_reused(answer: bytes) -> None:
    resp, body, accepted = asyncio.run(_upstream_exchange(answer))
    assert (resp.status, resp.headers, body, accepted) == (200, [(b"content-type", b"text/plain"), (b"x-a", b"v ")],
                                                           b"hello", 1)


def test_an_upstream_response_that_closes_is_not_reused() -> None:
    resp, body, accepted = asyncio.run(_upstream_exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"))
    assert (resp.status, resp.headers, body, accepted) == (200, [], b"ok", 2)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",  # llhttp: duplicate Content-Length
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \x01\r\n\r\nok",  # a CTL in a value
])
def test_upstream_responses_llhttp_refuses_are_still_refused(answer: bytes) -> None:
    with pytest.raises(UpstreamError, match="invalid HTTP/1 response"):
        asyncio.run(_upstream_exchange(answer))
