"""tether's own protobuf runtime (tether.api.protolite) against google.protobuf as the oracle.

- Every message of src/tether/api/*.proto has a protolite class whose fields match its descriptor.
- Bytes from google.protobuf (messages populated at random: every oneof branch, repeated fields,
  maps, nesting, defaults, unknown fields of every wire type around them) decode with protolite to the
  same values; protolite's bytes decode with google.protobuf to an equal message.
- A test .proto compiled here covers what the API protos do not use: every scalar type, packed and
  unpacked repeated fields, maps of every key type.
- Malformed bytes raise protolite.DecodeError, and nothing else.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError as PbDecodeError
from google.protobuf.message import Message as PbMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.api import protolite
from tether.api.protolite import DecodeError, Duration, varint

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "src" / "tether" / "api" / "gen"
STEMS = sorted(p.stem[: -len("_pb2")] for p in GEN.glob("*_pb2.py"))
PB2 = {stem: importlib.import_module(f"tether.api.gen.{stem}_pb2") for stem in STEMS}
LITE = {stem: importlib.import_module(f"tether.api.gen.{stem}_lite") for stem in STEMS}
FD = FieldDescriptor


def _messages(d: Descriptor) -> Iterator[Descriptor]:
    if d.GetOptions().map_entry:
        return
    yield d
    for t in d.nested_types:
        yield from _messages(t)


def all_descriptors(modules: dict[str, ModuleType]) -> list[Descriptor]:
    return [d for m in modules.values() for top in m.DESCRIPTOR.message_types_by_name.values()
            for d in _messages(top)]


API = all_descriptors(PB2)


def lite_of(d: Descriptor) -> type[protolite.Message]:
    return protolite.message_class(d.full_name)


def pb_class(d: Descriptor) -> type[PbMessage]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(d)


# -- the test proto: what the API protos do not use ----------------------------------------------------

TEST_PROTO = """
syntax = "proto3";
package protolite.test;
import "google/protobuf/duration.proto";

