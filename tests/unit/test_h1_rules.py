"""RFC 9112/9110 rules of tether.core.http.h1 that llhttp does not enforce, and detection."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http import h1
from tether.core.http.detect import Detected, detect, looks_like_http1_prefix


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1\r", b"POST /a/b?c=d&e HTTP/1.0\r", b"OPTIONS * HTTP/1.1\r",
    b"GET http://a.example:80/x HTTP/1.1\r", b"CONNECT a.example:443 HTTP/1.1\r", b"M-SEARCH * HTTP/1.1\r",
    b"GET /%7Euser;p=1 HTTP/1.1\r",
])
def test_well_formed_request_lines_pass(line: bytes) -> None:
    h1.check_request_line(line)


@pytest.mark.parametrize("line", [
    b"GET / HTTP/1.1", b"GET  / HTTP/1.1\r", b"GET /  HTTP/1.1\r", b"GET\t/ HTTP/1.1\r", b"GET / HTTP/1.1 \r",
    b" GET / HTTP/1.1\r", b"GET /#f HTTP/1.1\r", b"GET /\x00 HTTP/1.1\r", b"GET /\x80 HTTP/1.1\r",
    b"GET / HTTP/1.10\r", b"GET / HTTP/1.1\r\r", b"GET /\r", b"GET / HTTP/1\r", b"G(T / HTTP/1.1\r", b"",
])
def test_malformed_request_lines_are_400(line: bytes) -> None:
    with pytest.raises(h1.H1Error) as e:
        h1.check_request_line(line)
    assert e.value.status == 400


def test_other_major_version_is_505() -> None:
    with pytest.raises(h1.H1Error) as e:
        h1.check_request_line(b"GET / HTTP/2.0\r")
    assert e.value.status == 505


@pytest.mark.parametrize("host", [b"a", b"a.example:8080", b"[::1]", b"[::1]:80", b"10.0.0.1:1", b"", b"xn--d-1a.b",
                                  b"a%20b"])
def test_valid_host_values(host: bytes) -> None:
    h1.check_host(host)


@pytest.mark.parametrize("host", [b"u@a", b"u:p@a:1", b"@a", b"a b", b"a/b", b"a?b", b"a#b", b"a\\b", b"[::1"])
def test_invalid_host_values(host: bytes) -> None:
    with pytest.raises(h1.H1Error) as e:
        h1.check_host(host)
    assert e.value.status == 400


# The grammar as regular expressions (what h1 checked with before its byte-table loops): the oracle.
_LINE_ORACLE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21\x22\x24-\x7e]+ HTTP/([0-9])\.([0-9])\r")
_HOST_ORACLE = re.compile(rb"(\[[0-9A-Fa-f:.vV]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?")
# Bytes that matter to the grammar, so random lines often come close to valid ones.
_LINE_BYTES = st.sampled_from([b"G", b"E", b"T", b" ", b"/", b"#", b"H", b"P", b"1", b"2", b".", b"\r", b"\n",
                               b"\x80", b"\t", b"*", b":", b"HTTP/", b"\x00", b"a"])
_HOST_BYTES = st.sampled_from([b"a", b"Z", b"0", b"9", b":", b"[", b"]", b"@", b".", b"v", b"%", b" ", b"/", b"g",
                               b"\xff", b"-", b"~", b"_"])


def _status(check: object, value: bytes) -> int:
    try:
        check(value)  # type: ignore[operator]
    except h1.H1Error as e:
        return e.status
    return 0


@settings(max_examples=3000, deadline=None)
@given(st.lists(_LINE_BYTES, max_size=14).map(b"".join) | st.binary(max_size=40))
def test_request_line_check_agrees_with_the_grammar(line: bytes) -> None:
    m = _LINE_ORACLE.fullmatch(line)
    want = 400 if m is None else (505 if m.group(1) != b"1" else 0)
    assert _status(h1.check_request_line, line) == want


@settings(max_examples=3000, deadline=None)
@given(st.lists(_HOST_BYTES, max_size=10).map(b"".join) | st.binary(max_size=20))
def test_host_check_agrees_with_the_grammar(host: bytes) -> None:
    assert _status(h1.check_host, host) == (0 if _HOST_ORACLE.fullmatch(host) else 400)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"x" * 300 + b"\n", b"x" * 300, b"", b"\n", b"ab"])
@pytest.mark.parametrize("start", [0, 1, 255, 256, 299])
def test_find_lf_is_bytes_find(data: bytes, start: int) -> None:
    assert h1.find_lf(data, start) == data.find(b"\n", start)


@pytest.mark.parametrize(("method", "target", "want"), [
    (b"GET", b"/x?y", (b"", b"/x?y")),
    (b"GET", b"http://a.example/x", (b"a.example", b"/x")),
    (b"GET", b"HTTPS://a.example:8443", (b"a.example:8443", b"/")),
    (b"GET", b"http://a?q=1", (b"a", b"/?q=1")),
    (b"OPTIONS", b"*", (b"", b"*")),
    (b"CONNECT", b"a:443", (b"a:443", b"")),
])
def test_split_target(method: bytes, target: bytes, want: tuple[bytes, bytes]) -> None:
    assert h1.split_target(method, target) == want


@pytest.mark.parametrize(("method", "target"), [
    (b"GET", b"x"), (b"GET", b"*"), (b"GET", b"ftp://a/"), (b"GET", b"http://u@a/"), (b"GET", b"http:///x"),
    (b"CONNECT", b"/x"), (b"CONNECT", b"u@a:1"), (b"GET", b"http://a b/"),
])
def test_split_target_rejects(method: bytes, target: bytes) -> None:
    with pytest.raises(h1.H1Error):
        h1.split_target(method, target)


def test_host_header_with_userinfo_fails_the_head_check() -> None:
    with pytest.raises(h1.H1Error, match="userinfo"):
        h1.check_request_head("1.1", [(b"host", b"user@a")])


@pytest.mark.parametrize(("data", "want"), [
    (b"GET ", Detected.HTTP1),                    # a registered method and a space
    (b"PATCH\t", Detected.HTTP1),                 # ... or a tab (malformed, but HTTP)
    (b"FOO /x", Detected.HTTP1),                  # any token before an origin-form target
    (b"FOO http://", Detected.HTTP1),             # ... or an absolute-form one
    (b"get / HTTP/1.1\r\n", Detected.HTTP1),      # lower case is HTTP too (and then 400)
    (b" GET / HTTP/1.1\r\n", Detected.HTTP1),     # a version on the first line
    (b"G@T / HTTP/1.1\r\n", Detected.HTTP1),
    (b"\r\n\r\nGET ", Detected.HTTP1),            # empty lines first
    (b"GE", Detected.NEED_MORE),
    (b"FOO h", Detected.NEED_MORE),
    (b"\r\n", Detected.NEED_MORE),
    (b"get key\r\n", Detected.OPAQUE),            # memcached: a token, no target, no version
    (b"SET k v\r\n", Detected.OPAQUE),            # redis inline command
    (b"hello world\n", Detected.OPAQUE),
    (b"\x00\x01\x02", Detected.OPAQUE),
    (b"A" * 40, Detected.OPAQUE),                 # longer than any method without a space
    (b"\x16\x03\x01", Detected.TLS),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Detected.H2),
    (b"PRI * HTTP/2.0\r\n", Detected.NEED_MORE),
])
def test_detection(data: bytes, want: Detected) -> None:
    assert detect(data) is want


def test_detection_gives_up_at_the_limit() -> None:
    assert detect(b"FOO " + b"x" * 100, limit=64) is Detected.OPAQUE
    assert detect(b"\r\n" * 600, limit=1024) is Detected.OPAQUE


def test_a_partial_request_line_counts_for_the_header_timeout() -> None:
    assert looks_like_http1_prefix(b"GE")
    assert not looks_like_http1_prefix(b"GET ")  # decided already
    assert not looks_like_http1_prefix(b"\x00")
