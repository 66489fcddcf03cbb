"""A small protobuf (proto3) runtime: the proxy's messages without google.protobuf.

The proxy speaks linkerd2-proxy-api's messages to the control plane. google.protobuf (upb and its
descriptor pool) with the generated ``*_pb2`` modules the proxy used cost ~4.5 MiB of RSS per proxy for
a few hundred fields of plain data; this runtime and its generated classes cost ~0.7 MiB. The control
plane, the CLI and the tests keep google.protobuf.

The message classes are generated at setup time (``scripts/gen_protolite.py``, run by
``scripts/gen-protos.sh``) from the same descriptors as the ``*_pb2`` modules, into
``tether.api.gen.<name>_lite``. Each is a :class:`Message` subclass with one slot per field and a
``_fields_`` table. What they do, as protobuf's Python messages do:

- attribute access; an unset field reads as its proto3 default (0, "", b"", False, an empty message,
  list or dict); ``HasField`` for message fields and oneof members, ``WhichOneof``;
- keyword construction; setting a oneof member clears the others;
- ``SerializeToString`` / ``FromString``: varint, zigzag, fixed32/64, length-delimited, packed and
  unpacked repeated fields, maps, nested messages (merged when repeated on the wire, as protobuf does);
  unknown fields are skipped.

What they do not: mutate an unset sub-message in place (``msg.sub.x = 1`` on an unset ``sub`` is lost:
build with keywords instead), keep unknown fields for re-encoding, proto2 groups in known fields.

Decoding is for hostile bytes: anything malformed (a truncated or over-long varint, a length past the
end, a wire type that does not fit the field, invalid UTF-8, nesting deeper than
:data:`MAX_DEPTH`) raises :class:`DecodeError`, and no decoded object is larger than a constant times
the input.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

MAX_DEPTH: Final = 100  # nested messages (and groups being skipped), as protobuf's default recursion limit

# Field types: descriptor.proto's FieldDescriptorProto.Type numbers.
DOUBLE, FLOAT, INT64, UINT64, INT32, FIXED64, FIXED32, BOOL, STRING, GROUP, MESSAGE, BYTES, UINT32, ENUM, \
    SFIXED32, SFIXED64, SINT32, SINT64 = range(1, 19)
# Labels in a _fields_ table.
SINGULAR, REPEATED, MAP = 0, 1, 2

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
_MASK32: Final = (1 << 32) - 1
_MASK64: Final = (1 << 64) - 1
_VARINT_TYPES = frozenset((INT64, UINT64, INT32, BOOL, UINT32, ENUM, SINT32, SINT64))
_I32_TYPES = frozenset((FIXED32, SFIXED32, FLOAT))
_I64_TYPES = frozenset((FIXED64, SFIXED64, DOUBLE))
_STRUCTS = {FIXED32: struct.Struct("<I"), SFIXED32: struct.Struct("<i"), FLOAT: struct.Struct("<f"),
            FIXED64: struct.Struct("<Q"), SFIXED64: struct.Struct("<q"), DOUBLE: struct.Struct("<d")}
# The range each integer type accepts when encoding.
_RANGES = {INT32: (-(1 << 31), (1 << 31) - 1), SINT32: (-(1 << 31), (1 << 31) - 1),
           SFIXED32: (-(1 << 31), (1 << 31) - 1), ENUM: (-(1 << 31), (1 << 31) - 1),
           INT64: (-(1 << 63), (1 << 63) - 1), SINT64: (-(1 << 63), (1 << 63) - 1),
           SFIXED64: (-(1 << 63), (1 << 63) - 1), UINT32: (0, _MASK32), FIXED32: (0, _MASK32),
           UINT64: (0, _MASK64), FIXED64: (0, _MASK64)}

M = TypeVar("M", bound="Message")


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the message asked for; the message says where."""


