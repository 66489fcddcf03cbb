"""Proxies reach the control plane over TLS, as Linkerd's do: the identity service over TLS (verified
against the trust anchors and by its name before the token is sent), the destination and policy
services over mutual TLS (the proxy's own certificate; the service's, for linkerd-destination, got
from the identity service with the service's own token).

Real processes: the identity controller with --tls, the destination controller with --identity-addrs,
two proxies, a backend; openssl and grpcio as the outside clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tether.api.gen import destination_pb2, destination_pb2_grpc
from tether.control.owncert import OwnCertConfig, OwnCertificate
from tether.control.tlsfront import load_cert_chain
from tether.core.identity.certs import certificates_pem
from tether.core.identity.names import WorkloadIdentity
from tether.platform.local.tokens import ensure_control_token
from tether.platform.local.workloads import WorkloadPort
from tether.testing.backend import BackendServer, start_in_thread
from tether.testing.mesh import LocalMesh, web_with_header_route
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

AUTHORITY = "web.default.svc.cluster.local:80"
DESTINATION_ID = "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local"
IDENTITY_ID = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"


class ControlPlane:
    """An identity service over TLS, a destination service over mutual TLS, a web workload behind its proxy."""

    def __init__(self, work: Path, accept_plaintext: bool = False) -> None:
        self.work = work
        self.mesh = LocalMesh(work)
        self.app: BackendServer | None = None
        self.mesh.create_ca()
        # --accept-plaintext: what a Kubernetes install runs while an upgrade replaces the previous
        # release's proxies (plaintext control-plane clients).
        self.plaintext_flags = ["--accept-plaintext"] if accept_plaintext else []
        self.mesh.start_identity(1, "--tls", *self.plaintext_flags)
        self.app = start_in_thread("web")
        self.web_inbound = free_port()
        self.web, self.client = self.mesh.workload("web"), self.mesh.workload("client")
        reg = self.mesh.registry
        reg.update(replace(reg.get("default", "web"), labels={"app": "web"}, addresses=("127.0.0.1",),
                           ports=(WorkloadPort(self.web_inbound),)))
        self.resources = work / "resources"
        self.resources.mkdir()
        (self.resources / "web.yaml").write_text(web_with_header_route(self.web_inbound))
        self.token = ensure_control_token(self.mesh.state, "linkerd-destination")
        self.port, self.plain_port, self.admin = free_port(), free_port(), free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.destination = self.start_destination(self.token, self.port, self.plain_port, self.admin)
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.admin}/ready")[0] == 200, 30,
                 what="destination service ready")

    def start_destination(self, token: Path, port: int, plain_port: int, admin: int) -> Proc:
        p = Proc([sys.executable, "-m", "tether", "controller", "destination",
                  "--addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
                  "--plaintext-addr", f"127.0.0.1:{plain_port}",
                  "--identity-addrs", ",".join(self.mesh.identity_addrs), "--identity-token-path", str(token),
                  "--identity-trust-anchors-file", str(self.mesh.anchors),
                  "--resources-dir", str(self.resources), "--state-dir", str(self.mesh.state),
                  *self.plaintext_flags],
                 self.work / f"destination-{port}.log")
        self.mesh.procs.append(p)
        return p

    def proxy(self, w: object, destination_svc_name: str = DESTINATION_ID, **flags: object) -> ProxyProc:
        return self.mesh.proxy(w, identity_svc_name=IDENTITY_ID, destination_svc_name=destination_svc_name,  # type: ignore[arg-type]
                               policy_svc_name=DESTINATION_ID, **flags)

    def metrics(self) -> tuple[str, str]:
        """The identity and destination services' metrics."""
        return (http_get(self.mesh.identity_admin_urls[0] + "/metrics")[1].decode(),
                http_get(f"http://127.0.0.1:{self.admin}/metrics")[1].decode())

    def close(self) -> None:
        self.mesh.close()
        if self.app is not None:
            self.app.shutdown()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    c = ControlPlane(tmp_path)
    try:
        yield c
    finally:
        c.close()


def _get_first(addr: str, secure: bool = False) -> destination_pb2.Update:
    with grpc.insecure_channel(addr) as ch:
        call = destination_pb2_grpc.DestinationStub(ch).Get(
            destination_pb2.GetDestination(scheme="k8s", path=AUTHORITY, context_token='{"ns":"default"}'),
            timeout=5)
        first: destination_pb2.Update = next(iter(call))
        call.cancel()
        return first