message Scalars {
  enum Kind { ZERO = 0; ONE = 1; TWO = 2; }
  double d = 1; float f = 2; int64 i64 = 3; uint64 u64 = 4; int32 i32 = 5; fixed64 f64 = 6;
  fixed32 f32 = 7; bool b = 8; string s = 9; bytes by = 12; uint32 u32 = 13; Kind e = 14;
  sfixed32 sf32 = 15; sfixed64 sf64 = 16; sint32 si32 = 17; sint64 si64 = 18;
}
message Repeats {
  repeated double d = 1; repeated float f = 2; repeated int64 i64 = 3; repeated uint64 u64 = 4;
  repeated int32 i32 = 5; repeated fixed64 f64 = 6; repeated fixed32 f32 = 7; repeated bool b = 8;
  repeated string s = 9; repeated bytes by = 12; repeated uint32 u32 = 13; repeated Scalars.Kind e = 14;
  repeated sfixed32 sf32 = 15; repeated sfixed64 sf64 = 16; repeated sint32 si32 = 17; repeated sint64 si64 = 18;
  repeated int32 up_i32 = 101 [packed = false]; repeated sint64 up_si64 = 102 [packed = false];
  repeated fixed32 up_f32 = 103 [packed = false]; repeated double up_d = 104 [packed = false];
  repeated bool up_b = 105 [packed = false];
}
message Maps {
  map<int32, string> a = 1; map<string, Scalars> b = 2; map<bool, bytes> c = 3; map<uint64, int64> d = 4;
  map<sint32, double> e = 5; map<fixed64, Scalars.Kind> f = 6; map<sfixed32, float> g = 7;
  map<int64, Tree> h = 8; map<uint32, uint32> i = 9; map<sint64, fixed32> j = 10; map<fixed32, sfixed64> k = 11;
  map<sfixed64, bool> l = 12;
}
message Tree {
  oneof node { Tree left = 1; string leaf = 2; int32 n = 3; Scalars.Kind kind = 6; }
  repeated Tree kids = 4;
  google.protobuf.Duration took = 5;
}
"""


@pytest.fixture(scope="module")
def test_proto(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, list[Descriptor]]:
    """The test proto compiled by protoc (the pb2 module) and rendered by gen_protolite (the classes)."""
    work = tmp_path_factory.mktemp("proto")
    (work / "protolite_test.proto").write_text(TEST_PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(work), f"--python_out={work}",
                    str(work / "protolite_test.proto")], check=True, timeout=120)
    spec = importlib.util.spec_from_file_location("protolite_test_pb2", work / "protolite_test_pb2.py")
    assert spec is not None and spec.loader is not None
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    gen_spec = importlib.util.spec_from_file_location("gen_protolite", ROOT / "scripts" / "gen_protolite.py")
    assert gen_spec is not None and gen_spec.loader is not None
    gen = importlib.util.module_from_spec(gen_spec)
    gen_spec.loader.exec_module(gen)
    lite = ModuleType("protolite_test_lite")
    exec(compile(gen.Gen(pb.DESCRIPTOR).render(), "protolite_test_lite.py", "exec"), lite.__dict__)
    return pb, all_descriptors({"t": pb})


# -- populating google.protobuf messages at random -----------------------------------------------------

INT_RANGES = {FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
              FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
              FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
              FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
              FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1)}


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.sampled_from([0, lo, hi, 1, -1 if lo < 0 else 2]) | st.integers(lo, hi)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return st.text(max_size=12)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=12)
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=False)
    if t == FD.TYPE_DOUBLE:
        return st.floats(allow_nan=False)
    if t == FD.TYPE_ENUM:  # proto3 enums are open: a number the schema does not name survives too
        return st.sampled_from([v.number for v in f.enum_type.values] + [7, 1000, -5])
    raise AssertionError(f"no strategy for {f.full_name}")


MAX_DEPTH = 3


def fill(draw: Callable[..., Any], msg: PbMessage, depth: int = 0) -> PbMessage:
    d = msg.DESCRIPTOR
    for oneof in d.oneofs:
        choice = draw(st.sampled_from([None, *oneof.fields]))
        if choice is not None:
            set_field(draw, msg, choice, depth)
    for f in d.fields:
        if f.containing_oneof is None and draw(st.booleans()):
            set_field(draw, msg, f, depth)
    return msg


def set_field(draw: Callable[..., Any], msg: PbMessage, f: FieldDescriptor, depth: int) -> None:
    deeper = depth < MAX_DEPTH
    if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        k, v = f.message_type.fields_by_number[1], f.message_type.fields_by_number[2]
        container = getattr(msg, f.name)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(scalar(k))
            if v.type == FD.TYPE_MESSAGE:
                entry = container[key]
                if deeper:
                    fill(draw, entry, depth + 1)
            else:
                container[key] = draw(scalar(v))
    elif f.type == FD.TYPE_MESSAGE and f.is_repeated:
        for _ in range(draw(st.integers(0, 3 if deeper else 1))):
            item = getattr(msg, f.name).add()
            if deeper:
                fill(draw, item, depth + 1)
    elif f.type == FD.TYPE_MESSAGE:
        sub = getattr(msg, f.name)
        sub.SetInParent()  # present, even when it stays empty
        if deeper:
            fill(draw, sub, depth + 1)
    elif f.is_repeated:
        getattr(msg, f.name).extend(draw(st.lists(scalar(f), max_size=4)))
    else:
        setattr(msg, f.name, draw(scalar(f)))


def unknown_field(draw: Callable[..., Any], d: Descriptor) -> bytes:
    """One field the schema does not know, of any wire type (a group with a nested field too)."""
    num = draw(st.integers(1, 2**29 - 1).filter(lambda n: n not in d.fields_by_number and not 19000 <= n <= 19999))
    wt = draw(st.sampled_from([0, 1, 2, 3, 5]))
    tag = varint(num << 3 | wt)
    if wt == 0:
        return tag + varint(draw(st.integers(0, 2**64 - 1)))
    if wt == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wt == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wt == 2:
        body = draw(st.binary(max_size=8))
        return tag + varint(len(body)) + body
    return tag + varint(1 << 3 | 0) + varint(draw(st.integers(0, 300))) + varint(num << 3 | 4)


# -- comparing a protolite message with a google.protobuf one ------------------------------------------


def same(lite: Any, pb: PbMessage, where: str = "") -> None:
    d = pb.DESCRIPTOR
    here = where or d.name
    assert type(lite).__name__ == d.name, here
    for oneof in d.oneofs:
        assert lite.WhichOneof(oneof.name) == pb.WhichOneof(oneof.name), f"{here}.{oneof.name}"
    for f in d.fields:
        at = f"{here}.{f.name}"
        mine, theirs = getattr(lite, f.name), getattr(pb, f.name)
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            assert set(mine) == set(theirs), at
            v = f.message_type.fields_by_number[2]
            for key in theirs:
                if v.type == FD.TYPE_MESSAGE:
                    same(mine[key], theirs[key], f"{at}[{key!r}]")
                else:
                    assert _eq(mine[key], theirs[key]), at
        elif f.type == FD.TYPE_MESSAGE and f.is_repeated:
            assert len(mine) == len(theirs), at
            for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                same(a, b, f"{at}[{i}]")
        elif f.type == FD.TYPE_MESSAGE:
            assert lite.HasField(f.name) == pb.HasField(f.name), at
            if pb.HasField(f.name):  # (an unset one reads as an empty message, on both sides)
                same(mine, theirs, at)
        elif f.is_repeated:
            assert len(mine) == len(theirs) and all(_eq(a, b) for a, b in zip(mine, theirs, strict=True)), at
        else:
            assert _eq(mine, theirs), (at, mine, theirs)


def _eq(a: Any, b: Any) -> bool:
    if isinstance(b, float):
        return isinstance(a, float) and (a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


def to_lite(pb: PbMessage) -> protolite.Message:
    """The same message built with protolite's keyword constructor."""
    d = pb.DESCRIPTOR
    kw: dict[str, Any] = {}
    for f, value in pb.ListFields():
        if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            v = f.message_type.fields_by_number[2]
            kw[f.name] = {k: to_lite(x) if v.type == FD.TYPE_MESSAGE else x for k, x in value.items()}
        elif f.type == FD.TYPE_MESSAGE and f.is_repeated:
            kw[f.name] = [to_lite(x) for x in value]
        elif f.type == FD.TYPE_MESSAGE:
            kw[f.name] = to_lite(value)
        elif f.is_repeated:
            kw[f.name] = list(value)
        else:
            kw[f.name] = value
    return lite_of(d)(**kw)


