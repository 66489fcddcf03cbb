"""The C scanner of HTTP/1.1 field lines (tether/core/http/_h1scan.c) against h1.parse_fields's Python
reference: the same answer and the same field list for every head, the common names as the same
shared objects. Generated heads mix the bytes the scanner decides on (tchars, the separators, CR,
LF, control bytes, obs-text) with the common names in every spelling."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import native
from tether.core.http import h1

NAMES = [spelling for row in h1._FIELD_NAMES for spelling, _ in row]
SHARED = {id(name) for row in h1._FIELD_NAMES for _, name in row}
PIECES = [b"a", b"Z", b"0", b"-", b"!", b"~", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x7f",
          b"\x80", b"\xff", b"\"", b"(", b"@", b"=", b"x" * 21, b"X-Long-Name-Of-Twenty", b"value"]

fragment = st.one_of(st.sampled_from(PIECES), st.sampled_from(NAMES), st.binary(max_size=4))
line = st.one_of(
    # A well-formed field line: a name, a colon, optional whitespace, a value, CRLF.
    st.tuples(st.sampled_from(NAMES) | st.sampled_from([b"X-Custom", b"x-A", b"ETAG", b"Content-LENGTH"]),
              st.sampled_from([b"", b" ", b"\t", b"  "]),
              st.lists(st.sampled_from([b"v", b" ", b"\t", b"\x80", b"abc", b"=;,", b"\x7f", b"\r"]), max_size=5))
    .map(lambda t: t[0] + b":" + t[1] + b"".join(t[2]) + b"\r\n"),
    st.lists(fragment, max_size=6).map(b"".join),
)
head = st.tuples(st.sampled_from([b"", b"GET / HTTP/1.1\r\n"]), st.lists(line, max_size=8),
                 st.sampled_from([b"\r\n", b"", b"\r", b"\n", b"\r\nbody"])).map(lambda t: t[0] + b"".join(t[1]) + t[2])


def _scanner() -> object:
    assert native.state == "compiled", f"the C scanner is built with the compiled modules: {native.state}"
    scan = h1._bind_scan()
    assert scan is not None
    return scan


def both(data: bytes, start: int, refused: frozenset[bytes]) -> tuple[tuple[int, h1.Headers], tuple[int, h1.Headers]]:
    c_out: h1.Headers = []
    py_out: h1.Headers = []
    c = h1.parse_fields(data, start, c_out, refused)
    py = h1.parse_fields_reference(data, start, py_out, refused)
    return (c, c_out), (py, py_out)


@settings(max_examples=3000, deadline=None)
@given(head, st.booleans())
def test_the_c_scanner_answers_as_the_reference_on_any_head(data: bytes, response: bool) -> None:
    _scanner()
    refused = h1.LLHTTP_RESPONSE_FIELDS if response else h1.LLHTTP_FIELDS
    for start in {0, data.find(b"\n") + 1}:
        c, py = both(data, start, refused)
        assert c == py, (data, start)
        for (cn, _), (pn, _) in zip(c[1], py[1], strict=True):
            assert (cn is pn) if id(pn) in SHARED else id(cn) not in SHARED


def test_common_heads_and_each_way_out() -> None:
    _scanner()
    simple = b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: curl/8\r\nX-Trace:  a b \r\n\r\n"
    (c, out), (py, py_out) = both(simple, simple.index(b"\n") + 1, h1.LLHTTP_FIELDS)
    assert c == py == len(simple)
    assert out == py_out == [(b"host", b"web"), (b"user-agent", b"curl/8"), (b"x-trace", b"a b ")]
    assert out[0][0] is h1._FIELD_NAMES[4][0][1]  # the shared name object, as the reference gives
    # Each refusal: a field llhttp acts on, a bare LF, obs-fold, no colon, a control byte, no end.
    for bad in (b"Content-Length: 1\r\n\r\n", b"Host: a\n\r\n", b"Host: a\r\n b\r\n\r\n", b"Host a\r\n\r\n",
                b"Host: a\x00\r\n\r\n", b"Host: a\r\n", b"Transfer-Encoding: chunked\r\n\r\n", b": a\r\n\r\n",
                b"Ho st: a\r\n\r\n"):
        (c, _), (py, _) = both(bad, 0, h1.LLHTTP_FIELDS)
        assert c == py == -1, bad
    # A response's Content-Length is read on the fast path: not refused there.
    (c, out), (py, _) = both(b"Content-Length: 12\r\n\r\n", 0, h1.LLHTTP_RESPONSE_FIELDS)
    assert c == py == 22 and out == [(b"content-length", b"12")]


def test_bad_arguments_are_type_errors_not_crashes() -> None:
    scan = _scanner()
    with pytest.raises(TypeError):
        scan.parse_fields("text", 0, [], h1.LLHTTP_FIELDS)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        scan.parse_fields(b"a: b\r\n\r\n", 0, (), h1.LLHTTP_FIELDS)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        scan.parse_fields(b"a: b\r\n\r\n", -1, [], h1.LLHTTP_FIELDS)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        scan.bind([])  # type: ignore[attr-defined]
