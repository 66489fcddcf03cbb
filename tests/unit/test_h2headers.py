"""Header conversion between HTTP/2 field blocks and the proxy's message head."""

from __future__ import annotations

import pytest

from tether.core.http.h2headers import (
    H2HeaderError,
    join_cookies,
    parse_request,
    parse_response,
    request_fields,
    response_fields,
    strip_connection_specific,
    trailer_fields,
)


def test_connection_specific_fields_are_dropped_but_te_trailers_kept() -> None:
    headers = [
        (b"connection", b"keep-alive, x-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"x-hop", b"1"),
        (b"te", b"gzip, trailers"),
        (b"content-type", b"application/grpc"),
    ]
    assert strip_connection_specific(headers) == [
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
    ]
    assert strip_connection_specific([(b"te", b"gzip")]) == []
    plain = [(b"a", b"1")]
    assert strip_connection_specific(plain) is plain  # no copy on the common path


def test_request_round_trip() -> None:
    fields = request_fields(b"GET", b"http", b"svc:80", b"/x?y=1", [(b"host", b"svc:80"), (b"accept", b"*/*")])
    assert fields == [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"svc:80"),
        (b":path", b"/x?y=1"),
        (b"accept", b"*/*"),
    ]
    head = parse_request(fields)
    assert (head.method, head.scheme, head.authority, head.path) == (b"GET", b"http", b"svc:80", b"/x?y=1")
    assert head.headers == [(b"accept", b"*/*")]


def test_host_becomes_authority_when_request_has_none() -> None:
    fields = request_fields(b"GET", b"http", b"", b"/", [(b"host", b"h:1")])
    assert (b":authority", b"h:1") in fields
    assert (
        parse_request([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h")]).authority
        == b"h"
    )


def test_connect_uses_authority_only() -> None:
    assert request_fields(b"CONNECT", b"", b"db:5432", b"db:5432", []) == [
        (b":method", b"CONNECT"),
        (b":authority", b"db:5432"),
    ]
    head = parse_request([(b":method", b"CONNECT"), (b":authority", b"db:5432")])
    assert head.path == b"db:5432"


@pytest.mark.parametrize(
    "fields",
    [
        [(b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http")],
        [(b":method", b"GET"), (b":path", b"/")],
        [(b":method", b"GET"), (b"a", b"b"), (b":path", b"/"), (b":scheme", b"http")],
        [(b":method", b"GET"), (b":bogus", b"x"), (b":path", b"/"), (b":scheme", b"http")],
    ],
)
def test_bad_request_heads_are_rejected(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(H2HeaderError):
        parse_request(fields)


def test_response_round_trip_and_errors() -> None:
    fields = response_fields(200, [(b"connection", b"close"), (b"grpc-status", b"0")])
    assert fields == [(b":status", b"200"), (b"grpc-status", b"0")]
    assert parse_response(fields) == (200, [(b"grpc-status", b"0")])
    for bad in ([], [(b":status", b"20")], [(b":status", b"200"), (b":path", b"/")]):
        with pytest.raises(H2HeaderError):
            parse_response(bad)


def test_trailers_and_cookies() -> None:
    assert trailer_fields([(b"grpc-status", b"0"), (b"te", b"trailers"), (b":status", b"200")]) == [
        (b"grpc-status", b"0")
    ]
    assert join_cookies([(b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")]) == [
        (b"cookie", b"a=1; b=2"),
        (b"x", b"y"),
    ]
