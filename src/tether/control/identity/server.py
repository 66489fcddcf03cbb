"""`tether controller identity`: the identity service over gRPC, with an admin server for /metrics and /ready.

Stateless over its issuer files, so several replicas can serve the same issuer; proxies list all of
their addresses and fail over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.timestamp_pb2 import Timestamp

from tether.api.gen import identity_pb2, identity_pb2_grpc
from tether.control.admin import serve_admin
from tether.control.identity.credentials import CredentialPaths, FileIssuer, ReloadingIssuer
from tether.control.identity.ratelimit import RateLimiter
from tether.control.identity.service import CertifyError, IdentityService, TokenValidator
from tether.control.tlsfront import TlsFront, server_context, start_serving
from tether.core.identity.certs import certificates_pem
from tether.core.identity.csr import build_csr, generate_key, validate_csr
from tether.core.identity.issuance import IssuancePolicy
from tether.core.identity.names import DEFAULT_CONTROL_PLANE_NS, DEFAULT_TRUST_DOMAIN, WorkloadIdentity

log = logging.getLogger("tether.identity")

MAX_MESSAGE_BYTES = 64 * 1024


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class IdentityServerConfig:
    addr: tuple[str, int] = ("0.0.0.0", 8080)
    admin_addr: tuple[str, int] = ("127.0.0.1", 9990)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    control_plane_ns: str = DEFAULT_CONTROL_PLANE_NS
    paths: CredentialPaths | None = None
    state_dir: str = ".tether"
    issuance_lifetime: float = 24 * 3600.0
    clock_skew: float = 20.0
    reload_interval: float = 5.0
    rate: float = 10.0
    burst: int = 20
    max_concurrent_rpcs: int = 1000
    # Serve gRPC over TLS with a certificate this service issues to itself, for the identity
    # <service_account>.<cp-ns>.serviceaccount.identity.<cp-ns>.<td>; proxies verify it with their anchors.
    tls: bool = False
    service_account: str = "linkerd-identity"
    # With tls: also serve plaintext gRPC on addr (tether.control.tlsfront tells the two apart), for
    # the proxies of a release before control-plane TLS while an upgrade replaces them.
    accept_plaintext: bool = False


def issuance_policy(cfg: IdentityServerConfig) -> IssuancePolicy:
    """The issuance policy the configuration asks for (lifetime, clock-skew allowance)."""
    return IssuancePolicy(dt.timedelta(seconds=cfg.issuance_lifetime), dt.timedelta(seconds=cfg.clock_skew))


class _Servicer(identity_pb2_grpc.IdentityServicer):
    def __init__(self, service: IdentityService) -> None:
        self.service = service

    async def Certify(
        self, request: identity_pb2.CertifyRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CertifyResponse:
        caller = _peer_host(context.peer() or "unknown")
        try:
            leaf = await self.service.certify(
                request.identity, request.token, request.certificate_signing_request, caller
            )
        except CertifyError as e:
            log.info("Certify %r from %s refused (%s): %s", request.identity[:256], caller, e.code, e)
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
            raise  # unreachable: abort raises
        ts = Timestamp()
        ts.FromDatetime(leaf.not_after)
        log.info("issued %s to %s, valid until %s", request.identity, caller, leaf.not_after.isoformat())
        return identity_pb2.CertifyResponse(
            leaf_certificate=leaf.leaf_der,
            intermediate_certificates=list(leaf.intermediates_der),
            valid_until=ts,
        )


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5432" / "ipv6:[::1]:5432" -> the host; the port changes per connection.
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]")
    return peer


class IdentityController:
    """The running service: gRPC server, issuer reload loop, admin server."""

    def __init__(self, cfg: IdentityServerConfig, validator: TokenValidator,
                 issuer: ReloadingIssuer | None = None) -> None:
        self.cfg = cfg
        if issuer is None:
            if cfg.paths is None:
                raise ValueError("issuer paths are required")
            # Raises CertificateError when the issuer cannot be used: the caller prints it and exits.
            issuer = FileIssuer(cfg.paths, issuance_policy(cfg), utcnow)
        # From files, or from a platform that replaces it when its source changes (a Kubernetes Secret).
        self.issuer = issuer
        self.service = IdentityService(
            validator,  # the platform's (the CLI wires it: local bootstrap tokens, Kubernetes TokenReview)
            self.issuer,
            cfg.trust_domain,
            cfg.control_plane_ns,
            RateLimiter(cfg.rate, cfg.burst, time.monotonic),
            utcnow,
        )
        self.grpc_port: int | None = None
        self.admin_port: int | None = None
        self.serving = asyncio.Event()
        self.own_identity = WorkloadIdentity(
            cfg.service_account, cfg.control_plane_ns, cfg.control_plane_ns, cfg.trust_domain
        )
        # (issuer it came from, renew after, context); the front asks for it at every handshake.
        self._tls_state: tuple[object, dt.datetime, ssl.SSLContext] | None = None
        self.front: TlsFront | None = None  # with tls, once serving

    # -- its own serving certificate ---------------------------------------------------------------

    def _issue_own(self) -> ssl.SSLContext:
        key = generate_key()
        csr = validate_csr(build_csr(key, self.own_identity), self.own_identity)
        now = utcnow()
        current = self.issuer.current
        leaf = self.issuer.issue(csr, self.own_identity, now)
        chain = [x509.load_der_x509_certificate(d) for d in (leaf.leaf_der, *leaf.intermediates_der)]
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # No client certificate: a proxy has none before its first Certify.
        context = server_context(certificates_pem(chain), key_pem, None)
        # Renew at half its life, and whenever the issuer is replaced.
        self._tls_state = (current, now + (leaf.not_after - now) / 2, context)
        log.info("serving TLS as %s until %s", self.own_identity.dns_name, leaf.not_after.isoformat())
        return context

    def _tls_context(self) -> ssl.SSLContext:
        # Asked by the TLS front at every handshake (on the event loop).
        state = self._tls_state
        if state is not None and state[0] is self.issuer.current and utcnow() < state[1]:
            return state[2]
        try:
            return self._issue_own()
        except CertifyError as e:
            if state is None:
                raise
            log.error("cannot renew the identity service's own certificate (the current one stays): %s", e)
            return state[2]

    def metrics_text(self) -> str:
        now = utcnow()
        cur = self.issuer.current
        exp = cur.issuer.certificate.not_valid_after_utc.timestamp()
        lines = [
            "# HELP identity_cert_expiration_timestamp_seconds Time when the issuer certificate expires "
            "(seconds since the UNIX epoch).",
            "# TYPE identity_cert_expiration_timestamp_seconds gauge",
            f"identity_cert_expiration_timestamp_seconds {exp:.0f}",
            # The name the seeds' LinkerdCertificateExpiringSoon alert queries (a Prometheus
            # scrape of Linkerd's control plane with its "linkerd_" prefix), served as is.
            "# HELP linkerd_identity_cert_expiration_timestamp_seconds Time when the issuer certificate "
            "expires (seconds since the UNIX epoch).",
            "# TYPE linkerd_identity_cert_expiration_timestamp_seconds gauge",
            f"linkerd_identity_cert_expiration_timestamp_seconds {exp:.0f}",
            "# HELP issuer_cert_ttl_seconds Seconds until the issuer expires (negative once expired).",
            "# TYPE issuer_cert_ttl_seconds gauge",
            f"issuer_cert_ttl_seconds {exp - now.timestamp():.0f}",
            "# HELP identity_trust_anchor_expiration_timestamp_seconds Time when each trust anchor expires.",
            "# TYPE identity_trust_anchor_expiration_timestamp_seconds gauge",
        ]
        for a in cur.bundle.anchors:
            subject = a.subject.rfc4514_string().replace("\\", "\\\\").replace('"', '\\"')
            lines.append(
                f'identity_trust_anchor_expiration_timestamp_seconds{{subject="{subject}"}} '
                f"{a.not_valid_after_utc.timestamp():.0f}"
            )
        lines += [
            "# HELP identity_issuer_reloads_total Issuer reloads after its files changed.",
            "# TYPE identity_issuer_reloads_total counter",
            f'identity_issuer_reloads_total{{result="ok"}} {self.issuer.reloads_ok}',
            f'identity_issuer_reloads_total{{result="error"}} {self.issuer.reload_errors}',
            "# HELP identity_certify_total Certify calls by result.",
            "# TYPE identity_certify_total counter",
        ]
        for result, n in sorted(self.service.counters.results.items()):
            lines.append(f'identity_certify_total{{result="{result}"}} {n}')
        if self.front is not None:
            lines += self.front.metrics_lines("identity")
        return "\n".join(lines) + "\n"

    def ready(self) -> bool:
        return self.serving.is_set() and self.issuer.ready(utcnow())

    async def _admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_admin(reader, writer, metrics=self.metrics_text, ready=self.ready)

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            self.issuer.check_for_changes()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            maximum_concurrent_rpcs=self.cfg.max_concurrent_rpcs,
        )
        identity_pb2_grpc.add_IdentityServicer_to_server(_Servicer(self.service), server)
        host, port = self.cfg.addr
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        front: TlsFront | None = None
        if self.cfg.tls:
            # gRPC in plaintext on a loopback port of its own, TLS on addr (tether.control.tlsfront:
            # Linkerd's proxies offer no ALPN, which grpcio's own TLS refuses).
            self._issue_own()
            backend = server.add_insecure_port("127.0.0.1:0")
            front = TlsFront(self._tls_context, ("127.0.0.1", backend), "identity",
                             accept_plaintext=self.cfg.accept_plaintext)
            self.front = front
        else:
            self.grpc_port = server.add_insecure_port(bind)
        admin = await asyncio.start_server(self._admin, *self.cfg.admin_addr, limit=16 * 1024)
        self.admin_port = admin.sockets[0].getsockname()[1]
        front_port = await start_serving(server, front, host, port, admin.close)
        if front_port is not None:
            self.grpc_port = front_port
        self.serving.set()
        cur = self.issuer.current
        log.info(
            "identity service on %s:%d%s (admin %s:%d), issuing *.%s.%s with %s",
            host,
            self.grpc_port,
            (f" (TLS as {self.own_identity.dns_name}{', plaintext too' if self.cfg.accept_plaintext else ''})"
             if self.cfg.tls else ""),
            self.cfg.admin_addr[0],
            self.admin_port,
            self.cfg.control_plane_ns,
            self.cfg.trust_domain,
            cur.issuer.certificate.subject.rfc4514_string(),
        )
        stop = stop or asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tg:
                reload_task = tg.create_task(self._reload_loop())
                await stop.wait()
                reload_task.cancel()
        finally:
            self.serving.clear()
            if front is not None:
                await front.close()
            admin.close()
            with contextlib.suppress(Exception):
                await server.stop(grace=2.0)
