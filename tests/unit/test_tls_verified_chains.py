"""Full mesh handshakes made cheaper with OpenSSL 3.0 (tlsctl, the C helper ``_tlsverify``): peer
chains remembered as verified per context, and OpenSSL's built-in EC key code. Each test does real
TLS 1.3 handshakes between the proxy's own contexts (over memory BIOs) and checks the verdicts a
peer would notice: accepted, or refused with OpenSSL's reason."""

from __future__ import annotations

import datetime as dt
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from test_proxy_identity import CA, DB, WEB, make

from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import IssuerCredentials
from tether.core.identity.certview import CertView, parse_der
from tether.core.identity.csr import validate_csr
from tether.core.identity.issuance import MIN_USEFUL_LIFETIME, IssuancePolicy, issue_leaf
from tether.proxy import tlsctl
from tether.proxy.identity import IdentityClient, _loopback_handshake

PEM = serialization.Encoding.PEM


def pair(tmp_path: Path, ca: CA | None = None, **kw: object) -> tuple[IdentityClient, IdentityClient, CA]:
    ca = ca or CA(tmp_path)
    web, db = make(tmp_path, ca, WEB, **kw), make(tmp_path, ca, DB, **kw)
    for c in (web, db):
        c.install(c._verify(ca.answer(c), "ca"))
    return web, db, ca


def stats(ctx: ssl.SSLContext) -> dict[str, int]:
    cache = getattr(ctx, "_tether_verified_chains", None)
    assert cache is not None, "no verified-chain cache on this context"
    result: dict[str, int] = cache.stats()
    return result


def handshake(server: IdentityClient, client: IdentityClient, name: str) -> str | None:
    return _loopback_handshake(server.server_ssl_context(), client.client_ssl_context(), name)


def test_the_helper_is_built_and_bound() -> None:
    from tether import native

    assert native.state == "compiled", f"the C helper is built with the compiled modules: {native.state}"
    assert tlsctl._verify_helper() is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    first = tlsctl.cache_verified_chains(ctx, 4)
    assert first is not None and first.stats()["capacity"] == 4
    assert tlsctl.cache_verified_chains(ctx, 8) is first  # one per context, never replaced


def test_a_peer_met_again_is_answered_from_the_cache_and_its_name_still_checked(tmp_path: Path) -> None:
    web, db, _ = pair(tmp_path)
    assert handshake(db, web, DB) is None
    assert handshake(db, web, DB) is None
    client, server = stats(web.client_ssl_context()), stats(db.server_ssl_context())
    # Each end verified the other's chain once and answered the second handshake from its cache.
    assert (client["misses"], client["hits"], client["entries"]) == (1, 1, 1)
    assert (server["misses"], server["hits"], server["entries"]) == (1, 1, 1)
    # The same chain, cached, presented for another identity than the one asked for: refused as
    # OpenSSL refuses it, by the full verification.
    problem = handshake(db, web, WEB)
    assert problem is not None and "Hostname mismatch" in problem
    assert stats(web.client_ssl_context())["hits"] == 1


def test_a_chain_from_an_issuer_the_anchors_do_not_know_is_refused_after_a_trusted_one(tmp_path: Path) -> None:
    web, db, _ = pair(tmp_path)
    assert handshake(db, web, DB) is None and handshake(db, web, DB) is None
    # The same name and key, certified by a stranger: other bytes, never the cached verdict.
    stranger = CA(tmp_path, "stranger")
    db.install(_unchecked(db, stranger))
    problem = handshake(db, web, DB)
    assert problem is not None and "unable to get local issuer certificate" in problem
    assert stats(web.client_ssl_context())["hits"] == 1  # the trusted chain's second handshake only


def _unchecked(c: IdentityClient, ca: CA) -> list[CertView]:
    """A chain from ``ca`` for ``c``, to install without the client's own checks (a misissued peer)."""
    answer = ca.answer(c)
    return _chain(answer.leaf_certificate, answer.intermediate_certificates)


def _chain(leaf: bytes, intermediates: list[bytes]) -> list[CertView]:
    return [parse_der(d, "test certificate") for d in [leaf, *intermediates]]


