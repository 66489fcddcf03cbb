"""The control plane as host processes against the real API server (envtest style), three replicas each.

Three identity and three destination replicas run with ``--platform kubernetes``. A Deployment's
pods (run by kwok, made Ready, listed by the real EndpointSlice controller) are what
``Destination.Get`` serves for their Service, on every replica, and a scale-up reaches the stream; a
real ``tether proxy`` gets its certificate through TokenReview and its endpoints from the replicas,
and keeps working when one replica of each is killed. Inbound policy (WatchPort) follows Server,
MeshTLSAuthentication and AuthorizationPolicy objects on the pods.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeplatform import (
    EndpointWatch,
    Issuers,
    KubeDestinationProc,
    KubeIdentityProc,
    apply,
    apply_crds,
    kubectl_apply,
    pod_addresses,
    token_for,
)
from tether.testing.procs import Proc, ProxyProc, http_get

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

IMAGE = "registry.invalid/tether/test:1.0"


def web(replicas: int) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                  "template": {"metadata": {"labels": {"app": "web"}},
                               "spec": {"containers": [{"name": "app", "image": IMAGE,
                                                        "ports": [{"name": "http", "containerPort": 8080}]}]}}}},
    ]


def ready_pods(cluster: KubeCluster, ns: str, count: int) -> frozenset[str]:
    def check() -> frozenset[str] | None:
        found = pod_addresses(cluster, ns, "web", 8080)
        return found if len(found) == count else None

    return wait_until(check, timeout=90, what=f"{count} Ready web pods")


@pytest.fixture
def namespaces(kube_cluster: KubeCluster) -> Iterator[tuple[str, str]]:
    apply_crds(kube_cluster)
    with kube_cluster.namespaces("cp", "app") as (cp, app):
        yield cp, app


def test_three_replicas_serve_endpoint_slices_and_certify_a_real_proxy(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    cp, app = namespaces
    ca = Issuers(cp)
    cert, key = ca.issuer()
    apply(kube_cluster, ca.roots(), ca.secret(cert, key))
    kubectl_apply(kube_cluster, app, *web(2))

    identities = [KubeIdentityProc(tmp_path, kube_cluster, cp) for _ in range(3)]
    destinations = [KubeDestinationProc(tmp_path, kube_cluster, cp) for _ in range(3)]
    procs.extend([*identities, *destinations])
    for i in identities:
        i.wait_ready()
    for d in destinations:
        d.wait_ready()

    authority = f"web.{app}.svc.cluster.local:80"
    pods = ready_pods(kube_cluster, app, 2)
    # Every replica serves the pods the EndpointSlice controller listed.
    watches = [EndpointWatch(d.addr, authority, json.dumps({"ns": app})) for d in destinations]
    try:
        for w in watches:
            wait_until(lambda w=w: w.current() == pods, timeout=30, what="the replica's endpoints")  # type: ignore[misc]
        slices = kube_cluster.api.get(f"/apis/discovery.k8s.io/v1/namespaces/{app}/endpointslices",
                                      labelSelector="kubernetes.io/service-name=web")["items"]
        listed = {f"{a}:8080" for s in slices for ep in s.get("endpoints") or [] for a in ep["addresses"]}
        assert listed == set(pods)

        # A scale-up reaches every stream.
        kube_cluster.kubectl("scale", "-n", app, "deployment/web", "--replicas=3")
        three = ready_pods(kube_cluster, app, 3)
        for w in watches:
            wait_until(lambda w=w: w.current() == three, timeout=30, what="the scaled endpoints")  # type: ignore[misc]
    finally:
        for w in watches:
            w.close()

    # A real proxy, as a pod's sidecar would run: a projected token, the replicas' addresses.
    token = tmp_path / "token"
    token.write_bytes(token_for(kube_cluster, app, "default"))
    anchors = tmp_path / "ca-bundle.crt"
    anchors.write_text(ca.roots()["data"]["ca-bundle.crt"])
    proxy = ProxyProc(
        tmp_path, "proxy",
        identity_name=f"default.{app}.serviceaccount.identity.{cp}.cluster.local",
        identity_token_path=str(token), identity_trust_anchors=str(anchors),
        identity_addrs=",".join(i.addr for i in identities),
        destination_addrs=",".join(d.addr for d in destinations),
        destination_context=json.dumps({"ns": app}),
    )
    procs.append(proxy)
    proxy.wait_ready(timeout=30)
    metrics = proxy.metrics()
    assert "identity_cert_expiration_timestamp_seconds" in metrics
    issued = sum(int(line.split()[-1]) for i in identities for line in i.metrics().splitlines()
                 if line.startswith('identity_certify_total{result="ok"}'))
    assert issued >= 1

    # One replica of each killed: the others answer (the proxy fails over; a new Get is served).
    identities[0].signal(signal.SIGKILL)
    destinations[0].signal(signal.SIGKILL)
    w = EndpointWatch(destinations[1].addr, authority, json.dumps({"ns": app}))
    try:
        wait_until(lambda: w.current() == three, timeout=30, what="endpoints from a surviving replica")
    finally:
        w.close()
    assert http_get(f"{proxy.admin}/ready")[0] == 200


class PortWatch:
    """An InboundServerPolicies.WatchPort stream followed in a thread: the last Server message."""

    def __init__(self, addr: str, workload: str, port: int) -> None:
        import threading

        import grpc

        from tether.api.gen import inbound_pb2, inbound_pb2_grpc

        self.last: Any = None
        self._channel = grpc.insecure_channel(addr)
        self._stream = inbound_pb2_grpc.InboundServerPoliciesStub(self._channel).WatchPort(
            inbound_pb2.PortSpec(workload=workload, port=port))
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for msg in self._stream:
                self.last = msg
        except Exception:  # cancelled by close()
            return

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(5)


def test_inbound_policy_follows_server_crds_on_pods(
    kube_cluster: KubeCluster, namespaces: tuple[str, str], tmp_path: Path, procs: list[Proc]
) -> None:
    cp, app = namespaces
    kubectl_apply(kube_cluster, app, *web(1))
    dest = KubeDestinationProc(tmp_path, kube_cluster, cp)
    procs.append(dest)
    dest.wait_ready()
    ready_pods(kube_cluster, app, 1)
    pods = kube_cluster.api.get(f"/api/v1/namespaces/{app}/pods", labelSelector="app=web")["items"]
    name = pods[0]["metadata"]["name"]
    watch = PortWatch(dest.addr, json.dumps({"ns": app, "pod": name}), 8080)
    try:
        wait_until(lambda: watch.last is not None and watch.last.labels["kind"] == "default", timeout=30,
                   what="the default policy before any Server")
        kubectl_apply(
            kube_cluster, app,
            {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "metadata": {"name": "web-http"},
             "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": "http", "proxyProtocol": "HTTP/1"}},
            {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "MeshTLSAuthentication",
             "metadata": {"name": "clients"}, "spec": {"identities": [f"client.{app}.serviceaccount.identity.*"]}},
            {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "AuthorizationPolicy", "metadata": {"name": "web"},
             "spec": {"targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "web-http"},
                      "requiredAuthenticationRefs": [{"group": "policy.linkerd.io", "kind": "MeshTLSAuthentication",
                                                      "name": "clients"}]}},
        )
        wait_until(lambda: watch.last.labels.get("name") == "web-http"
                   and watch.last.protocol.WhichOneof("kind") == "http1"
                   and [a.labels["name"] for a in watch.last.authorizations] == ["web"],
                   timeout=30, what="the Server, its protocol and its authorization on the stream")
        kube_cluster.kubectl("delete", "-n", app, "server/web-http")
        wait_until(lambda: watch.last.labels["kind"] == "default", timeout=30,
                   what="the default policy again after the Server's deletion")
    finally:
        watch.close()