# -- wire primitives ------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _read_tag_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A tag: a varint of at most 5 bytes and 32 bits (longer ones are refused, as upb and the C++
    runtime refuse them: a tag is a uint32)."""
    start = pos
    tag, pos = _read_varint(buf, pos, end)
    if pos - start > 5 or tag > _MASK32:
        raise DecodeError(f"invalid tag at byte {start}: longer than 32 bits")
    return tag, pos


def _read_tag(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag)."""
    tag, pos = _read_tag_varint(buf, pos, end)
    if tag >> 3 == 0:
        raise DecodeError("invalid field number 0")
    return tag >> 3, tag & 7, pos


def varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64; negative numbers as their 64-bit two's complement) as a varint."""
    n &= _MASK64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


def _scalar_from_varint(t: int, v: int) -> Any:
    if t in (INT32, ENUM):
        return _signed(v & _MASK32, 32)
    if t == INT64:
        return _signed(v, 64)
    if t == UINT32:
        return v & _MASK32
    if t == BOOL:
        return v != 0
    if t == SINT32:
        v &= _MASK32
        return (v >> 1) ^ -(v & 1)
    if t == SINT64:
        return (v >> 1) ^ -(v & 1)
    return v  # UINT64


def _varint_of_scalar(t: int, v: Any) -> int:
    if t == BOOL:
        return 1 if v else 0
    if t == SINT32:
        return ((v << 1) ^ (v >> 31)) & _MASK32
    if t == SINT64:
        return ((v << 1) ^ (v >> 63)) & _MASK64
    return v & _MASK64  # int32/int64/enum negative: ten bytes, as protobuf writes them


def _wire_of(t: int) -> int:
    if t in _VARINT_TYPES:
        return _VARINT
    if t in _I32_TYPES:
        return _I32
    if t in _I64_TYPES:
        return _I64
    return _LEN


def _skip(buf: bytes, pos: int, end: int, wt: int, num: int, depth: int) -> int:
    """The position after one field of wire type ``wt`` (an unknown field's value)."""
    if wt == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wt == _I64:
        pos += 8
    elif wt == _I32:
        pos += 4
    elif wt == _LEN:
        n, pos = _read_varint(buf, pos, end)
        pos += n
    elif wt == _SGROUP:
        if depth >= MAX_DEPTH:
            raise DecodeError(f"groups nested deeper than {MAX_DEPTH}")
        while True:
            inner, wt, pos = _read_tag(buf, pos, end)
            if wt == _EGROUP:
                if inner != num:
                    raise DecodeError(f"group {num} ended by an end-group of field {inner}")
                return pos
            pos = _skip(buf, pos, end, wt, inner, depth + 1)
    elif wt == _EGROUP:
        raise DecodeError(f"end-group of field {num} without its start")
    else:
        raise DecodeError(f"field {num}: invalid wire type {wt}")
    if pos > end:
        raise DecodeError(f"field {num}: runs past the end of the message")
    return pos


# -- schema ---------------------------------------------------------------------------------------------


class Field:
    """One field of a message, resolved from its ``_fields_`` row."""

    __slots__ = ("default", "fixed", "key_type", "kind", "label", "message", "name", "number", "oneof", "siblings",
                 "tag", "type", "value_message", "value_type", "wire")

    def __init__(self, number: int, name: str, type_: int, label: int, ref: Any, oneof: str | None) -> None:
        self.number = number
        self.name = name
        self.type = type_
        self.label = label
        self.oneof = oneof
        self.message: type[Message] | None = None
        self.key_type = self.value_type = 0
        self.value_message: type[Message] | None = None
        if label == MAP:
            self.key_type, self.value_type, value_ref = ref
            if self.value_type == MESSAGE:
                self.value_message = message_class(value_ref)
            self.wire = _LEN
        else:
            if type_ == MESSAGE:
                self.message = message_class(ref)
            self.wire = _wire_of(type_)
        self.tag = varint((number << 3) | (_LEN if label != SINGULAR and self.wire != _LEN else self.wire))
        self.default = _DEFAULTS.get(type_)
        self.fixed = _STRUCTS.get(type_)
        self.siblings: tuple[str, ...] = ()  # the other members of its oneof
        if label == MAP:
            self.kind = _K_MAP
        elif type_ == MESSAGE:
            self.kind = _K_REPEATED_MESSAGE if label == REPEATED else _K_MESSAGE
        elif type_ in (STRING, BYTES):
            self.kind = _K_REPEATED_BYTES if label == REPEATED else _K_BYTES
        else:
            self.kind = _K_REPEATED_NUMBER if label == REPEATED else _K_NUMBER