def test_a_cached_chain_past_its_not_after_is_verified_again_and_refused(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    anchor, key = create_anchor("root", now - dt.timedelta(hours=1))
    issuer, ikey = create_issuer("identity", anchor, key, now - dt.timedelta(hours=1))
    ca = CA(tmp_path)
    ca.anchor, ca.creds = anchor, IssuerCredentials(issuer, ikey)
    ca.path.write_bytes(anchor.public_bytes(PEM))
    web, db = make(tmp_path, ca, WEB), make(tmp_path, ca, DB)
    web.install(web._verify(ca.answer(web), "ca"))
    # db's leaf ends two seconds from now (issued as if it were MIN_USEFUL_LIFETIME ago).
    issued_at = dt.datetime.now(dt.UTC) - MIN_USEFUL_LIFETIME + dt.timedelta(seconds=2)
    leaf = issue_leaf(ca.creds, validate_csr(db.csr_der, db.identity), db.identity, issued_at,
                      policy=IssuancePolicy(MIN_USEFUL_LIFETIME))
    db.install(_chain(leaf.leaf_der, list(leaf.intermediates_der)))
    not_after = db.chain[0].not_valid_after_utc.timestamp() if db.chain else 0.0
    assert handshake(db, web, DB) is None
    assert handshake(db, web, DB) is None and stats(web.client_ssl_context())["hits"] == 1
    while time.time() < not_after + 1:  # the certificate's own end, not a synchronisation
        time.sleep(0.2)
    problem = handshake(db, web, DB)
    assert problem is not None and "certificate has expired" in problem
    assert stats(web.client_ssl_context())["hits"] == 1


def test_a_context_never_uses_another_contexts_verdicts(tmp_path: Path) -> None:
    """A context trusting other anchors refuses a chain another context has cached (one cache per
    SSL_CTX: a rotation of anchors starts empty)."""
    web, db, _ = pair(tmp_path)
    assert handshake(db, web, DB) is None
    stranger = CA(tmp_path, "stranger")
    other = make(tmp_path, stranger, WEB)
    other.install(other._verify(stranger.answer(other), "ca"))
    problem = _loopback_handshake(db.server_ssl_context(), other.client_ssl_context(), DB)
    assert problem is not None and "unable to get local issuer certificate" in problem
    assert stats(other.client_ssl_context())["hits"] == 0


def test_entries_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    web = make(tmp_path, ca, WEB, verified_chain_cache_entries=2)
    web.install(web._verify(ca.answer(web), "ca"))
    peers = [make(tmp_path, ca, f"p{i}.shop.serviceaccount.identity.linkerd.cluster.local") for i in range(3)]
    for p in peers:
        p.install(p._verify(ca.answer(p), "ca"))
    for p in (peers[0], peers[1], peers[0], peers[2]):  # p1 is the least recently used when p2 comes
        assert handshake(p, web, p.identity.dns_name) is None
    assert stats(web.client_ssl_context()) == {"entries": 2, "capacity": 2, "hits": 1, "misses": 3, "stored": 3}
    assert handshake(peers[0], web, peers[0].identity.dns_name) is None  # still held
    assert handshake(peers[1], web, peers[1].identity.dns_name) is None  # was dropped: verified again
    assert stats(web.client_ssl_context())["hits"] == 2 and stats(web.client_ssl_context())["misses"] == 4


def test_off_when_configured_or_where_tlsctl_cannot_reach_openssl(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    web, db, _ = pair(tmp_path, verified_chain_cache_entries=0)
    assert getattr(web.client_ssl_context(), "_tether_verified_chains", None) is None
    assert handshake(db, web, DB) is None
    monkeypatch.setattr(tlsctl, "_lib", None)
    assert tlsctl.cache_verified_chains(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), 8) is None
    with pytest.raises(ValueError, match="verified_chain_cache_entries"):
        make(tmp_path, CA(tmp_path, "x"), WEB, verified_chain_cache_entries=-1)


# -- OpenSSL's built-in EC key code (process-wide: each case runs in its own interpreter) ----------

LEGACY_EC_SCRIPT = r"""
import datetime as dt, json, ssl, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_proxy_identity import CA, DB, WEB, make
from test_tls_verified_chains import _chain, _unchecked, handshake
from tether.proxy import tlsctl
from tether.proxy.identity import _loopback_handshake
tmp = Path(sys.argv[1])
out = {"legacy_ec": tlsctl.legacy_ec_keys() if sys.argv[3] == "on" else False}
ca = CA(tmp)
web, db = make(tmp, ca, WEB, verified_chain_cache_entries=0), make(tmp, ca, DB, verified_chain_cache_entries=0)
for c in (web, db):
    c.install(c._verify(ca.answer(c), "ca"))
out["mutual"] = handshake(db, web, DB)
out["wrong_name"] = handshake(db, web, WEB)
server, client = db.server_ssl_context(), web.client_ssl_context()
server.set_ecdh_curve("prime256v1")  # key exchange on P-256 (an EC key made per handshake)
out["p256_key_exchange"] = _loopback_handshake(server, client, DB)
stranger = CA(tmp, "stranger")
db.install(_unchecked(db, stranger))
out["stranger"] = handshake(db, web, DB)
# A leaf whose signature was altered (the last byte of the DER is the signature's).
db.install(_unchecked(db, ca))
leaf = db.chain[0]
der = bytearray(leaf.der); der[-1] ^= 0x01
db.install(_chain(bytes(der), [c.der for c in db.chain[1:]]))
out["bad_signature"] = handshake(db, web, DB)
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["on", "off"])
def test_with_the_built_in_ec_code_every_verdict_stays_the_same(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "legacy_ec.py"
    script.write_text(LEGACY_EC_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), tests_dir, mode], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["legacy_ec"] is (mode == "on" and ssl.OPENSSL_VERSION_INFO[:2] == (3, 0))
    assert out["mutual"] is None and out["p256_key_exchange"] is None
    assert "Hostname mismatch" in out["wrong_name"]
    assert "unable to get local issuer certificate" in out["stranger"]
    assert "certificate signature failure" in out["bad_signature"]


def test_ec_engine_is_installed_once_and_only_with_openssl_3_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsctl, "_legacy_ec", None)
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_INFO", (3, 2, 0, 1, 0))
    assert tlsctl.legacy_ec_keys() is False
    assert tlsctl._legacy_ec is False  # decided once
    monkeypatch.setattr(ssl, "OPENSSL_VERSION_INFO", (3, 0, 0, 19, 0))
    assert tlsctl.legacy_ec_keys() is False



def test_checks_are_counted_by_direction_across_a_rotation(tmp_path: Path) -> None:
    web, db, ca = pair(tmp_path)
    for _ in range(2):
        assert handshake(db, web, DB) is None
    web.count_handshake("outbound", False)
    before = web._handshake_lines()
    assert 'tls_peer_chain_checks_total{direction="outbound",cached="false"} 1\n' in before
    assert 'tls_peer_chain_checks_total{direction="outbound",cached="true"} 1\n' in before
    web.install(web._verify(ca.answer(web), "ca"))  # a renewal: new contexts, empty caches
    assert handshake(db, web, DB) is None
    after = web._handshake_lines()  # the old contexts' counts are kept
    assert 'tls_peer_chain_checks_total{direction="outbound",cached="false"} 2\n' in after
    assert 'tls_peer_chain_checks_total{direction="outbound",cached="true"} 1\n' in after
    assert 'tls_peer_chain_checks_total{direction="inbound",cached="false"} 0\n' in after


def _pair_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str,
                    alpn: bytes | None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    if alpn is not None:
        assert tlsctl.offer_alpn(client, alpn)
    done = {id(client): False, id(server): False}
    for _ in range(16):
        for obj in (client, server):
            if not done[id(obj)]:
                try:
                    obj.do_handshake()
                    done[id(obj)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert all(done.values())
    return client, server


def test_a_connection_that_sends_a_transport_header_agrees_on_its_alpn_first(tmp_path: Path) -> None:
    """Linkerd's inbound reads a transport header only on a connection that agreed on
    transport.l5d.io/v1: the proxy's server contexts accept it, and a client offers it on the
    connections it starts with a header (transport_header.ALPN), not on the others."""
    from tether.core import transport_header

    web, db, _ = pair(tmp_path)
    client, server = _pair_handshake(db.server_ssl_context(), web.client_ssl_context(), DB, transport_header.ALPN)
    assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == "transport.l5d.io/v1"
    plain_client, plain_server = _pair_handshake(db.server_ssl_context(), web.client_ssl_context(), DB, None)
    assert plain_client.selected_alpn_protocol() is None and plain_server.selected_alpn_protocol() is None