def _peer_certificate(addr: str, name: str) -> str:
    host, port = addr.rsplit(":", 1)
    r = subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", name, "-alpn", "h2",
                        "-showcerts"], input="", capture_output=True, text=True, timeout=30)
    cert = r.stdout[r.stdout.index("-----BEGIN CERTIFICATE-----"):r.stdout.index("-----END CERTIFICATE-----") + 25]
    out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=cert,
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


def test_proxies_resolve_route_and_authorize_over_mutual_tls_to_the_control_plane(cp: ControlPlane) -> None:
    web = cp.proxy(cp.web, inbound_port=cp.web_inbound, policy_addrs=cp.addr,
                   inbound_app_addr=f"127.0.0.1:{cp.app.server_address[1]}")  # type: ignore[union-attr]
    client = cp.proxy(cp.client, destination_addrs=cp.addr, policy_addrs=cp.addr,
                      destination_context='{"ns":"default"}')

    def answer() -> tuple[int, bytes]:
        return http_get(client.outbound + "/headers", headers={"Host": AUTHORITY})

    # Endpoints and the route's filter came from the destination service, over mutual TLS.
    wait_for(lambda: answer()[0] == 200, 30, what="web through the client proxy")
    assert json.loads(answer()[1]).get("x-route") == "web-headers"
    policies = [ln for ln in web.metrics().splitlines() if ln.startswith("tether_inbound_policy{")]
    assert any(ln.endswith(" 1") for ln in policies), policies
    # The destination service presents linkerd-destination's certificate, issued by the identity service.
    assert f"DNS:{DESTINATION_ID}" in _peer_certificate(cp.addr, DESTINATION_ID)
    assert f"DNS:{IDENTITY_ID}" in _peer_certificate(cp.mesh.identity_addrs[0], IDENTITY_ID)
    # Its TLS address refuses plaintext gRPC; the loopback plaintext address answers (for operators).
    with pytest.raises(grpc.RpcError) as e:
        _get_first(cp.addr)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    first = _get_first(f"127.0.0.1:{cp.plain_port}")
    assert first.WhichOneof("update") == "add"
    identity_metrics, destination_metrics = cp.metrics()
    assert 'destination_connections_refused_total{reason="plaintext"} 1' in destination_metrics
    assert 'destination_connections_total{tls="false"} 0' in destination_metrics
    assert 'identity_connections_total{tls="false"} 0' in identity_metrics


@pytest.fixture
def upgrading(tmp_path: Path) -> Iterator[ControlPlane]:
    c = ControlPlane(tmp_path, accept_plaintext=True)
    try:
        yield c
    finally:
        c.close()


def test_accept_plaintext_serves_old_plaintext_proxies_beside_tls_ones(upgrading: ControlPlane) -> None:
    cp = upgrading
    cp.proxy(cp.web, inbound_port=cp.web_inbound, policy_addrs=cp.addr,
                   inbound_app_addr=f"127.0.0.1:{cp.app.server_address[1]}")  # type: ignore[union-attr]
    # A proxy as the previous release runs it: no service names, so plaintext to identity and destination
    # on the same addresses the TLS clients use.
    old = cp.mesh.proxy(cp.client, destination_addrs=cp.addr, destination_context='{"ns":"default"}')

    def answer() -> tuple[int, bytes]:
        return http_get(old.outbound + "/headers", headers={"Host": AUTHORITY})

    wait_for(lambda: answer()[0] == 200, 30, what="web through the plaintext client's proxy")
    assert json.loads(answer()[1]).get("x-route") == "web-headers"
    # Both kinds were served on the one address, and the TLS ones still see the service's own certificate.
    identity_metrics, destination_metrics = cp.metrics()
    for text, prefix in ((identity_metrics, "identity"), (destination_metrics, "destination")):
        counts = {tls: int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  for tls in ("true", "false") if line.startswith(f'{prefix}_connections_total{{tls="{tls}"}}')}
        assert counts["true"] >= 1 and counts["false"] >= 1, (prefix, counts)
    assert f"DNS:{DESTINATION_ID}" in _peer_certificate(cp.addr, DESTINATION_ID)
    assert f"DNS:{IDENTITY_ID}" in _peer_certificate(cp.mesh.identity_addrs[0], IDENTITY_ID)
    # TLS clients are still held to mutual TLS: no client certificate, no answer.
    anon = ssl.create_default_context(cafile=str(cp.mesh.anchors))
    assert _h2_answer(cp.addr, anon, DESTINATION_ID) == b""


