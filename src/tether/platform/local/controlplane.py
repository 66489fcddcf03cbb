"""Records of the local control-plane processes, so the CLI can find them (check, version).

Each running service writes ``<state-dir>/control-plane/<component>-<pid>.json`` once it serves,
and removes it when it stops. A record whose process died without cleaning up stays behind; the
readers probe the admin address and report it as not running rather than trusting the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ControlPlaneRecordError(ValueError):
    """A record could not be read; the message names the file."""


@dataclass(frozen=True)
class ControlPlaneRecord:
    component: str  # "identity"
    pid: int
    version: str
    addr: str  # host:port of the gRPC service
    admin_addr: str  # host:port of /metrics, /ready, /live
    controller_namespace: str
    trust_domain: str
    issuer_certificate: str = ""  # paths, so `tether check` can read the same files
    trust_anchors: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> ControlPlaneRecord:
        try:
            return cls(**{k: d[_camel(k)] for k in cls.__dataclass_fields__ if _camel(k) in d})
        except TypeError as e:
            raise ControlPlaneRecordError(f"{source}: not a control-plane record ({e})") from None


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def records_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "control-plane"


def write_record(state_dir: str | os.PathLike[str], record: ControlPlaneRecord) -> Path:
    d = records_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{record.component}-{record.pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_records(state_dir: str | os.PathLike[str], component: str | None = None) -> list[ControlPlaneRecord]:
    """Every record (of ``component``), oldest file name first; unreadable files raise."""
    d = records_dir(state_dir)
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ControlPlaneRecordError(f"{path}: cannot read: {e}") from None
        if not isinstance(doc, dict):
            raise ControlPlaneRecordError(f"{path}: not a JSON object")
        rec = ControlPlaneRecord.from_dict(doc, str(path))
        if component is None or rec.component == component:
            out.append(rec)
    return out
