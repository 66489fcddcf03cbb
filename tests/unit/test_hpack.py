"""HPACK: RFC 7541 Appendix C, Huffman coding, round trips, and the ``hpack`` package as an oracle."""

from __future__ import annotations

import hpack as oracle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.http.hpack import (
    HUFFMAN_CODES,
    HUFFMAN_LENGTHS,
    STATIC_TABLE,
    Decoder,
    Encoder,
    HeaderListTooLarge,
    HPACKError,
    encode_integer,
    huffman_decode,
    huffman_encode,
)

H = bytes.fromhex


def test_tables_match_the_oracle() -> None:
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
    from hpack.table import HeaderTable

    assert list(HUFFMAN_LENGTHS) == list(REQUEST_CODES_LENGTH)
    assert list(REQUEST_CODES) == HUFFMAN_CODES
    assert list(STATIC_TABLE) == list(HeaderTable.STATIC_TABLE)


def test_integer_examples_c1() -> None:
    for value, prefix, expected in ((10, 5, b"\x0a"), (1337, 5, b"\x1f\x9a\x0a"), (42, 8, b"\x2a")):
        out = bytearray()
        encode_integer(value, prefix, 0, out)
        assert bytes(out) == expected


# RFC 7541 C.2: single representations, decoded with a fresh table.
@pytest.mark.parametrize(
    ("block", "headers", "table_size"),
    [
        (H("400a637573746f6d2d6b65790d637573746f6d2d686561646572"), [(b"custom-key", b"custom-header")], 55),
        (H("040c2f73616d706c652f70617468"), [(b":path", b"/sample/path")], 0),
        (H("100870617373776f726406736563726574"), [(b"password", b"secret")], 0),
        (H("82"), [(b":method", b"GET")], 0),
    ],
)
def test_c2_single_representations(block: bytes, headers: list[tuple[bytes, bytes]], table_size: int) -> None:
    d = Decoder()
    assert d.decode(block) == headers
    assert d.table_size == table_size


