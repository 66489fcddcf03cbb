"""A control-plane service's own certificate, from the identity service, for serving mutual TLS.

Proxies dial the destination service over mutual TLS and require a certificate for its identity
(``linkerd-destination.<ns>.serviceaccount.identity.<ns>.<trust-domain>``, as Linkerd's proxies
do). The destination service gets that certificate the way a workload does: a key made here, a CSR
and the service's token sent to the identity service's Certify over TLS (the identity service is
verified against the trust anchors and by its own name), the answer checked, renewed at half its
life. Nothing is written to disk.

``ssl_context()`` is the current server context: the certificate, a client certificate chained to
the current trust anchors required. The TLS front (tether.control.tlsfront) asks for it at every
handshake, so a renewal or a new anchors file reaches the next connection without a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.api.gen import identity_pb2, identity_pb2_grpc
from tether.control.tlsfront import server_context
from tether.core.identity.certs import (
    CertificateError,
    TrustBundle,
    certificates_pem,
    chain_to_anchor,
    check_leaf_profile,
    public_keys_match,
    sans,
)
from tether.core.identity.csr import build_csr, generate_key
from tether.core.identity.names import WorkloadIdentity

log = logging.getLogger(__name__)


class NotCertified(Exception):
    """The identity service did not (or not yet) give this service a usable certificate."""


@dataclass(frozen=True)
class OwnCertConfig:
    identity: WorkloadIdentity  # this service's own identity
    identity_addrs: Sequence[str]  # host:port of the identity service's replicas
    identity_server_name: str  # the identity service's own identity (its certificate's DNS name)
    token_path: str  # this service's token (a local bootstrap token, a projected service account token)
    trust_anchors_path: str
    rpc_timeout: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    anchors_poll_interval: float = 5.0


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise NotCertified(f"cannot read {what} {path}: {e.strerror}") from None


class OwnCertificate:
    """Certify, renew, and hand grpcio the current serving configuration."""

    def __init__(self, cfg: OwnCertConfig, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        if not cfg.identity_addrs:
            raise ValueError("the identity service needs at least one address")
        self.cfg = cfg
        self.clock = clock
        self.bundle = self._read_bundle()  # no usable anchors: refuse to start
        self._anchors_sig = self._anchors_signature()
        self.key = generate_key()
        self.key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        self.csr_der = build_csr(self.key, cfg.identity)
        self.chain: list[x509.Certificate] | None = None
        self.certified = asyncio.Event()
        self.renewals = {"ok": 0, "error": 0}
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._next = 0
        self._rng = random.Random()

    # -- certify -------------------------------------------------------------------------------------

    def _read_bundle(self) -> TrustBundle:
        return TrustBundle.from_pem(_read(self.cfg.trust_anchors_path, "the trust anchors"),
                                    self.cfg.trust_anchors_path)

    def _anchors_signature(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.cfg.trust_anchors_path)
        except OSError:
            return (0, 0, 0)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    async def certify_once(self) -> list[x509.Certificate]:
        """One Certify, trying each replica in turn; returns the checked chain (leaf first)."""
        token = _read(self.cfg.token_path, "the token").strip()
        request = identity_pb2.CertifyRequest(identity=self.cfg.identity.dns_name, token=token,
                                              certificate_signing_request=self.csr_der)
        creds = grpc.ssl_channel_credentials(root_certificates=self.bundle.pem())
        options = [("grpc.ssl_target_name_override", self.cfg.identity_server_name)]
        addrs = list(self.cfg.identity_addrs)
        errors = []
        for i in range(len(addrs)):
            addr = addrs[(self._next + i) % len(addrs)]
            async with grpc.aio.secure_channel(addr, creds, options=options) as channel:
                try:
                    resp = await identity_pb2_grpc.IdentityStub(channel).Certify(request,
                                                                                timeout=self.cfg.rpc_timeout)
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{addr}: {e.code().name}: {e.details()}")
                    continue
            self._next = (self._next + i) % len(addrs)
            try:
                return self._check(resp)
            except (CertificateError, ValueError) as e:
                raise NotCertified(f"{addr} answered with an unusable certificate: {e}") from None
        raise NotCertified("no identity service replica certified this service: " + "; ".join(errors))

    def _check(self, resp: identity_pb2.CertifyResponse) -> list[x509.Certificate]:
        leaf = x509.load_der_x509_certificate(resp.leaf_certificate)
        intermediates = [x509.load_der_x509_certificate(d) for d in resp.intermediate_certificates]
        if not public_keys_match(leaf, self.key):
            raise CertificateError("the certificate is for another key")
        dns, _uris = sans(leaf)
        if self.cfg.identity.dns_name not in dns:
            raise CertificateError(f"the certificate names {dns}, not {self.cfg.identity.dns_name}")
        check_leaf_profile(leaf)
        path = chain_to_anchor(leaf, intermediates, self.bundle, self.clock(), "certificate")
        # Present the leaf and its intermediates, never the anchor itself.
        return [c for c in path if not self.bundle.is_anchor(c)]

    def install(self, chain: list[x509.Certificate]) -> None:
        context = server_context(certificates_pem(chain), self.key_pem, self.bundle.pem())
        with self._lock:
            self.chain = chain
            self._context = context
        self.certified.set()
        log.info("serving mutual TLS as %s until %s", self.cfg.identity.dns_name,
                 chain[0].not_valid_after_utc.isoformat())

    def renew_at(self) -> dt.datetime:
        assert self.chain is not None
        leaf = self.chain[0]
        return leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2

    async def run(self) -> None:
        """Certify until it works, then renew at half life and follow the anchors file; until cancelled."""
        failures = 0
        while True:
            if self._anchors_changed():
                failures = 0
                continue  # certify again under the new anchors at once
            if self.chain is not None and self.clock() < self.renew_at():
                wait = min((self.renew_at() - self.clock()).total_seconds(), self.cfg.anchors_poll_interval)
                await asyncio.sleep(max(0.0, wait))
                continue
            try:
                self.install(await self.certify_once())
                self.renewals["ok"] += 1
                failures = 0
            except NotCertified as e:
                failures += 1
                self.renewals["error"] += 1
                cap = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** min(failures - 1, 30))
                log.warning("cannot get a certificate for %s (retrying): %s", self.cfg.identity.dns_name, e)
                await asyncio.sleep(self._rng.uniform(cap / 2, cap))

    def _anchors_changed(self) -> bool:
        sig = self._anchors_signature()
        if sig == self._anchors_sig:
            return False
        self._anchors_sig = sig
        try:
            bundle = self._read_bundle()
        except (NotCertified, CertificateError) as e:
            log.error("trust anchors not reloaded (the previous ones stay): %s", e)
            return False
        self.bundle = bundle
        log.info("trust anchors reloaded: %d anchor(s); certifying again", len(bundle.anchors))
        self.chain = None  # the next loop certifies under the new anchors
        return True

    # -- serving -------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """The current server context (the TLS front asks at every handshake): this service's chain,
        a client certificate chained to the current anchors required."""
        with self._lock:
            if self._context is None:
                raise NotCertified(f"no certificate for {self.cfg.identity.dns_name} yet")
            return self._context
