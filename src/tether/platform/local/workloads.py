"""The local workload registry: which workloads run on this host, and their bootstrap tokens.

Layout under a state directory::

    <state-dir>/workloads/<ns>/<name>.yaml    the workload (name, namespace, serviceAccount, addresses,
                                              ports, labels, proxyAdmin, tokenSha256)
    <state-dir>/tokens/<ns>/<name>.token      its bootstrap token, mode 0600, for its proxy to read

The registry stores only the token's SHA-256, so the identity service (which reads the workloads
directory) never holds a usable token. A token names its workload (``tether-local.<ns>.<name>.<secret>``)
so validating one is a single file read and a constant-time compare.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOKEN_PREFIX = "tether-local"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class WorkloadError(ValueError):
    """A workload definition or lookup failed; the message names the workload and the file."""


class InvalidToken(Exception):
    """The token does not belong to any registered workload (the message never echoes the secret)."""


@dataclass(frozen=True, slots=True)
class WorkloadPort:
    port: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """A local workload ("pod"): its identity and where its proxy and app listen."""

    name: str
    namespace: str
    service_account: str
    addresses: tuple[str, ...] = ()
    ports: tuple[WorkloadPort, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    # host:port of the workload's proxy admin server, for `tether identity` and diagnostics.
    proxy_admin: str | None = None
    # The pod's annotations (`tether run --annotation`): what the control plane reads from a pod
    # (config.linkerd.io/opaque-ports, linkerd.io/proxy-version).
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace)):
            if not _NAME.match(value):
                raise WorkloadError(f"workload {what} {value!r} is not a DNS label (a-z, 0-9, '-', max 63)")
        if not _NAME.match(self.service_account):
            raise WorkloadError(f"workload {self.key}: serviceAccount {self.service_account!r} is not a DNS label")
        for p in self.ports:
            if not 0 < p.port < 65536:
                raise WorkloadError(f"workload {self.namespace}/{self.name}: port {p.port} is out of range")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "addresses": list(self.addresses),
            "ports": [{"port": p.port, **({"name": p.name} if p.name else {})} for p in self.ports],
            "labels": dict(self.labels),
            **({"proxyAdmin": self.proxy_admin} if self.proxy_admin else {}),
            **({"annotations": dict(self.annotations)} if self.annotations else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> Workload:
        try:
            ports = []
            for p in d.get("ports") or []:
                if isinstance(p, int):
                    ports.append(WorkloadPort(p))
                else:
                    ports.append(WorkloadPort(int(p["port"]), p.get("name")))
            return cls(
                name=str(d["name"]),
                namespace=str(d.get("namespace", "default")),
                service_account=str(d.get("serviceAccount", "default")),
                addresses=tuple(str(a) for a in d.get("addresses") or ()),
                ports=tuple(ports),
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
                proxy_admin=d.get("proxyAdmin"),
                annotations={str(k): str(v) for k, v in (d.get("annotations") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, WorkloadError):
                raise
            raise WorkloadError(f"{source}: not a workload definition ({e!r})") from None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, created with ``mode`` from the start (never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # umask may have narrowed it; never widened
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WorkloadRegistry:
    """The registry over ``<state-dir>``; safe to use from several processes (atomic file writes)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.workloads_dir = self.root / "workloads"
        self.tokens_dir = self.root / "tokens"

    def workload_path(self, namespace: str, name: str) -> Path:
        return self.workloads_dir / namespace / f"{name}.yaml"

    def token_path(self, namespace: str, name: str) -> Path:
        return self.tokens_dir / namespace / f"{name}.token"

    def register(self, workload: Workload) -> str:
        """Register (or re-register) a workload with a fresh token; returns the token path's token."""
        token = f"{TOKEN_PREFIX}.{workload.namespace}.{workload.name}." + base64.urlsafe_b64encode(
            secrets.token_bytes(32)
        ).decode().rstrip("=")
        for d in (self.tokens_dir, self.tokens_dir / workload.namespace):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Token first: a workload file never points at a token hash whose token is not on disk.
        _write_atomic(self.token_path(workload.namespace, workload.name), token.encode(), 0o600)
        doc = {**workload.to_dict(), "tokenSha256": _hash(token)}
        _write_atomic(
            self.workload_path(workload.namespace, workload.name),
            yaml.safe_dump(doc, sort_keys=False).encode(),
            0o644,
        )
        return token

    def update(self, workload: Workload) -> None:
        """Change a registered workload's definition (addresses, ports, labels, proxyAdmin); its token stays."""
        path = self.workload_path(workload.namespace, workload.name)
        _, stored = self._load(path) if path.exists() else (None, None)
        if stored is None:
            raise WorkloadError(f"no workload {workload.key} to update (looked for {path}); register it first")
        doc = {**workload.to_dict(), "tokenSha256": stored}
        _write_atomic(path, yaml.safe_dump(doc, sort_keys=False).encode(), 0o644)

    def exists(self, namespace: str, name: str) -> bool:
        return self.workload_path(namespace, name).exists()

    def remove(self, namespace: str, name: str) -> None:
        self.workload_path(namespace, name).unlink(missing_ok=True)
        self.token_path(namespace, name).unlink(missing_ok=True)

    def _load(self, path: Path) -> tuple[Workload, str | None]:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise WorkloadError(f"{path}: cannot read workload: {e}") from None
        if not isinstance(doc, dict):
            raise WorkloadError(f"{path}: not a YAML mapping")
        return Workload.from_dict(doc, str(path)), doc.get("tokenSha256")

    def get(self, namespace: str, name: str) -> Workload:
        path = self.workload_path(namespace, name)
        if not path.exists():
            raise WorkloadError(f"no workload {namespace}/{name} (looked for {path})")
        return self._load(path)[0]

    def __iter__(self) -> Iterator[Workload]:
        if not self.workloads_dir.is_dir():
            return
        for path in sorted(self.workloads_dir.glob("*/*.yaml")):
            yield self._load(path)[0]

    def list(self, namespace: str | None = None) -> Sequence[Workload]:
        return [w for w in self if namespace is None or w.namespace == namespace]

    def read_token(self, namespace: str, name: str) -> str:
        return self.token_path(namespace, name).read_text().strip()

    def validate_token(self, token: str | bytes) -> Workload:
        """The workload this token was issued to, or InvalidToken."""
        text = token.decode(errors="replace") if isinstance(token, bytes) else token
        text = text.strip()
        parts = text.split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            raise InvalidToken("token is not a tether local bootstrap token")
        _, namespace, name, _secret = parts
        if not (_NAME.match(namespace) and _NAME.match(name)):
            raise InvalidToken("token names no valid workload")
        path = self.workload_path(namespace, name)
        if not path.exists():
            raise InvalidToken(f"token names workload {namespace}/{name}, which is not registered")
        workload, stored = self._load(path)
        if not stored or not hmac.compare_digest(stored, _hash(text)):
            raise InvalidToken(
                f"token does not match workload {namespace}/{name}'s current token (re-registered or forged)"
            )
        return workload
