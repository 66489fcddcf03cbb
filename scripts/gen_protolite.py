"""Write tether.api.gen.<name>_lite modules: the messages of src/tether/api/*.proto for tether's own
protobuf runtime (tether.api.protolite), so that the proxy needs no google.protobuf.

Run by scripts/gen-protos.sh after protoc, with the Python that has the just-generated *_pb2 modules
(their descriptors are the source: the same schema protoc compiled). Usage:
    python scripts/gen_protolite.py GEN_DIR
"""

from __future__ import annotations

import importlib
import keyword
import sys
import types
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor

# The well-known types the protos import, provided by protolite itself.
WELL_KNOWN = {"google.protobuf.Duration": "_p.Duration", "google.protobuf.Timestamp": "_p.Timestamp",
              "google.protobuf.Empty": "_p.Empty"}
PY_TYPES = {FieldDescriptor.TYPE_DOUBLE: "float", FieldDescriptor.TYPE_FLOAT: "float",
            FieldDescriptor.TYPE_BOOL: "bool", FieldDescriptor.TYPE_STRING: "str",
            FieldDescriptor.TYPE_BYTES: "bytes"}
RESERVED = {"HasField", "WhichOneof", "ListFields", "FromString", "SerializeToString", "_fields_",
            "_full_name_", "_info_", "_assign"}


class Gen:
    def __init__(self, fd: FileDescriptor) -> None:
        self.fd = fd
        self.lines: list[str] = []
        self.imports: dict[str, str] = {}  # file name -> module alias

    def module_of(self, file_name: str) -> str:
        stem = Path(file_name).stem
        return f"_{stem}_lite"

    def py_name(self, d: Descriptor | EnumDescriptor) -> str:
        """How this module's annotations name a message or enum type."""
        if d.full_name in WELL_KNOWN:
            return WELL_KNOWN[d.full_name]
        pkg = d.file.package
        local = d.full_name[len(pkg) + 1:] if pkg else d.full_name
        if d.file.name == self.fd.name:
            return local
        alias = self.module_of(d.file.name)
        self.imports[d.file.name] = alias
        return f"{alias}.{local}"

    def annotation(self, f: FieldDescriptor) -> str:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            mt = f.message_type
            if mt.GetOptions().map_entry:
                k, v = mt.fields_by_number[1], mt.fields_by_number[2]
                return f"dict[{self.scalar(k)}, {self.scalar(v)}]"
            inner = self.py_name(mt)
        else:
            inner = self.scalar(f)
        return f"list[{inner}]" if f.is_repeated else inner

    def scalar(self, f: FieldDescriptor) -> str:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            return self.py_name(f.message_type)
        return PY_TYPES.get(f.type, "int")  # integers and enums (enum fields hold ints)

    def row(self, f: FieldDescriptor) -> str:
        if f.type == FieldDescriptor.TYPE_GROUP:
            raise SystemExit(f"gen_protolite: {f.full_name}: groups are not supported")
        oneof = repr(f.containing_oneof.name) if f.containing_oneof is not None else "None"
        ref: Any = None
        label = 1 if f.is_repeated else 0
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            mt = f.message_type
            if mt.GetOptions().map_entry:
                k, v = mt.fields_by_number[1], mt.fields_by_number[2]
                ref = (k.type, v.type, v.message_type.full_name if v.message_type is not None else None)
                label = 2
            else:
                if mt.full_name.startswith("google.protobuf.") and mt.full_name not in WELL_KNOWN:
                    raise SystemExit(f"gen_protolite: {f.full_name}: {mt.full_name} is not provided by protolite")
                ref = mt.full_name
        return f"({f.number}, {f.name!r}, {f.type}, {label}, {ref!r}, {oneof}),"

    def enum(self, e: EnumDescriptor, indent: str) -> None:
        self.lines.append(f"{indent}class {e.name}(_p.Enum):")
        for v in e.values:
            self.lines.append(f"{indent}    {v.name} = {v.number}")
        self.lines.append("")

    def message(self, m: Descriptor, indent: str) -> None:
        if m.GetOptions().map_entry:
            return
        names = [f.name for f in m.fields]
        clash = set(names) & (RESERVED | {t.name for t in m.nested_types} | {e.name for e in m.enum_types})
        if clash:
            raise SystemExit(f"gen_protolite: {m.full_name}: field names {sorted(clash)} clash with the class")
        self.lines.append(f"{indent}class {m.name}(_p.Message):")
        inner = indent + "    "
        self.lines.append(f"{inner}__slots__ = {tuple(sorted(names))!r}")
        self.lines.append(f"{inner}_full_name_ = {m.full_name!r}")
        self.lines.append(f"{inner}_fields_ = (")
        for f in m.fields:
            self.lines.append(f"{inner}    {self.row(f)}")
        self.lines.append(f"{inner})")
        for e in m.enum_types:
            for v in e.values:  # protobuf exposes a nested enum's values on the message too
                self.lines.append(f"{inner}{v.name} = {v.number}")
        typed = [f for f in m.fields if not keyword.iskeyword(f.name)]
        if typed:
            self.lines.append(f"{inner}if TYPE_CHECKING:")
            for f in typed:
                self.lines.append(f"{inner}    {f.name}: {self.annotation(f)}")
        self.lines.append("")
        for e in m.enum_types:
            self.enum(e, inner)
        for t in m.nested_types:
            self.message(t, inner)

    def render(self) -> str:
        for e in self.fd.enum_types_by_name.values():
            self.enum(e, "")
            for v in e.values:
                self.lines.append(f"{v.name} = {v.number}")
            self.lines.append("")
        for m in self.fd.message_types_by_name.values():
            self.message(m, "")
            self.lines.append("")
        for dep in self.fd.dependencies:
            if not dep.name.startswith("google/protobuf/"):
                self.imports[dep.name] = self.module_of(dep.name)
        head = [f'"""Generated by scripts/gen_protolite.py from {Path(self.fd.name).name}; do not edit."""',
                "from __future__ import annotations", "", "from typing import TYPE_CHECKING", "",
                "from tether.api import protolite as _p"]
        for _file, alias in sorted(self.imports.items()):
            head.append(f"from tether.api.gen import {alias[1:]} as {alias}  # registers its messages")
        return "\n".join([*head, "", "", *self.lines]).rstrip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gen_protolite.py GEN_DIR", file=sys.stderr)
        return 2
    gen = Path(argv[1])
    # The *_pb2 modules of GEN_DIR (a scratch tree when gen-protos.sh runs), whatever is installed.
    package = types.ModuleType("tether.api.gen")
    package.__path__ = [str(gen)]
    sys.modules["tether.api.gen"] = package
    written = []
    for path in sorted(gen.glob("*_pb2.py")):
        mod = importlib.import_module(f"tether.api.gen.{path.stem}")
        text = Gen(mod.DESCRIPTOR).render()
        out = gen / f"{path.stem[:-len('_pb2')]}_lite.py"
        out.write_text(text)
        written.append(out.name)
    print("generated:", " ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
