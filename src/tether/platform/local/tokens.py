"""TokenValidator over the local workload registry's bootstrap tokens and the control plane's own tokens.

A local control-plane service that serves mutual TLS (the destination service) gets its certificate
from the identity service as a workload does, with a token of its own:

    <state-dir>/control-plane/tokens/<sa>.token    the token (tether-control.<sa>.<secret>), mode 0600
    <state-dir>/control-plane/tokens/<sa>.sha256   its SHA-256, what the identity service compares

It names a service account in the controller namespace. The supervisor makes them when the mesh
starts; the identity service never holds a usable one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from tether.control.identity.service import TokenSubject, Unauthenticated
from tether.platform.local.workloads import InvalidToken, WorkloadError, WorkloadRegistry

MAX_TOKEN_BYTES = 4096
CONTROL_TOKEN_PREFIX = "tether-control"
_SERVICE_ACCOUNT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label


def control_tokens_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / "control-plane" / "tokens"


def ensure_control_token(state_dir: str | os.PathLike[str], service_account: str) -> Path:
    """The token file of control-plane ``service_account``, made (with its hash) if missing."""
    d = control_tokens_dir(state_dir)
    path = d / f"{service_account}.token"
    digest = d / f"{service_account}.sha256"
    if path.exists() and digest.exists():
        return path
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    token = f"{CONTROL_TOKEN_PREFIX}.{service_account}.{secrets.token_urlsafe(32)}"
    for p, data in ((digest, hashlib.sha256(token.encode()).hexdigest()), (path, token)):
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data + "\n")
        os.replace(tmp, p)
    return path


class LocalTokenValidator:
    def __init__(self, registry: WorkloadRegistry, controller_namespace: str | None = None) -> None:
        self.registry = registry
        # Control-plane tokens are accepted only when the controller namespace is given.
        self.controller_namespace = controller_namespace

    async def validate(self, token: bytes) -> TokenSubject:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"token is longer than {MAX_TOKEN_BYTES} bytes")
        text = token.decode(errors="replace").strip()
        if text.startswith(CONTROL_TOKEN_PREFIX + ".") and self.controller_namespace is not None:
            return self._control(text, self.controller_namespace)
        try:
            # One small file read: cheap enough to do on the event loop.
            w = self.registry.validate_token(token)
        except InvalidToken as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        except WorkloadError as e:
            raise Unauthenticated(f"token's workload cannot be read: {e}") from None
        return TokenSubject(w.namespace, w.service_account, f"local workload {w.key}")

    def _control(self, text: str, namespace: str) -> TokenSubject:
        parts = text.split(".")
        if len(parts) != 3 or not _SERVICE_ACCOUNT.match(parts[1]):
            raise Unauthenticated("invalid token: not a tether local control-plane token")
        sa = parts[1]
        try:
            stored = (control_tokens_dir(self.registry.root) / f"{sa}.sha256").read_text().strip()
        except OSError:
            raise Unauthenticated(f"invalid token: no control-plane token is issued to {sa}") from None
        if not hmac.compare_digest(stored, hashlib.sha256(text.encode()).hexdigest()):
            raise Unauthenticated(f"invalid token: does not match control-plane service account {sa}'s token")
        return TokenSubject(namespace, sa, f"local control-plane service account {namespace}/{sa}")