# How the decoder stores a field's value.
_K_NUMBER, _K_BYTES, _K_MESSAGE, _K_REPEATED_NUMBER, _K_REPEATED_BYTES, _K_REPEATED_MESSAGE, _K_MAP = range(7)


_DEFAULTS: dict[int, Any] = {STRING: "", BYTES: b"", BOOL: False, FLOAT: 0.0, DOUBLE: 0.0}
_DEFAULTS.update((t, 0) for t in (INT64, UINT64, INT32, FIXED64, FIXED32, UINT32, ENUM, SFIXED32, SFIXED64,
                                  SINT32, SINT64))

_REGISTRY: dict[str, type[Message]] = {}


def message_class(full_name: str) -> type[Message]:
    """The loaded class of a message type, by its full name (``io.linkerd.proxy.net.TcpAddress``)."""
    try:
        return _REGISTRY[full_name]
    except KeyError:
        raise LookupError(f"message type {full_name} is not loaded (its _lite module was not imported)") from None


class _Info:
    """A message class's fields, built on first use (field types may be defined after the class)."""

    __slots__ = ("by_name", "by_number", "oneofs", "ordered")

    def __init__(self, cls: type[Message]) -> None:
        self.ordered = tuple(sorted((Field(*row) for row in cls._fields_), key=lambda f: f.number))
        self.by_number = {f.number: f for f in self.ordered}
        self.by_name = {f.name: f for f in self.ordered}
        members: dict[str, list[str]] = {}
        for f in self.ordered:
            if f.oneof is not None:
                members.setdefault(f.oneof, []).append(f.name)
        self.oneofs = {name: tuple(names) for name, names in members.items()}
        for f in self.ordered:
            if f.oneof is not None:
                f.siblings = tuple(n for n in self.oneofs[f.oneof] if n != f.name)


def _info(cls: type[Message]) -> _Info:
    info = cls.__dict__.get("_info_")
    if info is None:
        info = _Info(cls)
        type.__setattr__(cls, "_info_", info)
    return info


_get = object.__getattribute__
_set = object.__setattr__
_unset = object()


def _value(msg: Message, name: str) -> Any:
    try:
        return _get(msg, name)
    except AttributeError:
        return _unset


# -- messages -------------------------------------------------------------------------------------------