# -- the schema --------------------------------------------------------------------------------------


def test_every_api_message_has_a_protolite_class_matching_its_descriptor() -> None:
    assert len(API) > 150
    for d in API:
        cls = lite_of(d)
        rows = {row[0]: row for row in cls._fields_}
        assert set(rows) == set(d.fields_by_number), d.full_name
        for f in d.fields:
            _num, name, type_, label, ref, oneof = rows[f.number]
            assert (name, oneof) == (f.name, f.containing_oneof.name if f.containing_oneof else None), f.full_name
            if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
                k, v = f.message_type.fields_by_number[1], f.message_type.fields_by_number[2]
                assert label == protolite.MAP and ref[:2] == (k.type, v.type), f.full_name
                assert ref[2] == (v.message_type.full_name if v.message_type else None), f.full_name
            else:
                assert (type_, label) == (f.type, protolite.REPEATED if f.is_repeated else protolite.SINGULAR)
                assert ref == (f.message_type.full_name if f.message_type else None), f.full_name
        for e in d.enum_types:  # nested enum values on the message, as protobuf has them
            for v in e.values:
                assert getattr(cls, v.name) == v.number


def test_enums_name_and_number_their_values_as_protobufs_do() -> None:
    from tether.api.gen import http_types_lite, http_types_pb2

    ours, theirs = http_types_lite.HttpMethod.Registered, http_types_pb2.HttpMethod.Registered
    assert ours.items() == list(theirs.items())
    for name, number in theirs.items():
        assert ours.Name(number) == name and ours.Value(name) == number
    with pytest.raises(ValueError):
        ours.Name(99)
    assert http_types_lite.Scheme.HTTPS == http_types_pb2.Scheme.HTTPS


@pytest.mark.parametrize("nanos", [0, 1, 999_999_999, 1_000_000_000, 1_500_000_000, -1, -1_500_000_000, 10**15])
def test_durations_of_nanoseconds_match_protobufs(nanos: int) -> None:
    theirs = duration_pb2.Duration()
    theirs.FromNanoseconds(nanos)
    ours = Duration.of_nanos(nanos)
    assert (ours.seconds, ours.nanos) == (theirs.seconds, theirs.nanos)
    assert duration_pb2.Duration.FromString(ours.SerializeToString()) == theirs


# -- round trips --------------------------------------------------------------------------------------


