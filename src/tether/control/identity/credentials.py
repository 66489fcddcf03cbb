"""The issuer and trust anchors, loaded from PEM files and reloaded without restart when they change.

Two layouts:

* explicit files: ``--issuer-certificate-file``, ``--issuer-key-file``, ``--trust-anchors-file``
  (as ``step certificate create`` writes them), or
* a directory like a mounted Kubernetes Secret: ``tls.crt``/``tls.key``/``ca.crt``
  (``kubernetes.io/tls``, as cert-manager writes it) or ``crt.pem``/``key.pem`` (``linkerd.io/tls``).

Mounted Secrets are updated by swapping a ``..data`` symlink, so a change is noticed by stat-ing each
file through its symlinks (inode, size, mtime), not the directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tether.control.identity.service import Unavailable
from tether.core.identity.certs import (
    CertificateError,
    IssuerCredentials,
    TrustBundle,
    chain_to_anchor,
    describe,
    fmt_time,
    load_issuer,
    validate_issuer,
)
from tether.core.identity.issuance import IssuancePolicy, IssuedLeaf, issue_leaf
from tether.core.identity.names import WorkloadIdentity

log = logging.getLogger("tether.identity")


@dataclass(frozen=True, slots=True)
class CredentialPaths:
    issuer_cert: Path
    issuer_key: Path
    trust_anchors: Path

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str], trust_anchors: str | None = None) -> CredentialPaths:
        d = Path(directory)
        if (d / "tls.crt").exists() or not (d / "crt.pem").exists():
            cert, key = d / "tls.crt", d / "tls.key"
        else:
            cert, key = d / "crt.pem", d / "key.pem"
        return cls(cert, key, Path(trust_anchors) if trust_anchors else d / "ca.crt")

    def files(self) -> tuple[Path, ...]:
        return (self.issuer_cert, self.issuer_key, self.trust_anchors)


FileSignature = tuple[tuple[str, int, int, int], ...]


def contents(paths: CredentialPaths) -> bytes:
    """The files' bytes (a digest of what was loaded): a file rewritten with the same bytes is no
    change. Unreadable files read as empty (the load that follows says why)."""
    out = hashlib.sha256()
    for p in paths.files():
        try:
            out.update(p.read_bytes())
        except OSError:
            pass
        out.update(b"\0")
    return out.digest()


def signature(paths: CredentialPaths) -> FileSignature:
    out = []
    for p in paths.files():
        try:
            st = os.stat(p)  # follows symlinks: a swapped ..data link changes the target's inode
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1, -1))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class LoadedCredentials:
    issuer: IssuerCredentials
    bundle: TrustBundle
    # The window in which this issuer may sign: the intersection of its chain's validity periods.
    valid_from: dt.datetime
    valid_until: dt.datetime


def credentials_from_pem(cert_pem: bytes, key_pem: bytes, anchors_pem: bytes, now: dt.datetime,
                         sources: tuple[str, str, str] = ("issuer certificate", "issuer key", "trust anchors"),
                         ) -> LoadedCredentials:
    """Validate an issuer and anchors given as PEM; raises CertificateError with a one-line reason.

    ``sources`` names where each came from (files, or a Secret's and a ConfigMap's keys) for errors."""
    bundle = TrustBundle.from_pem(anchors_pem, sources[2])
    creds = load_issuer(cert_pem, key_pem, sources[0], sources[1])
    validate_issuer(creds, bundle, now)
    path = chain_to_anchor(creds.certificate, creds.chain, bundle, now, "issuer")
    return LoadedCredentials(
        creds,
        bundle,
        max(c.not_valid_before_utc for c in path),
        min(c.not_valid_after_utc for c in path),
    )


def load_credentials(paths: CredentialPaths, now: dt.datetime) -> LoadedCredentials:
    """Read and validate the issuer and anchors; raises CertificateError with a one-line reason."""

    def read(p: Path, what: str) -> bytes:
        try:
            return p.read_bytes()
        except OSError as e:
            raise CertificateError(f"cannot read the {what} {p}: {e.strerror}") from None

    anchors = read(paths.trust_anchors, "trust anchors")
    return credentials_from_pem(
        read(paths.issuer_cert, "issuer certificate"),
        read(paths.issuer_key, "issuer key"),
        anchors,
        now,
        (str(paths.issuer_cert), str(paths.issuer_key), str(paths.trust_anchors)),
    )


class ReloadingIssuer:
    """An Issuer over credentials that a platform replaces when their source changes; the last good
    credentials stay in force when a new version does not validate."""

    def __init__(self, current: LoadedCredentials, policy: IssuancePolicy, now: Callable[[], dt.datetime]) -> None:
        self.current = current
        self.policy = policy
        self.now = now
        self.reloads_ok = 0
        self.reload_errors = 0
        self.last_error: str | None = None

    def issue(self, csr: x509.CertificateSigningRequest, identity: WorkloadIdentity, now: dt.datetime) -> IssuedLeaf:
        cur = self.current
        if not (cur.valid_from <= now < cur.valid_until):
            raise Unavailable(
                f"no valid issuer: {describe(cur.issuer.certificate, 'issuer')} (chain valid "
                f"{fmt_time(cur.valid_from)} to {fmt_time(cur.valid_until)}) cannot sign at {fmt_time(now)}. "
                f"Fix: {self.fix_hint}"
            )
        try:
            return issue_leaf(cur.issuer, csr, identity, now, self.policy, limit=cur.valid_until)
        except CertificateError as e:
            raise Unavailable(str(e)) from None

    fix_hint = "replace the issuer with one valid now"
    source_name = "the issuer"

    def ready(self, now: dt.datetime) -> bool:
        return self.current.valid_from <= now < self.current.valid_until

    def check_for_changes(self) -> bool:
        """Poll the source; True if a new issuer was loaded (sources that push changes return False)."""
        return False

    def replaced(self, loaded: LoadedCredentials) -> None:
        self.current = loaded
        self.reloads_ok += 1
        self.last_error = None
        log.info("issuer reloaded: %s", describe(loaded.issuer.certificate, "issuer"))

    def refused(self, error: str) -> None:
        self.reload_errors += 1
        self.last_error = error
        log.error("%s changed but were not loaded; still using the previous issuer: %s", self.source_name, error)


class FileIssuer(ReloadingIssuer):
    """An Issuer over files, reloaded when they change; keeps the last good issuer if a reload fails."""

    fix_hint = "replace the issuer files with an issuer valid now"
    source_name = "issuer files"

    def __init__(
        self,
        paths: CredentialPaths,
        policy: IssuancePolicy,
        now: Callable[[], dt.datetime],
    ) -> None:
        self.paths = paths
        self._sig: FileSignature = signature(paths)
        self._contents = contents(paths)
        # Raises CertificateError: the service refuses to start without a valid issuer.
        super().__init__(load_credentials(paths, now()), policy, now)

    def check_for_changes(self) -> bool:
        """Reload if the files changed; True if a new issuer was loaded."""
        sig = signature(self.paths)
        if sig == self._sig:
            return False
        self._sig = sig
        now_contents = contents(self.paths)
        if now_contents == self._contents:
            return False  # touched or rewritten with the same bytes
        self._contents = now_contents
        try:
            loaded = load_credentials(self.paths, self.now())
        except CertificateError as e:
            self.refused(str(e))
            return False
        self.replaced(loaded)
        return True