class Message:
    """A proto3 message (see the module's docstring for what it does and does not do)."""

    __slots__ = ()
    _full_name_: ClassVar[str] = ""
    # (number, name, type, label, ref, oneof): ref is the message's full name, or for a map
    # (key type, value type, value message's full name or None).
    _fields_: ClassVar[tuple[tuple[int, str, int, int, Any, str | None], ...]] = ()

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls._full_name_:
            _REGISTRY[cls._full_name_] = cls

    def __init__(self, **fields: Any) -> None:
        by_name = _info(type(self)).by_name
        for name, value in fields.items():
            f = by_name.get(name)
            if f is None:
                raise TypeError(f"{type(self).__name__} has no field {name!r}")
            if value is None:
                continue  # as protobuf: None leaves the field unset
            if f.label == REPEATED:
                value = list(value)
            elif f.label == MAP:
                value = dict(value)
            self._assign(f, value)

    def _assign(self, f: Field, value: Any) -> None:
        if f.oneof is not None:
            for other in _info(type(self)).oneofs[f.oneof]:
                if other != f.name and _value(self, other) is not _unset:
                    object.__delattr__(self, other)
        _set(self, f.name, value)

    if not TYPE_CHECKING:
        # Only for fields never set: a slot that holds a value is read without coming here.
        def __getattr__(self, name: str) -> Any:
            f = _info(type(self)).by_name.get(name)
            if f is None:
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            if f.label == SINGULAR:
                return f.message() if f.type == MESSAGE else f.default
            value: Any = [] if f.label == REPEATED else {}
            _set(self, name, value)  # kept: appending to it must stick
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            f = _info(type(self)).by_name.get(name)
            if f is None:
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            self._assign(f, value)

    def HasField(self, name: str) -> bool:
        """Whether a message field or oneof member is set (proto3 scalars have no presence)."""
        f = _info(type(self)).by_name.get(name)
        if f is None:
            oneof = _info(type(self)).oneofs.get(name)
            if oneof is None:
                raise ValueError(f"{type(self).__name__} has no field {name!r}")
            return self.WhichOneof(name) is not None
        if f.label != SINGULAR or (f.type != MESSAGE and f.oneof is None):
            raise ValueError(f"{type(self).__name__}.{name} has no presence")
        return _value(self, name) is not _unset

    def WhichOneof(self, oneof: str) -> str | None:
        """The name of the member of ``oneof`` that is set, or None."""
        members = _info(type(self)).oneofs.get(oneof)
        if members is None:
            raise ValueError(f"{type(self).__name__} has no oneof {oneof!r}")
        for name in members:
            if _value(self, name) is not _unset:
                return name
        return None

    def ListFields(self) -> list[tuple[str, Any]]:
        """The fields that would be encoded, by number, as (name, value)."""
        out = []
        for f in _info(type(self)).ordered:
            v = _value(self, f.name)
            if v is _unset:
                continue
            if (v if f.label != SINGULAR else f.type == MESSAGE or f.oneof is not None or not _is_default(v)):
                out.append((f.name, v))
        return out

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in _info(type(self)).ordered:
            mine, theirs = _value(self, f.name), _value(other, f.name)
            if f.label == SINGULAR and (f.type == MESSAGE or f.oneof is not None):
                if (mine is _unset) != (theirs is _unset):  # presence differs
                    return False
            elif f.label != SINGULAR:
                mine = () if mine is _unset else mine  # unset reads as empty
                theirs = () if theirs is _unset else theirs
                if f.label == MAP:
                    mine, theirs = dict(mine), dict(theirs)
                else:
                    mine, theirs = list(mine), list(theirs)
            else:
                mine = f.default if mine is _unset else mine
                theirs = f.default if theirs is _unset else theirs
            if mine != theirs:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable, as protobuf's

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in self.ListFields())
        return f"{type(self).__name__}({inner})"

    # -- wire ------------------------------------------------------------------------------------------
    @classmethod
    def FromString(cls: type[M], data: bytes | bytearray | memoryview) -> M:
        """Decode one message; :class:`DecodeError` when the bytes are not one."""
        buf = bytes(data)
        msg = cls.__new__(cls)
        _parse(msg, buf, 0, len(buf), 0)
        return msg

    def SerializeToString(self) -> bytes:
        out = bytearray()
        _emit(self, out)
        return bytes(out)


def _is_default(v: Any) -> bool:
    if isinstance(v, float):
        return v == 0.0 and math.copysign(1.0, v) > 0  # -0.0 is encoded, as protobuf does
    return not v


