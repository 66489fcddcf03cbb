"""The proxy identity client without a network: renewal timing, backoff, what it accepts from the
identity service, trust bundle reloads, and the contexts it builds (a loopback handshake)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import IssuerCredentials, certificates_pem
from tether.core.identity.csr import validate_csr
from tether.core.identity.issuance import IssuancePolicy, issue_leaf
from tether.core.identity.names import parse_identity_name
from tether.proxy.identity import (
    CertifyFailed,
    IdentityClient,
    IdentityClientConfig,
    IdentityNotReady,
    peer_identity,
)

PEM = serialization.Encoding.PEM
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
DB = "db.shop.serviceaccount.identity.linkerd.cluster.local"


class CA:
    def __init__(self, d: Path, name: str = "root") -> None:
        now = dt.datetime.now(dt.UTC)
        self.anchor, key = create_anchor(name, now)
        cert, ikey = create_issuer("identity", self.anchor, key, now)
        self.creds = IssuerCredentials(cert, ikey)
        self.path = d / f"{name}.pem"
        self.path.write_bytes(self.anchor.public_bytes(PEM))

    def answer(self, c: IdentityClient, identity: str | None = None, **kw: object) -> SimpleNamespace:
        """What the identity service would return to ``c`` (for ``identity``, default its own)."""
        ident = parse_identity_name(identity) if identity else c.identity
        # The client's own CSR (for its own name); the leaf names ``ident``, as a confused issuer would.
        csr = validate_csr(c.csr_der, c.identity)
        leaf = issue_leaf(self.creds, csr, ident, dt.datetime.now(dt.UTC), **kw)  # type: ignore[arg-type]
        return SimpleNamespace(leaf_certificate=leaf.leaf_der, intermediate_certificates=list(leaf.intermediates_der))


def make(tmp: Path, ca: CA, identity: str = WEB, **kw: object) -> IdentityClient:
    cfg = IdentityClientConfig(identity, str(tmp / "token"), str(ca.path), ["127.0.0.1:1"], **kw)  # type: ignore[arg-type]
    return IdentityClient(cfg, rng=random.Random(1))


def test_not_ready_until_a_certificate(tmp_path: Path) -> None:
    c = make(tmp_path, CA(tmp_path))
    assert not c.ready
    with pytest.raises(IdentityNotReady):
        c.server_ssl_context()


def test_renews_at_70_percent_of_remaining_life_with_a_floor(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    c = make(tmp_path, ca)
    leaf = c._verify(ca.answer(c), "ca")[0]
    remaining = leaf.not_valid_after_utc.timestamp() - c.clock()
    assert c.refresh_delay(leaf) == pytest.approx(0.7 * remaining, abs=1)
    short = c._verify(ca.answer(c, policy=IssuancePolicy(dt.timedelta(seconds=5))), "ca")[0]
    assert c.refresh_delay(short) == 10.0  # min_refresh


def test_backoff_is_jittered_and_capped(tmp_path: Path) -> None:
    c = make(tmp_path, CA(tmp_path), backoff_base=0.5, backoff_max=30.0)
    delays = [c.backoff_delay(n) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(15.0 <= d <= 30.0 for d in delays[7:])
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered


def test_refuses_answers_it_cannot_use(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    c = make(tmp_path, ca)
    other_key = make(tmp_path, ca)
    with pytest.raises(CertifyFailed, match="different key"):
        c._verify(ca.answer(other_key), "ca")
    with pytest.raises(CertifyFailed, match=r"not web\.shop"):
        c._verify(ca.answer(c, DB), "ca")
    stranger = CA(tmp_path, "stranger")
    with pytest.raises(CertifyFailed, match="is not signed by any trust anchor"):
        c._verify(stranger.answer(c), "ca")
    with pytest.raises(CertifyFailed, match="unparseable"):
        c._verify(SimpleNamespace(leaf_certificate=b"junk", intermediate_certificates=[]), "ca")


def test_bundle_reload_keeps_the_old_bundle_on_garbage(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    c = make(tmp_path, ca)
    c.install(c._verify(ca.answer(c), "ca"))
    gen = c.generation
    ca.path.write_bytes(b"garbage")
    assert not c.check_bundle() and len(c.bundle.anchors) == 1 and c.generation == gen
    other = CA(tmp_path, "second")
    ca.path.write_bytes(certificates_pem([ca.anchor, other.anchor]))
    assert c.check_bundle() and len(c.bundle.anchors) == 2 and c.generation == gen + 1


def test_contexts_do_mutual_tls_13_and_report_the_peer(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    alpn = ("transport.l5d.io/v1", "h2")
    web, db = make(tmp_path, ca, WEB, alpn_protocols=alpn), make(tmp_path, ca, DB, alpn_protocols=alpn)
    for c in (web, db):
        c.install(c._verify(ca.answer(c), "ca"))

    async def scenario() -> tuple[str | None, str | None, str | None]:
        seen: list[str | None] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            seen.append(peer_identity(w.get_extra_info("ssl_object")))
            w.write(b"ok")
            await w.drain()
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=db.listener_ssl_context())
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=web.client_ssl_context(), server_hostname=DB)
        assert await r.readexactly(2) == b"ok"
        sslobj = w.get_extra_info("ssl_object")
        version = f"{sslobj.version()} {sslobj.selected_alpn_protocol()}"
        # No session ticket (TLS 1.3 sends them after the handshake, before "ok"): nobody resumes,
        # and each ticket costs the server a copy of the session through DER.
        assert sslobj.session is not None and not sslobj.session.has_ticket
        w.close()
        srv.close()
        return seen[0], peer_identity(sslobj), version

    server_saw, client_saw, version = asyncio.run(scenario())
    assert (server_saw, client_saw, version) == (WEB, DB, "TLSv1.3 transport.l5d.io/v1")
    assert web.client_ssl_context().minimum_version == ssl.TLSVersion.TLSv1_3


def test_key_is_written_only_when_configured(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    make(tmp_path, ca)
    assert not list(tmp_path.glob("*.key"))
    make(tmp_path, ca, key_path=str(tmp_path / "proxy.key"))
    assert (tmp_path / "proxy.key").stat().st_mode & 0o777 == 0o600
