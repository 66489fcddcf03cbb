"""The proxy's identity client: a private key that never leaves the process, a certificate from the
identity service that is renewed before it expires, and the TLS contexts built from both.

* The key is generated at start by a short-lived child process (``tether.proxy.keygen``) and kept in
  memory (written to disk only if ``key_path`` is set): the proxy itself never loads cryptography.
* Certificates are read with ``core.identity.certview`` (a strict DER reader) and verified by OpenSSL
  through ``ssl``: an in-memory mutual-TLS handshake between the contexts the new chain would get.
* Certify is called with the workload's token (re-read each time: tokens rotate) against a list of
  identity service addresses; when one is down the next is tried.
* Renewal happens at 70% of the certificate's remaining lifetime; on failure it retries with
  jittered exponential backoff while the current certificate keeps serving until it expires.
* ``ready`` is False until the first certificate arrives.
* The trust bundle file is re-read when it changes; contexts are rebuilt when the certificate or the
  bundle changes (existing connections keep the context they were made with).
* TLS 1.3 session resumption between tether proxies (``tlssessions``): each client context comes
  with its own session cache; server contexts issue one ticket to a client that asks for one and
  offers none (``meshtls``). ``session_max_age`` 0 turns resumption off on both sides.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.api.gen import identity_lite
from tether.core.identity.certview import (
    CertificateError,
    CertView,
    TrustAnchors,
    certificates_pem,
    check_leaf_profile,
    describe,
    parse_der,
    validity_problem,
)
from tether.core.identity.names import parse_identity_name
from tether.proxy import keygen, tlsctl
from tether.proxy.grpc_client import GrpcChannel, GrpcError, Status
from tether.proxy.tlspeer import IdentityNotReady, peer_identity, peer_spiffe_id
from tether.proxy.tlssessions import SessionCache

__all__ = ["IdentityClient", "IdentityClientConfig", "IdentityNotReady", "peer_identity", "peer_spiffe_id"]

log = logging.getLogger("tether.proxy.identity")

# gRPC codes worth trying the next replica for; the others (bad token, bad CSR) would fail everywhere.
_FAILOVER_CODES = frozenset(
    {
        Status.UNAVAILABLE,
        Status.DEADLINE_EXCEEDED,
        Status.RESOURCE_EXHAUSTED,
        Status.UNKNOWN,
        Status.INTERNAL,
        Status.CANCELLED,
    }
)
_CERTIFY = "/io.linkerd.proxy.identity.Identity/Certify"
_MAX_CERTIFY_RESPONSE = 64 * 1024


class CertifyFailed(Exception):
    """Every identity service address failed, or the answer was unusable; the message says why."""


@dataclass
class IdentityClientConfig:
    identity: str
    token_path: str
    trust_anchors_path: str
    identity_addrs: Sequence[str]
    key_path: str | None = None
    renew_fraction: float = 0.7
    min_refresh: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    rpc_timeout: float = 10.0
    bundle_poll_interval: float = 5.0
    alpn_protocols: Sequence[str] = ()
    # When set, Certify goes over TLS and the identity service must present this identity (verified
    # against the trust anchors), e.g. linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local.
    identity_server_name: str | None = None
    # A client proxy offers a cached TLS session for at most this long after its full handshake
    # (0: no resumption: servers issue no tickets and accept none, clients offer none).
    session_max_age: float = 300.0
    session_cache_entries: int = 256  # (expected identity, address) pairs per client context
    server_session_cache_entries: int = 256  # sessions a server context keeps for its clients (~11 KiB each)
    # Peer chains each mesh context remembers as verified (tlsctl.cache_verified_chains; ~1.2 KiB
    # each): a full handshake with a peer met before skips the chain's signature checks. 0: off.
    verified_chain_cache_entries: int = 64
    # Have OpenSSL 3.0 use its built-in EC key code in this process (tlsctl.legacy_ec_keys): a full
    # handshake decodes the peer's certificates ~2M instructions cheaper each. False: providers only.
    legacy_ec_keys: bool = True


# The ALPN protocol of connections that start with a transport header (linkerd2-proxy's
# transport.l5d.io/v1): tether.core.transport_header.
TRANSPORT_HEADER_ALPN = "transport.l5d.io/v1"


@dataclass
class _Metrics:
    cert_expiration_timestamp_seconds: float = 0.0
    cert_refresh_timestamp_seconds: float = 0.0
    refreshes_total: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    # (direction, resumed) -> completed mesh TLS handshakes
    handshakes_total: dict[tuple[str, bool], int] = field(default_factory=dict)
    # (direction, cached) -> peer chains checked by contexts no longer in use (the current ones' caches
    # are read at each scrape)
    chain_checks_before: dict[tuple[str, bool], int] = field(default_factory=dict)


def _file_signature(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _load_cert_chain(ctx: ssl.SSLContext, chain_pem: bytes, key: keygen.KeyMaterial) -> None:
    """Load a certificate chain and key into ``ctx`` without writing the key to any filesystem.

    ssl only loads from paths; on Linux a memfd (anonymous memory) provides one. Elsewhere the key is
    encrypted with a one-time password (the key generator made that copy) before it touches a file.
    """
    if hasattr(os, "memfd_create"):
        key_pem = key.key_pem
        fd = os.memfd_create("tether-identity", os.MFD_CLOEXEC)
        try:
            data = memoryview(chain_pem + key_pem)
            while data:
                data = data[os.write(fd, data) :]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    import tempfile  # here: it pulls in shutil, bz2 and lzma (~0.5 MiB) that memfd platforms never use

    with tempfile.TemporaryDirectory(prefix="tether-identity-") as d:
        p = os.path.join(d, "chain.pem")
        _write_private(p, chain_pem + key.key_pem_encrypted)
        ctx.load_cert_chain(p, password=key.password)


# TLS 1.3 suites, most preferred first: all three of OpenSSL's defaults stay accepted (a peer that
# offers only one of them is served), but between two tether proxies AES-128-GCM with SHA-256 is
# chosen over OpenSSL's first choice, AES-256-GCM with SHA-384. It is TLS 1.3's mandatory suite, and
# its 128-bit strength is the key exchange's (X25519) and the certificates' (ECDSA P-256). A new
# connection's key schedule hashes with SHA-256 instead of SHA-384 and each record is encrypted
# with 10 AES rounds instead of 14: ~190k instructions less per new connection for both ends
# (callgrind, OpenSSL 3.0). The ssl module cannot set TLS 1.3 suites: tlsctl does, where it can.
MESH_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _no_session_tickets(ctx: ssl.SSLContext) -> None:
    """A TLS 1.3 server that neither issues session tickets nor accepts them. OpenSSL 3 copies the
    session, peer certificate included, through DER for each ticket (24% of a server proxy's
    instructions per new mesh connection when two were sent to clients that never resumed), so a
    ticket is only worth issuing to a client that will use it (see ``meshtls``)."""
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET


def _loopback_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> str | None:
    """A TLS handshake between two contexts over memory BIOs; None if both ends accept, else why not."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(16):  # a TLS 1.3 handshake takes 2-3 flights; more means something is wrong
        for side, obj in (("client", client), ("server", server)):
            if done[side]:
                continue
            try:
                obj.do_handshake()
                done[side] = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLCertVerificationError as e:
                who = "the server end (our leaf as a peer's server)" if side == "client" else "the client end"
                return f"{who} refused it: {e.verify_message}"
            except ssl.SSLError as e:
                return f"the {side} end failed: {e.reason or e}"
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
        if done["client"] and done["server"] and not c_out.pending and not s_out.pending:
            # TLS 1.3: the server checks the client's certificate after the client finishes; its
            # last flight was read above, so a server-side refusal has surfaced by now.
            try:
                server.read(1)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLCertVerificationError as e:
                return f"the client end refused it: {e.verify_message}"
            except ssl.SSLError as e:
                return f"the server end failed: {e.reason or e}"
            return None
    return "the handshake did not complete"


