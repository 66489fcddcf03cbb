"""The proxy's private key and CSR, made by a short-lived child process.

Generating an ECDSA P-256 key and signing a CSR needs the cryptography package, which costs a proxy
~8 MiB of RSS for the rest of its life (docs/notes/issue-16.md); the proxy needs it once, at start.
So a child interpreter (``python -m tether.proxy.keygen``) makes both and hands them back over a
pipe; its memory goes away with it. The key never touches a filesystem: the child writes it to its
stdout as PEM, plus an encrypted copy (password from the parent, over stdin) for platforms where
``ssl`` can only load a key from a file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["KeyMaterial", "KeygenError", "generate"]

_TIMEOUT = 60.0


class KeygenError(RuntimeError):
    """The child could not make the key and CSR; the message carries its error."""


@dataclass(frozen=True, slots=True, repr=False)
class KeyMaterial:
    """A fresh P-256 key (PKCS#8 PEM, plain and encrypted), its SubjectPublicKeyInfo, and a DER CSR."""

    key_pem: bytes
    key_pem_encrypted: bytes  # under ``password``
    password: bytes
    spki_der: bytes
    csr_der: bytes


def generate(identity: str, password: bytes, timeout: float = _TIMEOUT) -> KeyMaterial:
    """Make a key and a CSR for ``identity`` (a DNS-like identity name) in a child interpreter."""
    argv = [sys.executable, "-m", "tether.proxy.keygen", identity]
    # The child must import the same tether as this process, wherever that came from.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = None
    # sys.executable first; then the running binary by /proc/self/exe (argv[0] stays sys.executable,
    # so the child finds the same environment): a proxy that dropped its privileges may not be
    # allowed to look the interpreter's path up again (a venv whose interpreter links into a private
    # home directory, as in the local mesh), while the open binary is always reachable. Not the other
    # way round: under valgrind /proc/self/exe is valgrind.
    for exe in (sys.executable, "/proc/self/exe"):
        try:
            out = subprocess.run(argv, executable=exe, env=env, input=password, capture_output=True,
                                 timeout=timeout, check=False)
            break
        except (PermissionError, FileNotFoundError) as e:
            error: OSError | subprocess.TimeoutExpired = e
        except (OSError, subprocess.TimeoutExpired) as e:
            error = e
            break
    if out is None:
        raise KeygenError(f"cannot run the key generator ({sys.executable} -m tether.proxy.keygen): {error}")
    if out.returncode != 0:
        last = (out.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise KeygenError(f"the key generator failed (exit {out.returncode}): {last}")
    try:
        doc = json.loads(out.stdout)
        return KeyMaterial(
            key_pem=doc["key_pem"].encode(),
            key_pem_encrypted=doc["key_pem_encrypted"].encode(),
            password=password,
            spki_der=base64.b64decode(doc["spki_der"]),
            csr_der=base64.b64decode(doc["csr_der"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise KeygenError(f"the key generator's answer is unreadable: {e}") from None


def _child(identity: str, password: bytes) -> str:
    # Imported here, in the child only: this is the memory the parent must not carry.
    from cryptography.hazmat.primitives import serialization

    from tether.core.identity.csr import build_csr, generate_key
    from tether.core.identity.names import parse_identity_name

    key = generate_key()
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    doc = {
        "key_pem": key.private_bytes(pem, pkcs8, serialization.NoEncryption()).decode(),
        "key_pem_encrypted": key.private_bytes(pem, pkcs8, serialization.BestAvailableEncryption(password)).decode(),
        "spki_der": base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode(),
        "csr_der": base64.b64encode(build_csr(key, parse_identity_name(identity))).decode(),
    }
    return json.dumps(doc)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tether.proxy.keygen IDENTITY-NAME  (password on stdin)")
    secret = sys.stdin.buffer.read()
    if not secret:
        sys.exit("tether.proxy.keygen: no password on stdin")
    try:
        sys.stdout.write(_child(sys.argv[1], secret))
    except ValueError as e:
        sys.exit(f"tether.proxy.keygen: {e}")
