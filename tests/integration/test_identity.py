"""The identity service and the proxy identity client as real processes and sockets on loopback.

Proves: issued chains pass `openssl verify`, `openssl s_client` sees the identity, refusals are clear,
step-made certificates work, the service refuses a bad issuer at start, reloads a rotated one, fails
over between replicas, rate-limits, and a CA outage past the renewal point leaves traffic flowing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.api.gen import identity_pb2, identity_pb2_grpc
from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import (
    IssuerCredentials,
    certificates_pem,
    parse_certificates,
    parse_private_key,
)
from tether.core.identity.csr import build_csr, generate_key, validate_csr
from tether.core.identity.issuance import issue_leaf
from tether.core.identity.names import parse_identity_name
from tether.platform.local.workloads import Workload, WorkloadRegistry
from tether.proxy.identity import IdentityClient, IdentityClientConfig, peer_identity
from tether.testing.procs import Proc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
DB = "db.shop.serviceaccount.identity.linkerd.cluster.local"


class IdentityProc(Proc):
    """A `tether controller identity` child process."""

    def __init__(
        self, tmp: Path, issuer_dir: Path, state: Path, name: str = "identity", port: int = 0, **flags: str
    ) -> None:
        self.port = port or free_port()
        self.admin_port = free_port()
        args = [
            sys.executable,
            "-m",
            "tether",
            "controller",
            "identity",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--admin-addr",
            f"127.0.0.1:{self.admin_port}",
            "--state-dir",
            str(state),
        ]
        if issuer_dir is not None:
            args += ["--issuer-dir", str(issuer_dir)]
        for k, v in flags.items():
            args += ["--" + k.replace("_", "-")] + ([v] if v else [])
        super().__init__(args, tmp / f"{name}-{self.port}.log")
        self.name = name

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> IdentityProc:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n{self.log()}")
            return http_get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1)[0] == 200

        wait_for(ready, timeout, what=f"{self.name} ready")
        return self

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.admin_port}/metrics")[1].decode()


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    r = subprocess.run(
        [sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(d)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture
def state(tmp_path: Path) -> Path:
    reg = WorkloadRegistry(tmp_path / "state")
    reg.register(Workload("web", "shop", "web"))
    reg.register(Workload("db", "shop", "db"))
    return tmp_path / "state"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def start(procs: list[Proc], *args: object, **kw: str) -> IdentityProc:
    p = IdentityProc(*args, **kw)  # type: ignore[arg-type]
    procs.append(p)
    return p.wait_ready()


def client(state: Path, ca: Path, identity: str, addrs: list[str], **kw: object) -> IdentityClient:
    ident = parse_identity_name(identity)
    cfg = IdentityClientConfig(
        identity=identity,
        token_path=str(WorkloadRegistry(state).token_path(ident.namespace, ident.service_account)),
        trust_anchors_path=str(ca / "ca.crt"),
        identity_addrs=addrs,
        backoff_base=0.1,
        backoff_max=0.3,
        **kw,  # type: ignore[arg-type]
    )
    return IdentityClient(cfg)


async def wait_async(cond: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll a condition on the client's plain attributes until it holds, within ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            while not cond():  # noqa: ASYNC110 - the condition is a plain attribute, not an event
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"timed out after {deadline}s waiting for {what}") from None


async def echo_server(ctx: ssl.SSLContext, seen: list[str | None]) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(w.get_extra_info("ssl_object")))
        try:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)


async def roundtrip(port: int, ctx: ssl.SSLContext, sni: str) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    w.write(b"ping")
    data = await asyncio.wait_for(r.readexactly(4), 5)
    w.close()
    return data


def certify_raw(addr: str, identity: str, token: bytes, csr: bytes) -> identity_pb2.CertifyResponse:
    with grpc.insecure_channel(addr) as ch:
        stub = identity_pb2_grpc.IdentityStub(ch)
        return stub.Certify(
            identity_pb2.CertifyRequest(identity=identity, token=token, certificate_signing_request=csr),
            timeout=10,
        )


# -- issuance, openssl -----------------------------------------------------------------------------


def test_issued_chain_verifies_with_openssl_and_s_client_sees_identity(
    tmp_path: Path, ca: Path, state: Path, procs: list[Proc]
) -> None:
    svc = start(procs, tmp_path, ca, state)
    key_path = tmp_path / "web.key"
    web = client(state, ca, WEB, [svc.addr], key_path=str(key_path))
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"

    async def scenario() -> tuple[str, int]:
        task = asyncio.create_task(web.run())
        try:
            await asyncio.wait_for(web.ready_event.wait(), 15)
            (tmp_path / "chain.pem").write_text(web.identity_json()["certificate_chain_pem"])
            chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
            (tmp_path / "leaf.pem").write_bytes(chain[0].public_bytes(PEM))
            for purpose in ("sslserver", "sslclient"):
                r = await asyncio.to_thread(
                    subprocess.run,
                    [
                        "openssl",
                        "verify",
                        "-purpose",
                        purpose,
                        "-CAfile",
                        str(ca / "ca.crt"),
                        "-untrusted",
                        str(tmp_path / "chain.pem"),
                        str(tmp_path / "leaf.pem"),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr
            seen: list[str | None] = []
            srv = await echo_server(web.server_ssl_context(), seen)
            port = srv.sockets[0].getsockname()[1]
            # s_client presents the same leaf (mTLS is required) and sends the identity as SNI.
            proc = await asyncio.create_subprocess_exec(
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                WEB,
                "-verify_hostname",
                WEB,
                "-CAfile",
                str(ca / "ca.crt"),
                "-cert",
                str(tmp_path / "leaf.pem"),
                "-key",
                str(key_path),
                "-tls1_3",
                "-verify_return_error",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(b""), 20)
            srv.close()
            return out.decode(errors="replace"), proc.returncode or 0
        finally:
            task.cancel()

    # s_client's exit status depends on how the close races its stdin EOF; the verdict is in its output.
    out, _rc = asyncio.run(scenario())
    assert f"subject=CN = {WEB}" in out, out
    assert "Verify return code: 0 (ok)" in out and "TLSv1.3" in out, out
    assert 'control_identity_cert_refreshes_total{result="ok"} 1' in web.metrics_lines()
    assert 'identity_certify_total{result="ok"} 1' in svc.metrics()
    assert "identity_cert_expiration_timestamp_seconds" in svc.metrics()


# -- refusals --------------------------------------------------------------------------------------


def test_certify_refusals_are_clear(tmp_path: Path, ca: Path, state: Path, procs: list[Proc]) -> None:
    svc = start(procs, tmp_path, ca, state)
    token = WorkloadRegistry(state).read_token("shop", "web").encode()
    web_csr = build_csr(generate_key(), parse_identity_name(WEB))
    db_csr = build_csr(generate_key(), parse_identity_name(DB))
    cases = [
        (WEB, b"tether-local.shop.web.forged", web_csr, grpc.StatusCode.UNAUTHENTICATED, "does not match"),
        (DB, token, db_csr, grpc.StatusCode.PERMISSION_DENIED, "belongs to local workload shop/web"),
        (WEB, token, db_csr, grpc.StatusCode.INVALID_ARGUMENT, "CSR asks for DNS:db.shop"),
        (
            WEB.replace("cluster.local", "evil.org"),
            token,
            web_csr,
            grpc.StatusCode.INVALID_ARGUMENT,
            "not issued here",
        ),
    ]
    for identity, tok, csr, code, text in cases:
        with pytest.raises(grpc.RpcError) as e:
            certify_raw(svc.addr, identity, tok, csr)
        assert e.value.code() == code, e.value.details()
        assert text in (e.value.details() or ""), e.value.details()
    assert certify_raw(svc.addr, WEB, token, web_csr).leaf_certificate


def test_tls_refuses_wrong_anchor_expired_leaf_and_other_identity(
    tmp_path: Path, ca: Path, state: Path, procs: list[Proc]
) -> None:
    svc = start(procs, tmp_path, ca, state)
    web = client(state, ca, WEB, [svc.addr])
    db = client(state, ca, DB, [svc.addr])
    # A server under a different CA, and one whose leaf (same CA) has expired.
    other = tmp_path / "other"
    subprocess.run(
        [sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(other)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    stranger = client(state, other, DB, [svc.addr])
    # An issuer under our anchor that was already valid two days ago, to sign a leaf that has expired.
    anchor = parse_certificates((ca / "ca.crt").read_bytes(), "ca.crt")[0]
    anchor_key = parse_private_key((ca / "ca.key").read_bytes(), "ca.key")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    issuer = IssuerCredentials(*create_issuer("old-issuer", anchor, anchor_key, past, dt.timedelta(days=365)))
    key = generate_key()
    ident = parse_identity_name(DB)
    old = issue_leaf(
        issuer,
        validate_csr(build_csr(key, ident), ident),
        ident,
        dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    expired_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / "expired.pem").write_bytes(
        certificates_pem([x509.load_der_x509_certificate(d) for d in (old.leaf_der, *old.intermediates_der)])
        + key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    expired_ctx.load_cert_chain(str(tmp_path / "expired.pem"))

    async def scenario() -> dict[str, str]:
        tasks = [asyncio.create_task(c.run()) for c in (web, db, stranger)]
        errors: dict[str, str] = {}
        try:
            await asyncio.wait_for(asyncio.gather(web.ready_event.wait(), db.ready_event.wait()), 20)
            # The stranger's bundle does not hold our anchor: it refuses to use what it was issued.
            await wait_async(lambda: stranger.metrics.refreshes_total["error"] >= 1, 15, "stranger refused")
            assert not stranger.ready
            seen: list[str | None] = []
            servers = {
                "ok": await echo_server(db.server_ssl_context(), seen),
                "expired": await echo_server(expired_ctx, seen),
            }
            ports = {k: s.sockets[0].getsockname()[1] for k, s in servers.items()}
            assert await roundtrip(ports["ok"], web.client_ssl_context(), DB) == b"ping"
            assert seen == [WEB]
            attempts = {
                "other identity": (ports["ok"], web.client_ssl_context(), WEB),
                "expired leaf": (ports["expired"], web.client_ssl_context(), DB),
            }
            # A client whose anchors are another CA's cannot verify our server.
            wrong_anchor = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            wrong_anchor.load_verify_locations(cafile=str(other / "ca.crt"))
            attempts["wrong anchor"] = (ports["ok"], wrong_anchor, DB)
            for name, (port, ctx, sni) in attempts.items():
                try:
                    await roundtrip(port, ctx, sni)
                    errors[name] = "accepted"
                except ssl.SSLCertVerificationError as e:
                    errors[name] = e.verify_message
            for s in servers.values():
                s.close()
        finally:
            for t in tasks:
                t.cancel()
        return errors

    errors = asyncio.run(scenario())
    assert "Hostname mismatch" in errors["other identity"]
    assert "certificate has expired" in errors["expired leaf"]
    assert "unable to get local issuer certificate" in errors["wrong anchor"]


def test_refuses_to_start_with_expired_or_unsigned_issuer(tmp_path: Path, state: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    anchor, anchor_key = create_anchor("root.linkerd.cluster.local", now - dt.timedelta(days=100))
    expired, expired_key = create_issuer(
        "identity.linkerd.cluster.local",
        anchor,
        anchor_key,
        now - dt.timedelta(days=100),
        dt.timedelta(days=30),
    )
    stranger, stranger_key = create_anchor("stranger", now)
    unsigned, unsigned_key = create_issuer("identity.linkerd.cluster.local", stranger, stranger_key, now)
    for name, cert, key, text in [
        ("expired", expired, expired_key, "expired at"),
        ("unsigned", unsigned, unsigned_key, "is not signed by any trust anchor"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "ca.crt").write_bytes(anchor.public_bytes(PEM))
        (d / "tls.crt").write_bytes(cert.public_bytes(PEM))
        (d / "tls.key").write_bytes(
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tether",
                "controller",
                "identity",
                "--issuer-dir",
                str(d),
                "--addr",
                f"127.0.0.1:{free_port()}",
                "--admin-addr",
                f"127.0.0.1:{free_port()}",
                "--state-dir",
                str(state),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "refusing to start" in lines[0] and text in lines[0]
        assert "CN=identity.linkerd.cluster.local" in lines[0] and "Fix:" in lines[0]


# -- step interop ----------------------------------------------------------------------------------


def step_binary() -> str | None:
    r = subprocess.run(
        [str(ROOT / "scripts/tools/build-step.sh"), "--print-path"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    path = r.stdout.strip()
    return path if path and Path(path).is_file() else None


def test_certificates_made_by_step_are_accepted(tmp_path: Path, state: Path, procs: list[Proc]) -> None:
    step = step_binary()
    if step is None:
        pytest.skip("step is not built: run scripts/tools/build-step.sh (needs Go and the module proxy)")
    d = tmp_path / "step"
    d.mkdir()
    base = [step, "certificate", "create", "--no-password", "--insecure", "--kty", "EC", "--curve", "P-256"]
    subprocess.run(
        [
            *base,
            "root.linkerd.cluster.local",
            d / "ca.crt",
            d / "ca.key",
            "--profile",
            "root-ca",
            "--not-after",
            "87600h",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        [
            *base,
            "identity.linkerd.cluster.local",
            d / "issuer.crt",
            d / "issuer.key",
            "--profile",
            "intermediate-ca",
            "--not-after",
            "8760h",
            "--ca",
            d / "ca.crt",
            "--ca-key",
            d / "ca.key",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    svc = start(
        procs,
        tmp_path,
        None,
        state,  # type: ignore[arg-type]
        identity_issuer_certificate_file=str(d / "issuer.crt"),
        identity_issuer_key_file=str(d / "issuer.key"),
        identity_trust_anchors_file=str(d / "ca.crt"),
    )
    web = client(state, d, WEB, [svc.addr])
    chain = asyncio.run(web.certify_once())
    (tmp_path / "chain.pem").write_bytes(b"".join(c.pem() for c in chain))
    (tmp_path / "leaf.pem").write_bytes(chain[0].pem())
    r = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(d / "ca.crt"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # And step itself accepts the leaf we issued under its CA.
    r = subprocess.run(
        [
            step,
            "certificate",
            "verify",
            str(tmp_path / "chain.pem"),
            "--roots",
            str(d / "ca.crt"),
            "--host",
            WEB,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# -- replicas, reload, rate limit ------------------------------------------------------------------


def test_client_fails_over_to_the_next_replica(tmp_path: Path, ca: Path, state: Path, procs: list[Proc]) -> None:
    a = start(procs, tmp_path, ca, state, name="a")
    b = start(procs, tmp_path, ca, state, name="b")
    dead = f"127.0.0.1:{free_port()}"
    web = client(state, ca, WEB, [dead, a.addr, b.addr])
    first = asyncio.run(web.certify_once())
    a.stop()
    second = asyncio.run(web.certify_once())
    assert first[0].der != second[0].der  # a new leaf, from b
    assert 'identity_certify_total{result="ok"} 1' in b.metrics()


def test_issuer_rotation_is_picked_up_without_restart(tmp_path: Path, ca: Path, state: Path, procs: list[Proc]) -> None:
    svc = start(procs, tmp_path, ca, state, reload_interval="100ms")
    web = client(state, ca, WEB, [svc.addr])
    before = asyncio.run(web.certify_once())[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "identity",
            "create-issuer",
            "--anchor-cert",
            str(ca / "ca.crt"),
            "--anchor-key",
            str(ca / "ca.key"),
            "--out",
            str(ca),
            "--force",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    new_issuer = parse_certificates((ca / "tls.crt").read_bytes(), "tls.crt")[0]
    assert new_issuer.public_bytes(DER) != before.der
    wait_for(lambda: 'identity_issuer_reloads_total{result="ok"} 1' in svc.metrics(), 10, what="issuer reload")
    after = asyncio.run(web.certify_once())[1]
    assert after.der == new_issuer.public_bytes(DER)
    # One reload: ca.crt, rewritten after the pair with the same bytes, is no change.
    assert 'identity_issuer_reloads_total{result="ok"} 1' in svc.metrics()


def test_rate_limit_returns_resource_exhausted(tmp_path: Path, ca: Path, state: Path, procs: list[Proc]) -> None:
    svc = start(procs, tmp_path, ca, state, rate="0.01", burst="2")
    token = WorkloadRegistry(state).read_token("shop", "web").encode()
    csr = build_csr(generate_key(), parse_identity_name(WEB))
    certify_raw(svc.addr, WEB, token, csr)
    certify_raw(svc.addr, WEB, token, csr)
    with pytest.raises(grpc.RpcError) as e:
        certify_raw(svc.addr, WEB, token, csr)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many Certify calls" in (e.value.details() or "")


# -- outage ----------------------------------------------------------------------------------------


def test_ca_outage_keeps_traffic_flowing_and_renewal_resumes(
    tmp_path: Path, ca: Path, state: Path, procs: list[Proc]
) -> None:
    lifetime = 16.0
    svc = start(procs, tmp_path, ca, state, issuance_lifetime=f"{lifetime}s")
    web = client(state, ca, WEB, [svc.addr], min_refresh=0.5)
    db = client(state, ca, DB, [svc.addr], min_refresh=0.5)

    async def scenario() -> None:
        tasks = [asyncio.create_task(c.run()) for c in (web, db)]
        try:
            await asyncio.wait_for(asyncio.gather(web.ready_event.wait(), db.ready_event.wait()), 20)
            first_expiry = web.metrics.cert_expiration_timestamp_seconds
            seen: list[str | None] = []
            srv = await echo_server(db.server_ssl_context(), seen)
            port = srv.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=web.client_ssl_context(), server_hostname=DB)
            await asyncio.to_thread(svc.stop)  # the CA goes away
            # Past the renew point (70% of 16 s): refreshes fail, the current certificates keep serving.
            await wait_async(lambda: web.metrics.refreshes_total["error"] >= 2, lifetime, "failed refreshes")
            assert web.ready and web.metrics.cert_expiration_timestamp_seconds == first_expiry
            w.write(b"live")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"live"  # existing connection
            assert await roundtrip(port, web.client_ssl_context(), DB) == b"ping"  # new handshake
            # The CA returns on the same address: renewal succeeds before the old certificate expires.
            back = IdentityProc(
                tmp_path, ca, state, name="identity-back", port=svc.port, issuance_lifetime=f"{lifetime}s"
            )
            procs.append(back)
            await asyncio.to_thread(back.wait_ready)
            await wait_async(lambda: web.metrics.refreshes_total["ok"] >= 2, 10, "renewal after outage")
            assert web.metrics.cert_expiration_timestamp_seconds > first_expiry
            assert await roundtrip(port, web.client_ssl_context(), DB) == b"ping"
            w.close()
            srv.close()
        finally:
            for t in tasks:
                t.cancel()

    asyncio.run(scenario())


# -- tether identity (CLI) against an admin endpoint -----------------------------------------------


def test_tether_identity_shows_the_proxy_certificate(tmp_path: Path, ca: Path, state: Path, procs: list[Proc]) -> None:
    svc = start(procs, tmp_path, ca, state)
    web = client(state, ca, WEB, [svc.addr])
    web.install(asyncio.run(web.certify_once()))
    body = json.dumps(web.identity_json()).encode()

    class Admin(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/identity.json" else 404)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    admin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=admin.serve_forever, daemon=True).start()
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tether",
                "identity",
                "--admin-addr",
                f"127.0.0.1:{admin.server_address[1]}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        admin.shutdown()
    assert r.returncode == 0, r.stderr
    assert f"Identity:  {WEB}" in r.stdout
    assert f"DNS:{WEB}, URI:spiffe://cluster.local/ns/shop/sa/web" in r.stdout
    assert "Issuer:    CN=identity.linkerd.cluster.local" in r.stdout
    assert "Time left: 23h59m" in r.stdout or "Time left: 1d" in r.stdout


def test_shutil_has_openssl() -> None:
    assert shutil.which("openssl"), "openssl is needed by the integration tier"


# -- trust-anchor rotation under load --------------------------------------------------------------


def run_cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_trust_anchor_rotation_under_load_loses_no_handshake(
    tmp_path: Path, ca: Path, state: Path, procs: list[Proc]
) -> None:
    """The documented procedure (docs/notes/issue-3.md): add the new anchor to the bundle, re-issue the
    issuer from it, let leaves rotate, remove the old anchor; mTLS between two clients never fails."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((ca / "ca.crt").read_bytes())
    svc = start(procs, tmp_path, ca, state, reload_interval="100ms", issuance_lifetime="6s")
    kw: dict[str, object] = {"min_refresh": 0.5, "bundle_poll_interval": 0.1}
    web = IdentityClient(
        IdentityClientConfig(WEB, str(WorkloadRegistry(state).token_path("shop", "web")), str(bundle), [svc.addr], **kw)
    )  # type: ignore[arg-type]
    db = IdentityClient(
        IdentityClientConfig(DB, str(WorkloadRegistry(state).token_path("shop", "db")), str(bundle), [svc.addr], **kw)
    )  # type: ignore[arg-type]
    new = tmp_path / "new"
    run_cli("identity", "create-ca", "--out", str(new))
    new_anchor = parse_certificates((new / "ca.crt").read_bytes(), "new")[0]

    def under_new_anchor(c: IdentityClient) -> bool:
        from tether.core.identity.certs import signed_by

        return c.chain is not None and signed_by(x509.load_der_x509_certificate(c.chain[-1].der), new_anchor)

    async def scenario() -> tuple[int, list[str]]:
        tasks = [asyncio.create_task(c.run()) for c in (web, db)]
        ok, failures = 0, []
        stop = asyncio.Event()
        seen: list[str | None] = []
        try:
            await asyncio.wait_for(asyncio.gather(web.ready_event.wait(), db.ready_event.wait()), 20)
            srv = await echo_server(db.listener_ssl_context(), seen)
            port = srv.sockets[0].getsockname()[1]

            async def load() -> None:
                nonlocal ok
                while not stop.is_set():
                    try:
                        assert await roundtrip(port, web.client_ssl_context(), DB) == b"ping"
                        ok += 1
                    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, AssertionError) as e:
                        failures.append(repr(e))
                    await asyncio.sleep(0.01)

            load_task = asyncio.create_task(load())
            await wait_async(lambda: ok >= 20, 10, "traffic before rotation")
            # 1. Add the new anchor to the bundle; every proxy picks it up without restart.
            await asyncio.to_thread(
                run_cli, "identity", "bundle", str(ca / "ca.crt"), str(new / "ca.crt"), "--out", str(bundle)
            )
            await wait_async(lambda: len(web.bundle.anchors) == 2 and len(db.bundle.anchors) == 2, 10, "bundle")
            # 2. Re-issue the issuer from the new anchor; the identity service reloads it.
            await asyncio.to_thread(
                run_cli,
                "identity",
                "create-issuer",
                "--anchor-cert",
                str(new / "ca.crt"),
                "--anchor-key",
                str(new / "ca.key"),
                "--trust-anchors",
                str(bundle),
                "--out",
                str(ca),
                "--force",
            )
            # 3. Leaves rotate onto the new anchor at their next renewal.
            await wait_async(lambda: under_new_anchor(web) and under_new_anchor(db), 20, "leaves rotated")
            # 4. Remove the old anchor.
            await asyncio.to_thread(run_cli, "identity", "bundle", str(new / "ca.crt"), "--out", str(bundle))
            await wait_async(lambda: len(web.bundle.anchors) == 1 and len(db.bundle.anchors) == 1, 10, "bundle")
            after = ok
            await wait_async(lambda: ok >= after + 20, 10, "traffic after rotation")
            stop.set()
            await load_task
            srv.close()
        finally:
            for t in tasks:
                t.cancel()
        return ok, failures

    ok, failures = asyncio.run(scenario())
    assert failures == [], failures[:5]
    assert ok >= 40
    assert 'identity_issuer_reloads_total{result="ok"} 1' in svc.metrics()