class IdentityClient:
    """Obtains and renews this proxy's certificate and builds its TLS contexts."""

    def __init__(
        self,
        config: IdentityClientConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if not config.identity_addrs:
            raise ValueError("at least one identity service address is required")
        if not 0 < config.renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        if config.session_max_age < 0 or config.session_cache_entries < 1 or config.server_session_cache_entries < 1:
            raise ValueError("session_max_age must be >= 0 and the session cache sizes >= 1")
        if config.verified_chain_cache_entries < 0:
            raise ValueError("verified_chain_cache_entries must be >= 0")
        self.config = config
        self.legacy_ec_keys = config.legacy_ec_keys and tlsctl.legacy_ec_keys()
        self.identity = parse_identity_name(config.identity)
        self.clock = clock
        self.rng = rng or random.Random()
        self._bundle_sig = _file_signature(config.trust_anchors_path)
        self.bundle = self._read_bundle()  # a proxy with no usable anchors must not start
        try:
            self.key = keygen.generate(self.identity.dns_name, os.urandom(32).hex().encode())
        except keygen.KeygenError as e:
            raise ValueError(str(e)) from None
        if config.key_path:
            _write_private(config.key_path, self.key.key_pem)
        # The CSR depends only on the key and identity, so one serves every renewal.
        self.csr_der = self.key.csr_der
        self.chain: list[CertView] | None = None
        self.metrics = _Metrics()
        self.ready_event = asyncio.Event()
        self.generation = 0  # bumped whenever the contexts change
        self.on_change: list[Callable[[], None]] = []
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._client_sessions: SessionCache | None = None
        self._chain_caches: dict[str, Any] = {}  # direction -> the current context's verified-chain cache
        self._control_ctx: tuple[int, ssl.SSLContext] | None = None  # (generation, context)
        self.stateful_sessions = False  # the server context keeps sessions itself (tlsctl)
        self._next_addr = 0
        self._channels: dict[str, GrpcChannel] = {}
        self._channels_loop: asyncio.AbstractEventLoop | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.chain is not None

    @property
    def valid_until(self) -> dt.datetime | None:
        return self.chain[0].not_valid_after_utc if self.chain else None

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _read_bundle(self) -> TrustAnchors:
        path = self.config.trust_anchors_path
        try:
            data = _read_file(path)
        except OSError as e:
            raise CertificateError(f"cannot read the trust anchors {path}: {e.strerror}") from None
        return TrustAnchors.from_pem(data, path)

    # -- TLS contexts ------------------------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 server context: presents our leaf, requires and verifies a client certificate."""
        if self._server_ctx is None:
            raise IdentityNotReady(f"no certificate for {self.identity.dns_name} yet")
        return self._server_ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """TLS 1.3 client context: presents our leaf, verifies the server's chain and hostname.

        Pass the peer's expected identity as ``server_hostname``: it is sent as SNI and checked
        against the server's DNS SAN.
        """
        if self._client_ctx is None:
            raise IdentityNotReady(f"no certificate for {self.identity.dns_name} yet")
        return self._client_ctx

    def client_sessions(self) -> SessionCache | None:
        """The session cache of the current client context (None: resumption is off, or no certificate
        yet). Its ``context`` is the client context: use the two together."""
        return self._client_sessions

    @property
    def resumption(self) -> bool:
        """True if server contexts accept session tickets and issue them on request."""
        return self.config.session_max_age > 0

    def count_handshake(self, direction: str, resumed: bool) -> None:
        """Count a completed mesh TLS handshake (tls_handshakes_total)."""
        key = (direction, resumed)
        self.metrics.handshakes_total[key] = self.metrics.handshakes_total.get(key, 0) + 1

    async def control_context(self) -> ssl.SSLContext:
        """A client context for the control plane (destination, policy): mutual TLS with this proxy's
        certificate, ALPN h2 (gRPC), the server verified against the trust anchors and by name.

        Waits for the first certificate; a rotation (certificate or anchors) gives a new context, used
        by the next connection. No session resumption: a control-plane connection is long-lived.
        """
        await self.ready_event.wait()
        cached = self._control_ctx
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        assert self.chain is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.bundle.pem().decode())
        _load_cert_chain(ctx, certificates_pem(self.chain), self.key)
        ctx.set_alpn_protocols(["h2"])
        ctx.options |= ssl.OP_NO_TICKET
        self._control_ctx = (self.generation, ctx)
        return ctx

    def listener_ssl_context(self) -> ssl.SSLContext:
        """A server context for a long-lived listener: each handshake switches to the current context.

        ``asyncio`` binds one SSLContext to a listening server, so a rotated certificate or bundle would
        not reach new connections. This context's SNI callback swaps in ``server_ssl_context()`` at
        every ClientHello (certificate, key and verify store), so the listener never needs restarting.
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        tlsctl.prefer_suites(ctx, MESH_TLS13_SUITES)  # (the SNI switch keeps the connection's suites)
        # No resumption here: this context outlives rotations, and so would its ticket keys.
        _no_session_tickets(ctx)
        # (ALPN is chosen after the SNI switch, by the context switched to: set here all the same.)
        ctx.set_alpn_protocols(list(self.config.alpn_protocols) or [TRANSPORT_HEADER_ALPN])

        def switch(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            try:
                sslobj.context = self.server_ssl_context()
            except IdentityNotReady:
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            return None

        ctx.sni_callback = switch
        return ctx

    def _build_contexts(self, chain: list[CertView] | None = None, bundle: TrustAnchors | None = None) -> None:
        """Build both contexts from ``chain`` and ``bundle`` (default: the current ones), then swap."""
        self._server_ctx, self._client_ctx = self._make_contexts(chain, bundle)
        for direction, counts in self._chain_checks().items():  # the replaced contexts' counts
            for cached, n in counts.items():
                key = (direction, cached)
                self.metrics.chain_checks_before[key] = self.metrics.chain_checks_before.get(key, 0) + n
        self._chain_caches = {"inbound": getattr(self._server_ctx, "_tether_verified_chains", None),
                              "outbound": getattr(self._client_ctx, "_tether_verified_chains", None)}
        # A new client context starts an empty cache: no session verified under the previous
        # certificate or anchors is offered again (and the ssl module refuses another context's).
        leaf = chain[0] if chain else self.chain[0] if self.chain else None
        self._client_sessions = None
        if self.config.session_max_age > 0 and leaf is not None:
            self._client_sessions = SessionCache(
                self._client_ctx, self.config.session_cache_entries, self.config.session_max_age,
                leaf.not_valid_after_utc.timestamp())
        self.generation += 1
        for cb in list(self.on_change):
            try:
                cb()
            except Exception:
                log.exception("identity on_change callback failed")

    def _make_contexts(self, chain: list[CertView] | None = None,
                       bundle: TrustAnchors | None = None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        """A server and a client context for ``chain`` and ``bundle`` (default: the current ones)."""
        chain = chain or self.chain
        bundle = bundle or self.bundle
        assert chain is not None
        chain_pem = certificates_pem(chain)
        anchors = bundle.pem().decode()
        contexts = []
        for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
            ctx = ssl.SSLContext(purpose)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=anchors)
            if self.config.verified_chain_cache_entries:
                tlsctl.cache_verified_chains(ctx, self.config.verified_chain_cache_entries)
            _load_cert_chain(ctx, chain_pem, self.key)
            tlsctl.prefer_suites(ctx, MESH_TLS13_SUITES)
            if self.config.alpn_protocols:
                ctx.set_alpn_protocols(list(self.config.alpn_protocols))
            elif purpose == ssl.PROTOCOL_TLS_SERVER:
                # A client that sends a transport header asks for this protocol (Linkerd's proxies
                # send the header only once it is agreed); a client that asks for none gets none.
                ctx.set_alpn_protocols([TRANSPORT_HEADER_ALPN])
            if purpose == ssl.PROTOCOL_TLS_SERVER:
                if self.config.session_max_age > 0:
                    # Tickets are issued per connection, to clients that ask (meshtls). The
                    # sessions stay in this context (a bounded cache, expiring after the max age;
                    # where tlsctl cannot do that, tickets carry them, encrypted under this
                    # context's key): a rotation (a new context) invalidates all of them.
                    ctx.num_tickets = 0
                    self.stateful_sessions = tlsctl.keep_server_sessions(
                        ctx, b"tether-mesh", self.config.server_session_cache_entries, self.config.session_max_age)
                else:
                    _no_session_tickets(ctx)
            elif self.config.session_max_age == 0:
                ctx.options |= ssl.OP_NO_TICKET  # no session_ticket extension: servers issue none
            contexts.append(ctx)
        contexts[1].check_hostname = True
        return contexts[0], contexts[1]

    def _handshake_problem(self, chain: list[CertView], bundle: TrustAnchors) -> str | None:
        """Why peers holding ``bundle`` would refuse ``chain`` (OpenSSL's verdict), or None.

        The contexts ``chain`` would get do a mutual-TLS handshake with each other over memory BIOs,
        the client asking for our own name: OpenSSL checks the key matches, every signature up to an
        anchor, the validity dates and the DNS SAN, both ways, as a peer proxy will.
        """
        try:
            server_ctx, client_ctx = self._make_contexts(chain, bundle)
        except (ssl.SSLError, ValueError) as e:
            return f"cannot be loaded with this proxy's key: {e}"
        return _loopback_handshake(server_ctx, client_ctx, self.identity.dns_name)

    # -- certify -----------------------------------------------------------------------------------

    def _channel(self, addr: str) -> GrpcChannel:
        # A connection belongs to the loop that made it; a new loop (tests, restarts) needs new ones.
        loop = asyncio.get_running_loop()
        if loop is not self._channels_loop:
            self._channels = {}
            self._channels_loop = loop
        ch = self._channels.get(addr)
        if ch is None:
            name = self.config.identity_server_name
            ctx: ssl.SSLContext | None = None
            if name:
                # The identity service is verified against the trust anchors; no client certificate
                # (the proxy has none before its first Certify).
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cadata=self.bundle.pem().decode())
                ctx.set_alpn_protocols(["h2"])
            ch = GrpcChannel(addr, connect_timeout=self.config.rpc_timeout, ssl_context=ctx, server_hostname=name,
                             max_message_bytes=_MAX_CERTIFY_RESPONSE)
            self._channels[addr] = ch
        return ch

    def _read_token(self) -> bytes:
        try:
            return _read_file(self.config.token_path).strip()
        except OSError as e:
            path = self.config.token_path
            raise CertifyFailed(f"cannot read the identity token {path}: {e.strerror}") from None

    async def certify_once(self) -> list[CertView]:
        """One Certify, failing over across addresses; returns a verified chain (leaf first)."""
        request = identity_lite.CertifyRequest(
            identity=self.identity.dns_name,
            token=self._read_token(),
            certificate_signing_request=self.csr_der,
        )
        addrs = list(self.config.identity_addrs)
        errors = []
        for i in range(len(addrs)):
            idx = (self._next_addr + i) % len(addrs)
            addr = addrs[idx]
            try:
                raw = await self._channel(addr).unary(_CERTIFY, request.SerializeToString(), self.config.rpc_timeout)
            except GrpcError as e:
                errors.append(f"{addr}: {e.name}: {e.details}")
                if e.code in _FAILOVER_CODES:
                    continue
                raise CertifyFailed("; ".join(errors)) from None
            try:
                resp = identity_lite.CertifyResponse.FromString(raw)
            except Exception as e:  # protolite's DecodeError
                raise CertifyFailed(f"{addr} returned an undecodable CertifyResponse: {e}") from None
            self._next_addr = idx  # stay with a replica that answers
            return self._verify(resp, addr)
        raise CertifyFailed("every identity service failed: " + "; ".join(errors))

    def _verify(self, resp: Any, addr: str) -> list[CertView]:
        try:
            leaf = parse_der(resp.leaf_certificate, "leaf certificate")
            intermediates = [parse_der(d, f"intermediate certificate {i}")
                             for i, d in enumerate(resp.intermediate_certificates, 1)]
        except CertificateError as e:
            raise CertifyFailed(f"{addr} returned an unparseable certificate: {e}") from None
        if leaf.spki_der != self.key.spki_der:
            raise CertifyFailed(f"{addr} returned a certificate for a different key")
        dns, uris = list(leaf.dns_names), list(leaf.uris)
        if self.identity.dns_name not in dns or uris != [self.identity.spiffe_id]:
            want = self.identity.dns_name
            raise CertifyFailed(f"{addr} returned a certificate for {dns + uris}, not {want}")
        chain = [leaf, *intermediates]
        try:
            check_leaf_profile(leaf)
            self._check_chain(chain, self.bundle)
        except CertificateError as e:
            raise CertifyFailed(f"{addr} returned a certificate this proxy cannot use: {e}") from None
        return chain

    def _check_chain(self, chain: list[CertView], bundle: TrustAnchors) -> None:
        """Dates at this client's clock first (clear messages), then OpenSSL's verdict on the signatures."""
        now = self._now()
        for i, cert in enumerate(chain):
            problem = validity_problem(cert, now, "leaf" if i == 0 else "intermediate")
            if problem:
                raise CertificateError(problem)
        top = chain[-1]
        for anchor in bundle.issuers_of(top):
            problem = validity_problem(anchor, now, "trust anchor")
            if problem:
                raise CertificateError(
                    f"{problem}; {describe(chain[0], 'leaf')} chains to it. Fix: issue a new anchor and issuer "
                    "and distribute the new anchor to every proxy"
                )
        problem = self._handshake_problem(chain, bundle)
        if problem is None:
            return
        if not bundle.issuers_of(top) and not any(a.fingerprint == top.fingerprint for a in bundle.anchors):
            anchors = ", ".join(describe(a, "anchor") for a in bundle.anchors)
            who = describe(top, "leaf" if top is chain[0] else "intermediate")
            raise CertificateError(
                f"{who} is not signed by any trust anchor ({anchors}); issued by {top.issuer!r}. Fix: re-issue "
                "it from one of these anchors, or add its anchor to the trust bundle"
            )
        raise CertificateError(f"{describe(chain[0], 'leaf')} does not verify against the trust anchors: {problem}")

    def refresh_delay(self, leaf: CertView) -> float:
        """Seconds until renewal: renew_fraction of the remaining lifetime, at least min_refresh."""
        remaining = leaf.not_valid_after_utc.timestamp() - self.clock()
        return max(self.config.min_refresh, remaining * self.config.renew_fraction)

    def backoff_delay(self, failures: int) -> float:
        """Exponential backoff with full jitter in [base/2, cap]."""
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** min(failures - 1, 30)))
        return self.rng.uniform(cap / 2, cap)

    def install(self, chain: list[CertView]) -> None:
        """Use a verified chain: contexts first, so a failure leaves the previous state whole."""
        self._build_contexts(chain=chain)
        self.chain = chain
        self.metrics.cert_expiration_timestamp_seconds = chain[0].not_valid_after_utc.timestamp()
        self.metrics.cert_refresh_timestamp_seconds = self.clock()
        self.metrics.refreshes_total["ok"] += 1
        self.ready_event.set()

    async def _refresh_loop(self) -> None:
        failures = 0
        while True:
            try:
                chain = await self.certify_once()
                self.install(chain)
            except Exception as e:  # any failure: keep the current certificate and retry with backoff
                if not isinstance(e, CertifyFailed):
                    log.exception("unexpected error while refreshing the certificate")
                failures += 1
                self.metrics.refreshes_total["error"] += 1
                delay = self.backoff_delay(failures)
                left = ""
                if self.chain:
                    left = f"; current certificate valid until {self.valid_until}"
                log.warning("certificate refresh failed (attempt %d, retry in %.1fs%s): %s", failures, delay, left, e)
            else:
                failures = 0
                delay = self.refresh_delay(chain[0])
                log.info(
                    "certified as %s until %s; next refresh in %.0fs",
                    self.identity.dns_name,
                    chain[0].not_valid_after_utc.isoformat(),
                    delay,
                )
            await asyncio.sleep(delay)

    # -- trust bundle ------------------------------------------------------------------------------

    def check_bundle(self) -> bool:
        """Re-read the trust anchors if the file changed; True if a new bundle was installed."""
        sig = _file_signature(self.config.trust_anchors_path)
        if sig == self._bundle_sig:
            return False
        self._bundle_sig = sig
        try:
            bundle = self._read_bundle()
        except CertificateError as e:
            log.error("trust anchors changed but cannot be used; keeping the previous bundle: %s", e)
            return False
        if bundle.pem() == self.bundle.pem():
            return False
        if self.chain is not None:
            try:
                self._build_contexts(bundle=bundle)
            except (ssl.SSLError, ValueError) as e:
                log.error("trust anchors changed but cannot be loaded; keeping the previous bundle: %s", e)
                return False
        self.bundle = bundle
        log.info("trust anchors reloaded: %d anchor(s)", len(bundle.anchors))
        if self.config.identity_server_name:
            # TLS channels verify the identity service with the old anchors: redial with the new ones.
            for ch in self._channels.values():
                ch.close()
            self._channels = {}
        if self.chain is not None:
            try:
                self._check_chain(self.chain, bundle)
            except CertificateError as e:
                # Peers with this bundle will refuse our current leaf until it is renewed under a new
                # anchor: the rotation steps were run out of order.
                log.warning("the new trust bundle does not cover this proxy's current certificate: %s", e)
        return True

    async def _bundle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.bundle_poll_interval)
            self.check_bundle()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Certify, renew and watch the bundle until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._refresh_loop())
                tg.create_task(self._bundle_loop())
        finally:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    # -- admin -------------------------------------------------------------------------------------

    def identity_json(self) -> dict[str, Any]:
        """What the admin server returns at GET /identity.json (see `tether identity`)."""
        return {
            "identity": self.identity.dns_name,
            "spiffe_id": self.identity.spiffe_id,
            "ready": self.ready,
            "certificate_chain_pem": certificates_pem(self.chain).decode() if self.chain else "",
            "trust_anchors_pem": self.bundle.pem().decode(),
            "refreshed_at": self.metrics.cert_refresh_timestamp_seconds,
        }

    def metrics_lines(self) -> str:
        """The identity metrics in Prometheus text format (until the proxy's registry renders them)."""
        m = self.metrics
        return (
            "# HELP control_identity_cert_expiration_timestamp_seconds Time when this proxy's current mTLS "
            "identity certificate will expire (in seconds since the UNIX epoch).\n"
            "# TYPE control_identity_cert_expiration_timestamp_seconds gauge\n"
            f"control_identity_cert_expiration_timestamp_seconds {m.cert_expiration_timestamp_seconds:.3f}\n"
            "# HELP control_identity_cert_refresh_timestamp_seconds Time of this proxy's last certificate "
            "refresh (in seconds since the UNIX epoch).\n"
            "# TYPE control_identity_cert_refresh_timestamp_seconds gauge\n"
            f"control_identity_cert_refresh_timestamp_seconds {m.cert_refresh_timestamp_seconds:.3f}\n"
            "# HELP control_identity_cert_refreshes_total Certificate refresh attempts by result.\n"
            "# TYPE control_identity_cert_refreshes_total counter\n"
            f'control_identity_cert_refreshes_total{{result="ok"}} {m.refreshes_total["ok"]}\n'
            f'control_identity_cert_refreshes_total{{result="error"}} {m.refreshes_total["error"]}\n'
            + self._handshake_lines()
        )

    def _chain_checks(self) -> dict[str, dict[bool, int]]:
        """Peer chains checked by the current contexts: direction -> {cached: count}."""
        out: dict[str, dict[bool, int]] = {}
        for direction, cache in self._chain_caches.items():
            if cache is not None:
                st = cache.stats()
                out[direction] = {True: st["hits"], False: st["misses"]}
        return out

    def _handshake_lines(self) -> str:
        counts = self.metrics.handshakes_total
        if not counts:
            return ""
        lines = ["# HELP tls_handshakes_total Mesh TLS handshakes completed, by direction and whether a "
                 "session was resumed.\n# TYPE tls_handshakes_total counter\n"]
        for (direction, resumed), n in sorted(counts.items()):
            lines.append(f'tls_handshakes_total{{direction="{direction}",resumed="{str(resumed).lower()}"}} {n}\n')
        checks = dict(self.metrics.chain_checks_before)
        for direction, now in self._chain_checks().items():
            for cached, n in now.items():
                checks[(direction, cached)] = checks.get((direction, cached), 0) + n
        if checks:
            lines.append("# HELP tls_peer_chain_checks_total Peer certificate chains checked in full mesh TLS "
                         "handshakes, by direction and whether a verdict remembered from an earlier handshake with "
                         "the same chain answered (cached) or OpenSSL verified it in full.\n"
                         "# TYPE tls_peer_chain_checks_total counter\n")
            for (direction, cached), n in sorted(checks.items()):
                lines.append(f'tls_peer_chain_checks_total{{direction="{direction}",cached="{str(cached).lower()}"}} '
                             f'{n}\n')
        sessions = self._client_sessions
        if sessions is not None:
            lines.append("# HELP tls_session_cache_entries TLS sessions this proxy's current client context "
                         "may offer again.\n# TYPE tls_session_cache_entries gauge\n"
                         f"tls_session_cache_entries {len(sessions)}\n")
        return "".join(lines)
