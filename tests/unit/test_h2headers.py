"""Header conversion between HTTP/2 field blocks and the proxy's message head."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http.classify import parse_grpc_status
from tether.core.http.h2headers import (
    CONNECTION_SPECIFIC,
    FIELDS_REQUEST,
    FIELDS_RESPONSE,
    FIELDS_TRAILERS,
    H2HeaderError,
    check_fields,
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


# -- check_fields: validation of received field blocks ----------------------------------------------

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a")]


@pytest.mark.parametrize(
    ("fields", "kind", "error"),
    [
        ([*GET, (b"x-Upper", b"1")], FIELDS_REQUEST, "invalid field name"),
        ([*GET, (b"x-caf\xc3\xa9", b"1")], FIELDS_REQUEST, "invalid field name"),
        ([*GET, (b"x a", b"1")], FIELDS_REQUEST, "invalid field name"),
        ([*GET, (b"x-a", b"1\r\n2")], FIELDS_REQUEST, "invalid character"),
        ([*GET, (b"x-a", b"1\x002")], FIELDS_REQUEST, "invalid character"),
        ([*GET, (b"keep-alive", b"1")], FIELDS_REQUEST, "connection-specific"),
        ([*GET, (b"te", b"gzip")], FIELDS_REQUEST, "te other than trailers"),
        ([*GET, (b"content-length", b"1"), (b"content-length", b"2")], FIELDS_REQUEST, "conflicting"),
        ([*GET, (b"content-length", b"-1")], FIELDS_REQUEST, "bad content-length"),
        ([(b":method", b"GET"), (b":path", b"/")], FIELDS_REQUEST, "missing :scheme"),
        ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")], FIELDS_REQUEST, "missing or empty :path"),
        ([(b":scheme", b"http"), (b":path", b"/")], FIELDS_REQUEST, "missing :method"),
        ([*GET, (b":method", b"GET")], FIELDS_REQUEST, "duplicate"),
        ([(b":method", b"GET"), (b"a", b"b"), (b":path", b"/")], FIELDS_REQUEST, "after a regular"),
        ([*GET, (b":status", b"200")], FIELDS_REQUEST, "in a request"),
        ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")], FIELDS_REQUEST, "CONNECT with"),
        ([(b":status", b"20")], FIELDS_RESPONSE, "bad :status"),
        ([(b":path", b"/")], FIELDS_RESPONSE, "in a response"),
        ([(b"a", b"b")], FIELDS_RESPONSE, "missing :status"),
        ([(b":status", b"200")], FIELDS_TRAILERS, "in trailers"),
    ],
)
def test_check_fields_rejects(fields: list[tuple[bytes, bytes]], kind: int, error: str) -> None:
    got = check_fields(fields, kind)
    assert got.error is not None and error in got.error


def test_check_fields_accepts_and_reports() -> None:
    for _ in range(2):  # the second pass goes through the cache of known-good names and values
        ok = check_fields([*GET, (b"te", b"trailers"), (b"content-length", b"12"), (b"x-a", b"1")], FIELDS_REQUEST)
        assert ok.error is None and ok.content_length == 12 and not ok.head
        # A cached name is still checked where its value matters.
        assert check_fields([*GET, (b"te", b"gzip")], FIELDS_REQUEST).error is not None
    head = check_fields([(b":method", b"HEAD"), (b":scheme", b"http"), (b":path", b"/")], FIELDS_REQUEST)
    assert head.error is None and head.head and head.content_length == -1
    resp = check_fields([(b":status", b"204"), (b"x-a", b"1")], FIELDS_RESPONSE)
    assert resp.error is None and resp.status == 204
    connect = check_fields([(b":method", b"CONNECT"), (b":authority", b"a:443")], FIELDS_REQUEST)
    assert connect.error is None


def _strip_oracle(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 9113 section 8.2.2 spelled out plainly: the reference the fast version must match."""
    named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
    out = []
    for k, v in headers:
        if k in CONNECTION_SPECIFIC or k in named or k.startswith(b":"):
            continue
        if k == b"te":
            if b"trailers" not in [t.strip().lower() for t in v.split(b",")]:
                continue
            v = b"trailers"
        out.append((k, v))
    return out


_field_names = st.sampled_from([b"connection", b"te", b"keep-alive", b"upgrade", b"trailer", b"x-hop",
                                b"content-type", b":path", b"", b"x-a", b"proxy-authorization"])
_field_values = st.sampled_from([b"trailers", b"TE, x-hop", b"gzip, Trailers ", b"", b"x-a", b"close, upgrade",
                                 b"application/grpc"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_field_names, _field_values), max_size=8))
def test_strip_connection_specific_matches_the_rule(headers: list[tuple[bytes, bytes]]) -> None:
    assert strip_connection_specific(list(headers)) == _strip_oracle(headers)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.binary(max_size=4), st.sampled_from([b"200", b"404", b"0", b"14", b"07", b" 5", b"5 ", b"-1", b"+3",
                                                         b"\xd9\xa3", b"1_0", b"099", b"2000"])))
def test_status_codes_read_as_int_reads_them(value: bytes) -> None:
    # :status is three ASCII digits (else the head is malformed); grpc-status is what int() reads,
    # UNKNOWN (2) when it cannot: both read natively now, int() is the oracle.
    try:
        expected = int(value)
    except ValueError:
        expected = None
    assert parse_grpc_status(value) == (2 if expected is None else expected)
    ok = len(value) == 3 and value.isdigit()
    if ok:
        assert parse_response([(b":status", value)]) == (int(value), [])
    else:
        with pytest.raises(H2HeaderError):
            parse_response([(b":status", value)])