# -- Certify over TLS ------------------------------------------------------------------------------

OWN = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"


def test_certify_over_tls_verifies_the_identity_service(
    tmp_path: Path, ca: Path, state: Path, procs: list[Proc]
) -> None:
    svc = start(procs, tmp_path, ca, state, tls="")
    good = client(state, ca, WEB, [svc.addr], identity_server_name=OWN)
    chain = asyncio.run(good.certify_once())
    assert chain[0].subject == f"CN={WEB}"
    # The wrong expected name, and plaintext, are both refused: the token never leaves unverified.
    wrong = client(state, ca, WEB, [svc.addr], identity_server_name=DB, rpc_timeout=3.0)
    plain = client(state, ca, WEB, [svc.addr], rpc_timeout=3.0)
    from tether.proxy.identity import CertifyFailed

    for c in (wrong, plain):
        with pytest.raises(CertifyFailed, match="UNAVAILABLE"):
            asyncio.run(c.certify_once())
    # openssl verifies the service's own identity (SAN only: the name is longer than a CN may be).
    r = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            svc.addr,
            "-CAfile",
            str(ca / "ca.crt"),
            "-verify_return_error",
            "-verify_hostname",
            OWN,
            "-alpn",
            "h2",
        ],
        input="",
        capture_output=True,
        text=True,
        errors="replace",
        timeout=30,
    )
    assert "Verify return code: 0 (ok)" in r.stdout and "i:CN = identity.linkerd" in r.stdout, r.stdout
