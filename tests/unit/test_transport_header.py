"""The mesh transport header on the wire: the bytes Linkerd's proxies write and read
(``transport.l5d.io/v1``: preface, length, protobuf ``transport.l5d.io.Header``), checked against the
protobuf library's own encoding of that schema, and the JSON form tether releases before 0.2.0 used."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tether.core import transport_header as th

PREFACE = b"transport.l5d.io/v1\r\n\r\n"


def _header_class() -> Any:
    """transport.l5d.io.Header (linkerd2-proxy's linkerd/transport-header/proto/header.proto), built here."""
    f = descriptor_pb2.FileDescriptorProto(name="tether_test_header.proto", package="transport.l5d.io",
                                           syntax="proto3")
    sp = f.message_type.add(name="SessionProtocol")
    sp.nested_type.add(name="Http1")
    sp.nested_type.add(name="Http2")
    sp.oneof_decl.add(name="kind")
    for number, name in ((1, "Http1"), (2, "Http2")):
        sp.field.add(name=name.lower(), number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                     type_name=f".transport.l5d.io.SessionProtocol.{name}", oneof_index=0)
    h = f.message_type.add(name="Header")
    h.field.add(name="port", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    h.field.add(name="name", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    h.field.add(name="session_protocol", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                type_name=".transport.l5d.io.SessionProtocol")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("transport.l5d.io.Header"))


Header = _header_class()


def linkerd_bytes(port: int, name: str = "", protocol: str | None = None) -> bytes:
    """What a Linkerd proxy writes for this header (the protobuf library encoding the schema)."""
    msg = Header(port=port, name=name)
    if protocol is not None:
        getattr(msg.session_protocol, protocol).SetInParent()
    body = msg.SerializeToString()
    return PREFACE + len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize(("header", "protocol"), [
    (th.TransportHeader(8080), None),
    (th.TransportHeader(5432, "db.prod.svc.cluster.local"), None),
    (th.TransportHeader(80, "", th.HTTP1), "http1"),
    (th.TransportHeader(65535, "web.default.svc.cluster.local", th.HTTP2), "http2"),
])
def test_the_bytes_are_linkerds(header: th.TransportHeader, protocol: str | None) -> None:
    ours = th.encode(header)
    assert ours == linkerd_bytes(header.port, header.name, protocol)
    assert th.decode(ours + b"rest") == (header, len(ours))


def test_a_linkerd_header_decodes_whatever_follows_it_stays() -> None:
    data = linkerd_bytes(4000, "x.y", "http2") + b"PRI * HTTP/2.0\r\n"
    got = th.decode(data)
    assert got is not None and got[0] == th.TransportHeader(4000, "x.y", th.HTTP2)
    assert data[got[1]:] == b"PRI * HTTP/2.0\r\n"
    for cut in range(len(data) - len(b"PRI * HTTP/2.0\r\n")):  # any shorter prefix: more bytes needed
        assert th.decode(data[:cut]) is None


def test_the_json_of_releases_before_0_2_0_is_still_read_and_written_on_request() -> None:
    old = b'{"port":8080,"name":"","protocol":"opaque"}'
    data = PREFACE + len(old).to_bytes(4, "big") + old
    assert th.decode(data) == (th.TransportHeader(8080), len(data))
    legacy = th.encode(th.TransportHeader(9000, "a.b"), legacy=True)
    body = legacy[len(PREFACE) + 4:]
    assert json.loads(body) == {"port": 9000, "name": "a.b", "protocol": "opaque"}


@pytest.mark.parametrize(("body", "reason"), [
    (Header(port=0).SerializeToString(), "port 0 out of range"),
    (Header(port=-1).SerializeToString(), "port -1 out of range"),
    (Header(port=70000).SerializeToString(), "port 70000 out of range"),
    (b"\x08", "bad varint"),
    (b"\x12\x05ab", "runs past the end"),
    (b"\x0b", "unsupported wire type 3"),
    (b"\x12\x02\xff\xfe" + Header(port=1).SerializeToString(), "not UTF-8"),
    (b'{"port": 80, "protocol": "http1"}', "is not opaque"),
    (b'{"port": "x"}', "malformed"),
])
def test_bad_headers_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(th.TransportHeaderError, match=reason):
        th.decode(PREFACE + len(body).to_bytes(4, "big") + body)


def test_unknown_fields_are_skipped_as_protobuf_requires() -> None:
    body = Header(port=8080).SerializeToString() + b"\x25\x01\x02\x03\x04" + b"\xa0\x06\x05"  # fixed32, field 100
    assert th.decode(PREFACE + len(body).to_bytes(4, "big") + body) is not None
