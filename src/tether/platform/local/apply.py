"""`apply -f`, `delete -f` and `get` over the local store's directory (like kubectl, no server needed).

Everything given is validated first; if any document is invalid nothing is written and every error is
reported. An object already defined in some file of the store (any name, multi-document) is replaced
in place in that file, the file's other documents and comments left as they are; a new object gets its
own file ``<kind>-<namespace>-<name>.yaml``. Writes are atomic (a temporary ".name" file renamed into
place), so the watching control plane never reads half a file.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import yaml

from tether.core.resources import Loaded, Resource, kind_named, load_text
from tether.platform.local.store import LocalStore, resource_files

_SEPARATOR = re.compile(r"^---(\s.*)?$")


class ApplyError(Exception):
    """The inputs could not be read or validated; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True, slots=True)
class Outcome:
    ref: str  # kubectl style: "serviceprofile/web.prod.svc.cluster.local"
    namespace: str
    action: str  # created | configured | unchanged | deleted | not found
    path: str

    def line(self, dry_run: bool) -> str:
        ns = f" -n {self.namespace}" if self.namespace else ""
        return f"{self.ref}{ns} {self.action}{' (dry run)' if dry_run else ''}"


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def read_inputs(inputs: Sequence[str], stdin: TextIO | None = None) -> list[tuple[str, str]]:
    """(source name, text) for each -f argument: a file, a directory (its YAML files), or "-"."""
    out: list[tuple[str, str]] = []
    errors: list[str] = []
    for arg in inputs:
        if arg == "-":
            out.append(("<stdin>", (stdin or sys.stdin).read()))
            continue
        p = Path(arg)
        if not p.exists():
            errors.append(f"-f {arg}: no such file or directory")
            continue
        for f in resource_files(p):
            try:
                out.append((str(f), f.read_text()))
            except (OSError, UnicodeDecodeError) as e:
                errors.append(f"-f {arg}: {f}: cannot read: {e}")
    if errors:
        raise ApplyError(errors)
    return out


def validate(inputs: Sequence[tuple[str, str]]) -> list[Loaded]:
    """Every object of every input, or ApplyError with every problem."""
    loaded: list[Loaded] = []
    errors: list[str] = []
    for source, text in inputs:
        result = load_text(text, source)
        loaded += result.loaded
        errors += [str(e) for e in result.errors]
    if errors:
        raise ApplyError(errors)
    return loaded


def _ident(r: Resource) -> tuple[str, str, str]:
    return (r.KIND, r.namespace, r.name)


def _chunks(text: str) -> list[str]:
    """The text split into documents, each chunk keeping its leading "---" line."""
    chunks: list[str] = [""]
    for line in text.splitlines(keepends=True):
        if _SEPARATOR.match(line.rstrip("\n")):
            chunks.append(line)
        else:
            chunks[-1] += line
    return chunks


def _chunk_ident(chunk: str) -> tuple[str, str, str] | None:
    try:
        doc = yaml.safe_load(chunk)
    except yaml.YAMLError:
        return None
    if not isinstance(doc, dict):
        return None
    result = load_text(chunk, "")
    if len(result.loaded) != 1:
        return None
    return _ident(result.loaded[0].resource)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _document_text(r: Resource) -> str:
    return yaml.safe_dump(r.dump(), sort_keys=False)


def _where(store_dir: Path) -> dict[tuple[str, str, str], Path]:
    """Which file defines each object now (the first file, as the store resolves duplicates)."""
    out: dict[tuple[str, str, str], Path] = {}
    for path in resource_files(store_dir) if store_dir.exists() else []:
        try:
            result = load_text(path.read_text(), str(path))
        except (OSError, UnicodeDecodeError):
            continue
        for item in result.loaded:
            out.setdefault(_ident(item.resource), path)
    return out


def _replace_in_file(path: Path, ident: tuple[str, str, str], new_text: str | None) -> None:
    chunks = _chunks(path.read_text())
    for i, chunk in enumerate(chunks):
        if _chunk_ident(chunk) == ident:
            head = chunk.splitlines(keepends=True)[0] if _SEPARATOR.match(chunk.split("\n", 1)[0]) else ""
            if new_text is None:
                del chunks[i]
            else:
                chunks[i] = head + new_text
            break
    remaining = "".join(chunks)
    if new_text is None and not remaining.strip("-\n\t "):
        path.unlink()
    else:
        _write_atomic(path, remaining)


def _kubectl_ref(r: Resource) -> str:
    return f"{r.KIND.lower()}/{r.name}"


def apply(store_dir: str | os.PathLike[str], inputs: Sequence[tuple[str, str]], *, dry_run: bool = False) -> Report:
    """Validate ``inputs`` and write them into the store directory (unless ``dry_run``)."""
    loaded = validate(inputs)
    root = Path(store_dir)
    report = Report(notices=[n for item in loaded for n in item.notices])
    where = _where(root)
    current = LocalStore(root) if root.exists() else None
    for item in loaded:
        r = item.resource
        if r.KIND == "Workload":
            raise ApplyError(
                [
                    f"{item.source}: document {item.document} ({r.ref()}): Workload objects come from the "
                    "workload registry (tether workload register), not from files"
                ]
            )
    for item in loaded:
        r = item.resource
        ident = _ident(r)
        existing = current.get(r.KIND, r.namespace, r.name) if current is not None else None
        path = where.get(ident)
        if existing is not None and existing == r:
            action = "unchanged"
        elif path is not None:
            action = "configured"
        else:
            action = "created"
            path = root / f"{r.KIND.lower()}-{r.namespace or 'cluster'}-{r.name}.yaml"
        if not dry_run and action != "unchanged":
            assert path is not None
            if path.exists() and ident in where:
                _replace_in_file(path, ident, _document_text(r))
            else:
                _write_atomic(path, _document_text(r))
        report.outcomes.append(Outcome(_kubectl_ref(r), r.namespace if r.NAMESPACED else "", action, str(path)))
    return report


def delete(store_dir: str | os.PathLike[str], inputs: Sequence[tuple[str, str]], *, dry_run: bool = False) -> Report:
    """Remove the objects named in ``inputs`` from the store directory."""
    loaded = validate(inputs)
    root = Path(store_dir)
    where = _where(root)
    report = Report()
    for item in loaded:
        r = item.resource
        ident = _ident(r)
        path = where.get(ident)
        ns = r.namespace if r.NAMESPACED else ""
        if path is None:
            report.outcomes.append(Outcome(_kubectl_ref(r), ns, "not found", ""))
            continue
        if not dry_run:
            _replace_in_file(path, ident, None)
        report.outcomes.append(Outcome(_kubectl_ref(r), ns, "deleted", str(path)))
    return report


def get(
    store_dir: str | os.PathLike[str], kind: str, namespace: str | None = None, state_dir: str | None = None
) -> list[Resource]:
    """The objects of ``kind`` (any spelling kubectl accepts, e.g. "sp") in the store, by namespace/name."""
    model = kind_named(kind)
    store = LocalStore(store_dir, state_dir)
    return list(store.list(model.KIND, namespace))