def _parse(msg: Message, buf: bytes, pos: int, end: int, depth: int, merge: bool = False) -> None:
    """Decode buf[pos:end] into ``msg``; ``merge``: into the values it holds, as protobuf merges a
    message field seen twice."""
    if depth > MAX_DEPTH:
        raise DecodeError(f"messages nested deeper than {MAX_DEPTH}")
    info = _info(type(msg))
    by_number = info.by_number
    # Values collect in a dict and go into the slots at the end: no attribute lookups that fail.
    vals: dict[str, Any] = {}
    if merge:
        for held in info.ordered:
            v: Any = _value(msg, held.name)
            if v is not _unset:
                vals[held.name] = v
                object.__delattr__(msg, held.name)
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_tag_varint(buf, pos, end)
        num = tag >> 3
        wt = tag & 7
        if num == 0:
            raise DecodeError("invalid field number 0")
        f = by_number.get(num)
        if f is None:
            pos = _skip(buf, pos, end, wt, num, depth)
            continue
        kind = f.kind
        if wt == _LEN:
            if pos >= end:
                raise DecodeError("truncated varint")
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                n, pos = _read_varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise DecodeError(f"field {f.name}: length {n} runs past the end of the message")
            if kind in (_K_BYTES, _K_REPEATED_BYTES):
                v = buf[pos:stop]
                if f.type == STRING:
                    try:
                        v = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise DecodeError(f"field {f.name}: invalid UTF-8") from None
                if kind == _K_BYTES:
                    for other in f.siblings:
                        vals.pop(other, None)
                    vals[f.name] = v
                else:
                    _list(vals, f.name).append(v)
            elif kind == _K_MESSAGE:
                sub = vals.get(f.name)
                if sub is None:
                    for other in f.siblings:
                        vals.pop(other, None)
                    assert f.message is not None
                    sub = vals[f.name] = f.message.__new__(f.message)
                    _parse(sub, buf, pos, stop, depth + 1)
                else:
                    _parse(sub, buf, pos, stop, depth + 1, merge=True)
            elif kind == _K_REPEATED_MESSAGE:
                assert f.message is not None
                sub = f.message.__new__(f.message)
                _parse(sub, buf, pos, stop, depth + 1)
                _list(vals, f.name).append(sub)
            elif kind == _K_MAP:
                entry = _parse_entry(f, buf, pos, stop, depth + 1)
                if entry is not None:
                    m = vals.get(f.name)
                    if m is None:
                        m = vals[f.name] = {}
                    m[entry[0]] = entry[1]
            elif kind == _K_REPEATED_NUMBER:  # packed
                values = _list(vals, f.name)
                while pos < stop:
                    v, pos = _read_scalar(f, f.type, buf, pos, stop)
                    values.append(v)
            else:
                raise DecodeError(f"field {f.name} ({num}): wire type {wt}, expected {f.wire}")
            pos = stop
        elif wt == f.wire and kind in (_K_NUMBER, _K_REPEATED_NUMBER):
            if wt == _VARINT and pos < end and buf[pos] < 0x80 and f.type not in (SINT32, SINT64):
                v = buf[pos]  # one byte: the same number for every varint type but zigzag (and bool)
                if f.type == BOOL:
                    v = v != 0
                pos += 1
            else:
                v, pos = _read_scalar(f, f.type, buf, pos, end)
            if kind == _K_NUMBER:
                for other in f.siblings:
                    vals.pop(other, None)
                vals[f.name] = v
            else:
                _list(vals, f.name).append(v)
        else:
            raise DecodeError(f"field {f.name} ({num}): wire type {wt}, expected {f.wire}")
    for name, v in vals.items():
        _set(msg, name, v)


def _list(vals: dict[str, Any], name: str) -> list[Any]:
    values = vals.get(name)
    if values is None:
        values = vals[name] = []
    return values