REQ1 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
REQ2 = [*REQ1, (b"cache-control", b"no-cache")]
REQ3 = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/index.html"),
    (b":authority", b"www.example.com"),
    (b"custom-key", b"custom-value"),
]
C3 = [
    H("828684410f7777772e6578616d706c652e636f6d"),
    H("828684be58086e6f2d6361636865"),
    H("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
]
C4 = [
    H("828684418cf1e3c2e5f23a6ba0ab90f4ff"),
    H("828684be5886a8eb10649cbf"),
    H("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
]
RESP1 = [
    (b":status", b"302"),
    (b"cache-control", b"private"),
    (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
    (b"location", b"https://www.example.com"),
]
RESP2 = [(b":status", b"307"), *RESP1[1:]]
RESP3 = [
    (b":status", b"200"),
    (b"cache-control", b"private"),
    (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
    (b"location", b"https://www.example.com"),
    (b"content-encoding", b"gzip"),
    (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
]
C5 = [
    H(
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
        "6e1768747470733a2f2f7777772e6578616d706c652e636f6d"
    ),
    H("4803333037c1c0bf"),
    H(
        "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f"
        "3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b2076"
        "657273696f6e3d31"
    ),
]
C6 = [
    H(
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f"
        "0b97c8e9ae82ae43d3"
    ),
    H("4883640effc1c0bf"),
    H(
        "88c16196d07abe941054d444a8200595040b8166e084a62d1bff c05a839bd9ab77ad94e7821dd7f2e6c7b335dfdf"
        "cd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007".replace(" ", "")
    ),
]


@pytest.mark.parametrize(
    ("blocks", "lists", "size", "huffman", "sizes"),
    [
        (C3, [REQ1, REQ2, REQ3], 4096, False, [57, 110, 164]),
        (C4, [REQ1, REQ2, REQ3], 4096, True, [57, 110, 164]),
        (C5, [RESP1, RESP2, RESP3], 256, False, [222, 222, 215]),
        (C6, [RESP1, RESP2, RESP3], 256, True, [222, 222, 215]),
    ],
    ids=["C.3", "C.4", "C.5", "C.6"],
)
def test_appendix_c_sequences(
    blocks: list[bytes], lists: list[list[tuple[bytes, bytes]]], size: int, huffman: bool, sizes: list[int]
) -> None:
    dec = Decoder(max_allowed_table_size=size)
    enc = Encoder(table_size=size)
    enc.huffman = huffman
    ref = oracle.Decoder(max_header_list_size=65536)
    ref.header_table_size = size
    for block, headers, table_size in zip(blocks, lists, sizes, strict=True):
        assert dec.decode(block) == headers
        assert dec.table_size == table_size
        assert [(bytes(k), bytes(v)) for k, v in ref.decode(block, raw=True)] == headers
        assert enc.encode(headers) == block


def test_huffman_rfc_strings() -> None:
    assert huffman_encode(b"www.example.com") == H("f1e3c2e5f23a6ba0ab90f4ff")
    assert huffman_decode(H("a8eb10649cbf")) == b"no-cache"


def test_huffman_errors() -> None:
    with pytest.raises(HPACKError, match="padding"):
        huffman_decode(b"\x00")  # '0' then 3 zero bits of padding: padding must be ones
    with pytest.raises(HPACKError, match="padding"):
        huffman_decode(H("f1e3c2e5f23a6ba0ab90f4ff") + b"\xff")  # 8 bits of padding
    with pytest.raises(HPACKError, match="EOS"):
        huffman_decode(b"\xff\xff\xff\xff")  # EOS, 30 ones


def test_decoder_errors() -> None:
    with pytest.raises(HPACKError, match="out of range"):
        Decoder().decode(b"\xbe")  # index 62, empty dynamic table
    with pytest.raises(HPACKError, match="index 0"):
        Decoder().decode(b"\x80")
    with pytest.raises(HPACKError, match="longer than the field block"):
        Decoder().decode(b"\x40\x85ab")
    with pytest.raises(HPACKError, match="truncated integer"):
        Decoder().decode(b"\xff")
    with pytest.raises(HPACKError, match="after a field"):
        Decoder().decode(b"\x82\x20")
    with pytest.raises(HPACKError, match="above the limit"):
        Decoder().decode(b"\x3f\xe2\x1f")  # size update to 4096 + 1
    with pytest.raises(HPACKError, match="too large"):
        Decoder().decode(b"\x7f\xff\xff\xff\xff\xff\x01")


def test_size_update_evicts_and_encoder_signals_it() -> None:
    enc, dec = Encoder(), Decoder()
    dec.decode(enc.encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    assert dec.table_size == 2 * (3 + 1 + 32)
    enc.table_size = 0
    enc.table_size = 100
    block = enc.encode([(b"x-a", b"1")])
    assert block[:1] == b"\x20"  # the minimum (0) first, then the final size
    assert dec.decode(block) == [(b"x-a", b"1")]
    assert dec.table_size == 36


def test_header_list_size_limit_keeps_the_table_in_sync() -> None:
    enc, dec = Encoder(), Decoder(max_header_list_size=100)
    with pytest.raises(HeaderListTooLarge):
        dec.decode(enc.encode([(b"x-big", b"v" * 80), (b"x-small", b"1")]))
    # The table still matches the encoder's: indexed references decode.
    assert dec.decode(enc.encode([(b"x-small", b"1")])) == [(b"x-small", b"1")]


def test_sensitive_fields_are_never_indexed() -> None:
    enc = Encoder()
    block = enc.encode([(b"authorization", b"secret")])
    assert block[0] & 0xF0 == 0x10
    assert oracle.Decoder().decode(block, raw=True)[0] == (b"authorization", b"secret")


names = st.binary(min_size=1, max_size=20).map(lambda b: b.lower())
values = st.binary(max_size=60)
header_lists = st.lists(st.tuples(names, values), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_huffman_round_trip(data: bytes) -> None:
    assert huffman_decode(huffman_encode(data)) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(header_lists, min_size=1, max_size=6), st.sampled_from([0, 64, 256, 4096]))
def test_round_trips_and_oracle(blocks: list[list[tuple[bytes, bytes]]], table: int) -> None:
    enc, dec = Encoder(table_size=table), Decoder(max_allowed_table_size=table)
    ref_dec = oracle.Decoder()
    ref_dec.header_table_size = table
    ref_enc = oracle.Encoder()
    ref_enc.header_table_size = table
    dec2 = Decoder(max_allowed_table_size=table)
    for headers in blocks:
        block = enc.encode(headers)
        assert dec.decode(block) == headers
        assert [(bytes(k), bytes(v)) for k, v in ref_dec.decode(block, raw=True)] == headers
        assert dec2.decode(ref_enc.encode(headers)) == headers


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_blocks_only_raise_hpack_errors(block: bytes) -> None:
    dec = Decoder(max_header_list_size=256)
    try:
        dec.decode(block)
    except HPACKError:
        pass
    assert dec.table_size <= 4096


# A few recurring lists (as a connection sends: the same heads again and again), drawn in any order.
recurring = st.lists(st.sampled_from([
    [(b":status", b"200"), (b"content-type", b"application/grpc")],
    [(b"grpc-status", b"0"), (b"grpc-message", b"")],
    [(b":method", b"POST"), (b":path", b"/svc/M"), (b"te", b"trailers"), (b"x-id", b"7")],
    [(b"x-big", b"v" * 3000)],
    [(b"authorization", b"secret"), (b"x-id", b"8")],
]), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(recurring, st.lists(st.sampled_from([None, 0, 100, 4096, "huffman"]), min_size=12, max_size=12))
def test_recurring_lists_decode_to_themselves_whatever_changed_between(
    lists: list[list[tuple[bytes, bytes]]], changes: list[object]
) -> None:
    # The encoder reuses a remembered block only where the table (size, entries) and the coding
    # are as they were; the oracle decodes every block to the list that was encoded.
    enc = Encoder()
    ref_dec = oracle.Decoder()
    for headers, change in zip(lists, changes, strict=False):
        if change == "huffman":
            enc.huffman = not enc.huffman
        elif isinstance(change, int):
            enc.table_size = change
        block = enc.encode(headers)
        assert [(bytes(k), bytes(v)) for k, v in ref_dec.decode(block, raw=True)] == headers


def test_a_list_changed_after_encoding_is_encoded_as_it_now_is() -> None:
    enc, ref_dec = Encoder(), oracle.Decoder()
    headers = [(b"content-type", b"application/grpc")]
    for _ in range(3):
        assert ref_dec.decode(enc.encode(headers), raw=True) == [(b"content-type", b"application/grpc")]
    headers.append((b"grpc-status", b"0"))  # the caller reuses its list
    assert ref_dec.decode(enc.encode(headers), raw=True) == headers
    headers[0] = (b"content-type", b"text/plain")
    assert ref_dec.decode(enc.encode(headers), raw=True) == headers