def _round_trip(draw: Callable[..., Any], d: Descriptor) -> None:
    pb = fill(draw, pb_class(d)())
    raw = pb.SerializeToString()
    # Theirs -> ours, with unknown fields around the known ones.
    before = b"".join(unknown_field(draw, d) for _ in range(draw(st.integers(0, 2))))
    after = b"".join(unknown_field(draw, d) for _ in range(draw(st.integers(0, 2))))
    ours = lite_of(d).FromString(before + raw + after)
    same(ours, pb)
    # Ours -> theirs: what protolite encodes (decoded or built) is the same message to protobuf.
    assert pb_class(d).FromString(ours.SerializeToString()) == pb
    built = to_lite(pb)
    assert built == ours
    assert pb_class(d).FromString(built.SerializeToString()) == pb
    # Two encodings back to back are one merged message, as protobuf merges them.
    other = fill(draw, pb_class(d)())
    merged = pb_class(d)()
    merged.MergeFrom(pb)
    merged.MergeFrom(other)
    same(lite_of(d).FromString(raw + other.SerializeToString()), merged)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_api_messages_round_trip_with_protobuf(data: st.DataObject) -> None:
    d = data.draw(st.sampled_from(API))
    _round_trip(data.draw, d)


@pytest.mark.parametrize("name", ["io.linkerd.proxy.destination.Update",
                                  "io.linkerd.proxy.destination.DestinationProfile",
                                  "io.linkerd.proxy.outbound.OutboundPolicy", "io.linkerd.proxy.inbound.Server",
                                  "io.linkerd.proxy.tap.ObserveRequest", "io.linkerd.proxy.tap.TapEvent",
                                  "io.linkerd.proxy.identity.CertifyResponse",
                                  "io.linkerd.proxy.identity.CertifyRequest",
                                  "io.linkerd.proxy.outbound.TrafficSpec", "io.linkerd.proxy.inbound.PortSpec",
                                  "io.linkerd.proxy.destination.GetDestination"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_messages_the_proxy_sends_and_reads_round_trip(name: str, data: st.DataObject) -> None:
    _round_trip(data.draw, next(d for d in API if d.full_name == name))


def test_every_oneof_branch_alone_and_at_its_default_round_trips() -> None:
    """Each member of each oneof set on its own, to its default value (present all the same)."""
    count = 0
    for d in API:
        for oneof in d.oneofs:
            for f in oneof.fields:
                pb = pb_class(d)()
                if f.type == FD.TYPE_MESSAGE:
                    getattr(pb, f.name).SetInParent()
                else:
                    setattr(pb, f.name, f.default_value)
                assert pb.WhichOneof(oneof.name) == f.name
                ours = lite_of(d).FromString(pb.SerializeToString())
                same(ours, pb)
                assert ours.HasField(f.name) and ours.HasField(oneof.name)
                assert pb_class(d).FromString(ours.SerializeToString()) == pb
                assert pb_class(d).FromString(to_lite(pb).SerializeToString()) == pb
                count += 1
    assert count > 100


def test_setting_a_oneof_member_clears_the_others() -> None:
    from tether.api.gen import net_lite

    ip = net_lite.IPAddress(ipv4=1)
    ip.ipv6 = net_lite.IPv6(first=1, last=2)
    assert ip.WhichOneof("ip") == "ipv6" and not ip.HasField("ipv4") and ip.ipv4 == 0


def test_defaults_read_without_setting_anything() -> None:
    from tether.api.gen import destination_lite

    w = destination_lite.WeightedAddr()
    assert (w.weight, w.metric_labels, w.HasField("addr"), w.addr.port) == (0, {}, False, 0)
    assert w.SerializeToString() == b""
    with pytest.raises(ValueError, match="no presence"):
        w.HasField("weight")
    with pytest.raises(TypeError, match="no field 'nope'"):
        destination_lite.WeightedAddr(nope=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_scalar_type_packed_unpacked_and_map_round_trips(test_proto: tuple[ModuleType, list[Descriptor]],
                                                                data: st.DataObject) -> None:
    _pb, descriptors = test_proto
    _round_trip(data.draw, data.draw(st.sampled_from(descriptors)))


def test_repeated_numbers_read_packed_and_unpacked(test_proto: tuple[ModuleType, list[Descriptor]]) -> None:
    pb, _ = test_proto
    theirs = pb.Repeats(i32=[1, -2, 3], up_i32=[1, -2, 3], si64=[-1, 5], up_si64=[-1, 5], d=[0.5], up_d=[0.5],
                        b=[True, False], up_b=[True, False], f32=[7], up_f32=[7])
    raw = theirs.SerializeToString()
    # protobuf wrote i32 packed (one length-delimited field) and up_i32 one number at a time.
    assert varint(5 << 3 | 2) + b"\x0c" in raw and varint(101 << 3 | 0) + b"\x01" in raw
    ours: Any = protolite.message_class("protolite.test.Repeats").FromString(raw)
    assert (ours.i32, ours.up_i32, ours.si64, ours.up_si64) == ([1, -2, 3], [1, -2, 3], [-1, 5], [-1, 5])
    assert (ours.b, ours.up_b, ours.f32, ours.up_f32, ours.d, ours.up_d) == \
        ([True, False], [True, False], [7], [7], [0.5], [0.5])
    # The same numbers written the other way (packed as unpacked, unpacked as packed) read the same.
    swapped = (varint(5 << 3 | 0) + varint(1) + varint(5 << 3 | 0) + varint(2**64 - 2)
               + varint(101 << 3 | 2) + varint(2) + b"\x01\x02")
    again: Any = protolite.message_class("protolite.test.Repeats").FromString(swapped)
    assert (again.i32, again.up_i32) == ([1, -2], [1, 2])
    assert pb.Repeats.FromString(swapped).i32 == [1, -2]


def test_zigzag_and_fixed_width_bytes_are_protobufs(test_proto: tuple[ModuleType, list[Descriptor]]) -> None:
    pb, _ = test_proto
    lite = protolite.message_class("protolite.test.Scalars")
    for kw in ({"si32": -1}, {"si32": -(2**31)}, {"si64": 2**63 - 1}, {"si64": -(2**63)}, {"sf32": -5},
               {"sf64": -(2**63)}, {"i32": -1}, {"i64": -(2**63)}, {"u64": 2**64 - 1}, {"f": -0.0}, {"d": -0.0},
               {"e": 2}, {"b": True}, {"s": "\u00e9\U0001f600"}, {"by": b"\x00\xff"}):
        assert lite(**kw).SerializeToString() == pb.Scalars(**kw).SerializeToString(), kw


def test_values_out_of_range_are_refused_when_encoding() -> None:
    from tether.api.gen import destination_lite, net_lite

    with pytest.raises(ValueError, match="out of range"):
        net_lite.TcpAddress(port=2**32).SerializeToString()
    with pytest.raises(TypeError, match="expected str"):
        destination_lite.GetDestination(path=b"x").SerializeToString()


# -- malformed input ------------------------------------------------------------------------------------


def _nested(field: int, depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = varint(field << 3 | 2) + varint(len(inner)) + inner
    return inner


def _cls(name: str) -> Any:
    return protolite.message_class(name)


GET = "io.linkerd.proxy.destination.GetDestination"
IP = "io.linkerd.proxy.net.IPAddress"
MATCH = "io.linkerd.proxy.destination.RequestMatch"
NOT = next(d for d in API if d.full_name == MATCH).fields_by_name["not"].number

MALFORMED = {
    "truncated varint": (GET, b"\x0a"),
    "truncated tag": (GET, b"\x80"),
    "varint longer than 10 bytes": (GET, b"\x78" + b"\xff" * 10 + b"\x01"),
    "length past the end": (GET, b"\x0a\x05abc"),
    "huge length": (GET, b"\x0a" + varint(2**62) + b"x"),
    "huge length of an unknown field": (GET, b"\x7a" + varint(2**63) + b"x"),
    "truncated fixed32": (IP, b"\x0d\x01\x02"),
    "truncated unknown fixed64": (GET, b"\x79\x01\x02\x03"),
    "wire type 6": (GET, b"\x0e"),
    "wire type 7": (GET, b"\x7f"),
    "end-group without a start": (GET, b"\x7c"),
    "group never ended": (GET, b"\x7b\x08\x01"),
    "group ended by another field's end": (GET, b"\x7b\x84\x01"),
    "field number 0": (GET, b"\x00\x01"),
    "tag over 32 bits": (GET, varint(2**35 | 0) + b"\x01"),
    # Found by the fuzzer: a tag padded to 6 bytes (its value fits 32 bits); protobuf's runtimes
    # read a tag as a uint32 of at most 5 bytes.
    "tag of 6 bytes": (GET, b"\x85\x84\x84\x84\x83\x00\x1a\x02\x08\x24"),
    "tag of 6 bytes in a group": (GET, b"\x7b\x88\x80\x80\x80\x80\x00\x01\x7c"),
    "a string field as a varint": (GET, b"\x08\x01"),
    "a fixed32 field as length-delimited": (IP, b"\x0a\x04\x01\x02\x03\x04"),
    "a message field as fixed64": (MATCH, varint(NOT << 3 | 1) + b"\x00" * 8),
    "invalid UTF-8": (GET, b"\x0a\x02\xff\xfe"),
    "nesting deeper than 100": (MATCH, _nested(NOT, 101)),
    "groups nested deeper than 100": (GET, b"\x7b" * 150 + b"\x7c" * 150),
    "map entry with a wrong wire type": ("io.linkerd.proxy.destination.WeightedAddrSet", b"\x12\x02\x08\x01"),
    # Found by the fuzzer: a field number 0 nested where only the top level used to check it.
    "field number 0 in a map entry": ("io.linkerd.proxy.destination.WeightedAddrSet", b"\x12\x02\x02\x00"),
    "field number 0 in a group": (GET, b"\x7b\x02\x00\x7c"),
    "invalid UTF-8 in a map key": ("io.linkerd.proxy.destination.WeightedAddrSet", b"\x12\x06\x0a\x01\xff\x12\x01a"),
    "a map value past the entry": ("io.linkerd.proxy.destination.WeightedAddrSet", b"\x12\x06\x0a\x01k\x12\x05a"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bytes_raise_decode_error(case: str) -> None:
    name, raw = MALFORMED[case]
    start = time.monotonic()
    with pytest.raises(DecodeError):
        _cls(name).FromString(raw)
    assert time.monotonic() - start < 1.0


def test_nesting_up_to_the_limit_decodes() -> None:
    m = _cls(MATCH).FromString(_nested(NOT, 100))
    depth = 0
    while m.WhichOneof("match") == "not":
        m = getattr(m, "not")
        depth += 1
    assert depth == 100


def test_every_truncation_of_a_rich_message_is_an_error_or_a_prefix() -> None:
    from tether.api.gen import destination_pb2 as d

    update = d.Update(add=d.WeightedAddrSet(metric_labels={"ns": "shop"}, addrs=[
        d.WeightedAddr(weight=10, metric_labels={"pod": "web-1"},
                       tls_identity=d.TlsIdentity(dns_like_identity=d.TlsIdentity.DnsLikeIdentity(name="web")))]))
    raw = update.SerializeToString()
    errors = 0
    for n in range(len(raw)):
        try:
            _cls("io.linkerd.proxy.destination.Update").FromString(raw[:n])
        except DecodeError:
            errors += 1
            with pytest.raises(PbDecodeError):
                d.Update.FromString(raw[:n])
    assert errors == len(raw) - 1  # only the empty prefix is a (empty) message: everything else cuts a field


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted({d.full_name for d in API})), st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(name: str, raw: bytes) -> None:
    try:
        msg = _cls(name).FromString(raw)
    except DecodeError:
        return
    again = _cls(name).FromString(msg.SerializeToString())
    assert again == msg


def test_fixed_width_and_varint_primitives() -> None:
    assert varint(0) == b"\x00" and varint(300) == b"\xac\x02" and varint(-1) == b"\xff" * 9 + b"\x01"
    assert struct.unpack("<I", b"\x01\x00\x00\x00")[0] == 1


def test_a_map_entry_with_an_unknown_field_is_dropped_as_protobuf_drops_it() -> None:
    """Found by the fuzzer: upb leaves such an entry out of the map; protolite does the same."""
    from tether.api.gen import inbound_pb2

    entry = b"\x4a\x04kind" + b"\x12\x07default"  # field 9 (unknown), then the value
    good = b"\x0a\x04name\x12\x03all"
    raw = b"\x22" + varint(len(entry)) + entry + b"\x22" + varint(len(good)) + good
    assert dict(_cls("io.linkerd.proxy.inbound.Server").FromString(raw).labels) == {"name": "all"}
    assert dict(inbound_pb2.Server.FromString(raw).labels) == {"name": "all"}