def _read_scalar(f: Field, t: int, buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    s = f.fixed if t == f.type else _STRUCTS.get(t)
    if s is not None:
        stop = pos + s.size
        if stop > end:
            raise DecodeError(f"field {f.name}: truncated fixed-width value")
        return s.unpack_from(buf, pos)[0], stop
    if t in _VARINT_TYPES:
        if pos < end and buf[pos] < 0x80:
            v = buf[pos]
            pos += 1
        else:
            v, pos = _read_varint(buf, pos, end)
        return (v if t == UINT64 else _scalar_from_varint(t, v)), pos
    if pos < end and buf[pos] < 0x80:
        n = buf[pos]
        pos += 1
    else:
        n, pos = _read_varint(buf, pos, end)
    stop = pos + n
    if stop > end:
        raise DecodeError(f"field {f.name}: length {n} runs past the end of the message")
    if t == STRING:
        try:
            return buf[pos:stop].decode("utf-8"), stop
        except UnicodeDecodeError:
            raise DecodeError(f"field {f.name}: invalid UTF-8") from None
    return buf[pos:stop], stop


def _parse_entry(f: Field, buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, Any] | None:
    """A map entry's key and value; None for an entry with fields other than those two, which
    protobuf's Python runtime (upb) does not insert either (the proxy read maps through it before)."""
    if f.key_type == STRING and f.value_type == STRING and end - pos >= 4 and buf[pos] == 0x0A:
        # The common entry, key and value both under 128 bytes: read it without the general loop.
        k_len = buf[pos + 1]
        v_at = pos + 2 + k_len
        if k_len < 0x80 and v_at + 2 <= end and buf[v_at] == 0x12 and buf[v_at + 1] < 0x80 \
                and v_at + 2 + buf[v_at + 1] == end:
            try:
                return buf[pos + 2:v_at].decode("utf-8"), buf[v_at + 2:end].decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"field {f.name}: invalid UTF-8") from None
    key: Any = _DEFAULTS[f.key_type]
    value: Any = _unset
    key_wire, value_wire = _wire_of(f.key_type), _wire_of(f.value_type)
    known = True
    while pos < end:
        num, wt, pos = _read_tag(buf, pos, end)
        if num == 1 and wt == key_wire:
            key, pos = _read_scalar(f, f.key_type, buf, pos, end)
        elif num == 2 and wt == value_wire:
            if f.value_type == MESSAGE:
                n, pos = _read_varint(buf, pos, end)
                stop = pos + n
                if stop > end:
                    raise DecodeError(f"field {f.name}: length {n} runs past the end of the entry")
                assert f.value_message is not None
                value = f.value_message.__new__(f.value_message)
                _parse(value, buf, pos, stop, depth + 1)
                pos = stop
            else:
                value, pos = _read_scalar(f, f.value_type, buf, pos, end)
        elif num in (1, 2):
            raise DecodeError(f"field {f.name}: map entry field {num} has wire type {wt}")
        else:
            pos = _skip(buf, pos, end, wt, num, depth)
            known = False
    if not known:
        return None
    if value is _unset:
        value = f.value_message() if f.value_message is not None else _DEFAULTS[f.value_type]
    return key, value


def _emit(msg: Message, out: bytearray) -> None:
    for f in _info(type(msg)).ordered:
        v = _value(msg, f.name)
        if v is _unset:
            continue
        if f.label == SINGULAR:
            if f.type == MESSAGE:
                _emit_message(f.tag, v, out)
            elif f.oneof is not None or not _is_default(v):
                out += f.tag
                _emit_scalar(f, f.type, v, out)
        elif f.label == REPEATED:
            if not v:
                continue
            if f.type == MESSAGE:
                for item in v:
                    _emit_message(f.tag, item, out)
            elif f.wire != _LEN:  # packed, proto3's default for numbers
                body = bytearray()
                for item in v:
                    _emit_scalar(f, f.type, item, body)
                out += f.tag
                out += varint(len(body))
                out += body
            else:
                for item in v:
                    out += f.tag
                    _emit_scalar(f, f.type, item, out)
        else:
            for key, value in v.items():
                entry = bytearray(_tag_of(1, f.key_type))
                _emit_scalar(f, f.key_type, key, entry)
                if f.value_type == MESSAGE:
                    _emit_message(_tag_of(2, MESSAGE), value, entry)
                else:
                    entry += _tag_of(2, f.value_type)
                    _emit_scalar(f, f.value_type, value, entry)
                out += f.tag
                out += varint(len(entry))
                out += entry


def _tag_of(number: int, t: int) -> bytes:
    return varint((number << 3) | _wire_of(t))


