"""Identity on Kubernetes: `tether controller identity --platform kubernetes` against the real API server.

A projected token minted by the API server (TokenRequest, audience identity.l5d.io) gets a
certificate naming its service account; a token for another audience, or one whose service account
was deleted, is refused; rotating the issuer Secret changes the issuer without a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tether.api.gen import identity_pb2, identity_pb2_grpc
from tether.core.identity.csr import build_csr, generate_key
from tether.core.identity.names import WorkloadIdentity
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeplatform import TRUST_DOMAIN, Issuers, KubeIdentityProc, apply, token_for
from tether.testing.procs import Proc

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]



@pytest.fixture
def namespaces(kube_cluster: KubeCluster) -> Iterator[tuple[str, str]]:
    with kube_cluster.namespaces("idcp", "idapp") as (cp, app):
        yield cp, app


def certify(addr: str, ident: WorkloadIdentity, token: bytes) -> list[x509.Certificate]:
    csr = build_csr(generate_key(), ident)
    with grpc.insecure_channel(addr) as ch:
        rsp = identity_pb2_grpc.IdentityStub(ch).Certify(
            identity_pb2.CertifyRequest(identity=ident.dns_name, token=token, certificate_signing_request=csr),
            timeout=15,
        )
    return [x509.load_der_x509_certificate(d) for d in (rsp.leaf_certificate, *rsp.intermediate_certificates)]


def refused(addr: str, ident: WorkloadIdentity, token: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        certify(addr, ident, token)
    return info.value


def test_projected_token_gets_its_identity_and_bad_tokens_are_refused(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    cp, app = namespaces
    ca = Issuers(cp)
    cert, key = ca.issuer()
    apply(kube_cluster, ca.roots(), ca.secret(cert, key))
    apply(kube_cluster, {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "web", "namespace": app}})
    svc = KubeIdentityProc(tmp_path, kube_cluster, cp)
    procs.append(svc)
    svc.wait_ready()

    web = WorkloadIdentity("web", app, cp, TRUST_DOMAIN)
    token = token_for(kube_cluster, app, "web")
    chain = certify(svc.addr, web, token)
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"web.{app}.serviceaccount.identity.{cp}.cluster.local"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://cluster.local/ns/{app}/sa/web"]
    assert leaf.issuer == cert.subject
    leaf.verify_directly_issued_by(cert)

    # Another service account's identity with web's token: refused, naming whose token it is.
    other = refused(svc.addr, WorkloadIdentity("db", app, cp, TRUST_DOMAIN), token)
    assert other.code() == grpc.StatusCode.PERMISSION_DENIED and f"{app}/web" in (other.details() or "")
    # A token minted for another audience: TokenReview refuses it.
    wrong = refused(svc.addr, web, token_for(kube_cluster, app, "web", audience="https://kubernetes.default.svc"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "identity.l5d.io" in (wrong.details() or "")
    # The service account deleted: its tokens no longer review as valid (once the API server's own
    # token cache, about ten seconds, has let go of it).
    kube_cluster.kubectl("delete", "-n", app, "serviceaccount", "web")

    def refused_now() -> grpc.RpcError | None:
        try:
            certify(svc.addr, web, token)
        except grpc.RpcError as e:
            return e
        return None

    gone = wait_until(refused_now, timeout=45, what="the deleted service account's token refused", interval=1.0)
    assert gone.code() == grpc.StatusCode.UNAUTHENTICATED
    assert 'identity_certify_total{result="unauthenticated"} 2' in svc.metrics()


def test_rotated_issuer_secret_is_used_without_restart(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    cp, app = namespaces
    ca = Issuers(cp)
    first, first_key = ca.issuer()
    # linkerd.io/tls first (crt.pem, key.pem), anchors from the ConfigMap.
    apply(kube_cluster, ca.roots(), ca.secret(first, first_key, "linkerd.io/tls"))
    svc = KubeIdentityProc(tmp_path, kube_cluster, cp)
    procs.append(svc)
    svc.wait_ready()
    pid = svc.pid
    web = WorkloadIdentity("default", app, cp, TRUST_DOMAIN)
    assert certify(svc.addr, web, token_for(kube_cluster, app, "default"))[0].issuer == first.subject

    # cert-manager renews the issuer: a new key and certificate in a kubernetes.io/tls Secret.
    second, second_key = ca.issuer()
    kube_cluster.kubectl("delete", "-n", cp, "secret", "linkerd-identity-issuer")
    apply(kube_cluster, ca.secret(second, second_key))

    def signed_by_second() -> bool:
        leaf = certify(svc.addr, web, token_for(kube_cluster, app, "default"))[0]
        return leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
            second.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    wait_until(signed_by_second, timeout=30, what="a certificate from the rotated issuer")
    assert svc.pid == pid and svc.popen.poll() is None
    assert 'identity_issuer_reloads_total{result="ok"}' in svc.metrics()

    # A broken Secret (a key that is not the certificate's): refused, the last good issuer stays.
    def errors() -> int:
        for line in svc.metrics().splitlines():
            if line.startswith('identity_issuer_reloads_total{result="error"}'):
                return int(line.split()[-1])
        return 0

    before = errors()  # the delete above was refused once already (no Secret for a moment)
    apply(kube_cluster, ca.secret(second, first_key))
    wait_until(lambda: errors() == before + 1, timeout=30, what="the broken Secret refused")
    leaf = certify(svc.addr, web, token_for(kube_cluster, app, "default"))[0]
    leaf.verify_directly_issued_by(second)
    assert "does not match" in svc.log() or "not loaded" in svc.log()


def test_missing_issuer_secret_is_a_one_line_start_error(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], tmp_path: Path
) -> None:
    cp, _ = namespaces
    p = KubeIdentityProc(tmp_path, kube_cluster, cp)
    code = p.wait(30)
    assert code != 0
    err = p.log().strip().splitlines()[-1]
    assert f"Secret {cp}/linkerd-identity-issuer not found" in err and "Traceback" not in p.log()