def _h2_answer(addr: str, ctx: ssl.SSLContext, name: str) -> bytes:
    """The first bytes a TLS server sends back after the HTTP/2 preface and an empty SETTINGS frame."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        try:
            return conn.recv(1024)
        except (ssl.SSLError, ConnectionResetError):
            return b""


def test_clients_that_offer_no_alpn_are_served_as_linkerds_proxy_is(cp: ControlPlane) -> None:
    # Linkerd's proxy offers no ALPN on its control-plane connections (grpcio's own TLS would close
    # them). A workload certificate from the identity service, got by the same client the destination
    # service uses for its own.
    own = OwnCertificate(OwnCertConfig(WorkloadIdentity("client", "default", "linkerd", "cluster.local"),
                                       tuple(cp.mesh.identity_addrs), IDENTITY_ID, str(cp.client.token_path),
                                       str(cp.mesh.anchors)))
    chain = asyncio.run(own.certify_once())
    for alpn in ([], ["h2"]):
        anon = ssl.create_default_context(cafile=str(cp.mesh.anchors))
        mutual = ssl.create_default_context(cafile=str(cp.mesh.anchors))
        load_cert_chain(mutual, certificates_pem(chain), own.key_pem)
        if alpn:
            for ctx in (anon, mutual):
                ctx.set_alpn_protocols(alpn)
        # A SETTINGS frame (type 4) answers: the gRPC server behind the TLS is talking HTTP/2.
        assert _h2_answer(cp.mesh.identity_addrs[0], anon, IDENTITY_ID)[3:4] == b"\x04", alpn
        assert _h2_answer(cp.addr, mutual, DESTINATION_ID)[3:4] == b"\x04", alpn
        assert _h2_answer(cp.addr, anon, DESTINATION_ID) == b"", alpn  # and no certificate, no answer


def test_a_destination_service_with_another_name_is_not_trusted(cp: ControlPlane) -> None:
    wrong = "linkerd-destination.other.serviceaccount.identity.linkerd.cluster.local"
    client = cp.proxy(cp.client, destination_svc_name=wrong, destination_addrs=cp.addr,
                      destination_context='{"ns":"default"}')
    # The proxy never takes answers from a service that cannot prove the expected name: the authority
    # is forwarded as addressed, and no endpoint of the service is ever used.
    status, _ = http_get(client.outbound + "/headers", headers={"Host": AUTHORITY})
    assert status in (502, 503, 504), status
    wait_for(lambda: "hostname mismatch" in client.log().lower() or "certificate verify failed" in client.log().lower(),
             30, what="the proxy's log naming the refused certificate")


def test_a_destination_service_whose_token_is_refused_never_serves(cp: ControlPlane) -> None:
    forged = cp.work / "forged.token"
    forged.write_text("tether-control.linkerd-destination.not-the-secret\n")
    port, plain, admin = free_port(), free_port(), free_port()
    p = cp.start_destination(forged, port, plain, admin)
    wait_for(lambda: "does not match control-plane service account linkerd-destination" in p.log(), 30,
             what="the destination service's log naming the refused token")
    assert http_get(f"http://127.0.0.1:{admin}/ready")[0] != 200
    with pytest.raises(grpc.RpcError):
        _get_first(f"127.0.0.1:{plain}")


def test_destination_tls_flags_are_checked(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "tether", "controller", "destination", "--identity-addrs",
                        "127.0.0.1:1", "--resources-dir", str(tmp_path), "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--identity-addrs is set but --identity-token-path and --identity-trust-anchors-file are not" in r.stderr
    assert "Traceback" not in r.stderr
    for service, needs in (("destination", "--identity-addrs"), ("identity", "--tls")):
        r = subprocess.run([sys.executable, "-m", "tether", "controller", service, "--accept-plaintext",
                            "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"--accept-plaintext needs {needs}" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "tether", "proxy", "--destination-addrs", "127.0.0.1:1",
                        "--destination-svc-name", "linkerd-destination.linkerd.serviceaccount.identity.linkerd."
                        "cluster.local"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--destination-svc-name is set but --identity-name is not" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_an_identity_service_whose_tls_address_is_taken_says_so_in_one_line(tmp_path: Path) -> None:
    """Its address taken (by another process, or a port picked free a moment before): one line naming
    the cause, exit 1; no traceback of the server it had started (it used to print an exception group
    and a collector's complaint)."""
    mesh = LocalMesh(tmp_path)
    mesh.create_ca()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "tether", "controller", "identity", "--tls",
                            "--addr", f"127.0.0.1:{port}", "--admin-addr", "127.0.0.1:0",
                            "--issuer-dir", str(mesh.ca_dir), "--state-dir", str(mesh.state)],
                           capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if " INFO " not in ln]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith("tether controller identity: cannot serve: ") and "Address already in use" in errors[0]
    assert str(port) in errors[0]