def _emit_message(tag: bytes, v: Message, out: bytearray) -> None:
    if not isinstance(v, Message):
        raise TypeError(f"expected a message, got {type(v).__name__}")
    body = bytearray()
    _emit(v, body)
    out += tag
    out += varint(len(body))
    out += body


def _emit_scalar(f: Field, t: int, v: Any, out: bytearray) -> None:
    if t == STRING:
        if not isinstance(v, str):
            raise TypeError(f"field {f.name}: expected str, got {type(v).__name__}")
        data = v.encode("utf-8")
        out += varint(len(data))
        out += data
        return
    if t == BYTES:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise TypeError(f"field {f.name}: expected bytes, got {type(v).__name__}")
        out += varint(len(v))
        out += v
        return
    if t in (FLOAT, DOUBLE):
        out += _STRUCTS[t].pack(v)
        return
    if t != BOOL:
        if not isinstance(v, int):
            raise TypeError(f"field {f.name}: expected int, got {type(v).__name__}")
        lo, hi = _RANGES[t]
        if not lo <= v <= hi:
            raise ValueError(f"field {f.name}: {v} is out of range")
    if t in _STRUCTS:
        out += _STRUCTS[t].pack(v)
    else:
        out += varint(_varint_of_scalar(t, v))


# -- enums ----------------------------------------------------------------------------------------------


class Enum:
    """A proto3 enum: its values are class attributes; ``Name``, ``Value`` and ``items`` as protobuf's
    enum wrappers (fields hold plain ints, so values the schema does not know survive a round trip)."""

    _by_number_: ClassVar[dict[int, str] | None] = None

    @classmethod
    def _values(cls) -> dict[str, int]:
        return {k: v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}

    @classmethod
    def Name(cls, number: int) -> str:
        names = cls.__dict__.get("_by_number_")
        if names is None:
            names = {}
            for k, v in cls._values().items():
                names.setdefault(v, k)
            type.__setattr__(cls, "_by_number_", names)
        try:
            return names[number]
        except KeyError:
            raise ValueError(f"enum {cls.__name__} has no name for the value {number}") from None

    @classmethod
    def Value(cls, name: str) -> int:
        try:
            return cls._values()[name]
        except KeyError:
            raise ValueError(f"enum {cls.__name__} has no value named {name!r}") from None

    @classmethod
    def items(cls) -> list[tuple[str, int]]:
        return list(cls._values().items())

    @classmethod
    def keys(cls) -> list[str]:
        return list(cls._values())

    @classmethod
    def values(cls) -> list[int]:
        return list(cls._values().values())


# -- well-known types the protos use --------------------------------------------------------------------


class Duration(Message):
    """google.protobuf.Duration."""

    __slots__ = ("nanos", "seconds")
    _full_name_ = "google.protobuf.Duration"
    _fields_ = ((1, "seconds", INT64, SINGULAR, None, None), (2, "nanos", INT32, SINGULAR, None, None))
    if TYPE_CHECKING:
        seconds: int
        nanos: int

    @classmethod
    def of_nanos(cls, nanos: int) -> Duration:
        """A duration of ``nanos`` nanoseconds (seconds and nanos of the same sign, as protobuf's)."""
        seconds, rest = divmod(abs(nanos), 1_000_000_000)
        sign = -1 if nanos < 0 else 1
        return cls(seconds=sign * seconds, nanos=sign * rest)

    def total_seconds(self) -> float:
        return self.seconds + self.nanos / 1e9


class Timestamp(Message):
    """google.protobuf.Timestamp."""

    __slots__ = ("nanos", "seconds")
    _full_name_ = "google.protobuf.Timestamp"
    _fields_ = ((1, "seconds", INT64, SINGULAR, None, None), (2, "nanos", INT32, SINGULAR, None, None))
    if TYPE_CHECKING:
        seconds: int
        nanos: int


class Empty(Message):
    """google.protobuf.Empty."""

    __slots__ = ()
    _full_name_ = "google.protobuf.Empty"
