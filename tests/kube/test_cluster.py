"""The local control plane is a real Kubernetes: controllers, scheduler, webhooks, tokens and helm work.

Each test uses its own namespace on the session's cluster and asserts what a user of the cluster
would see: pods Running with IPs on kwok nodes, EndpointSlices that follow the pods, a webhook's
patch on created pods, TokenReview verdicts on projected tokens, and a helm release in kubectl.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tether.testing.kubecluster import CertificateAuthority, KubeAPIError, KubeCluster, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

CHARTS = Path(__file__).parent / "charts"
IMAGE = "registry.invalid/tether/test:1.0"  # never pulled: kwok only pretends to run containers


def _deployment(name: str, replicas: int, *, spread: bool = False) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "containers": [{"name": "app", "image": IMAGE, "ports": [{"name": "http", "containerPort": 8080}]}]
    }
    if spread:
        # One pod per node: the scheduler has to use all three kwok nodes.
        pod_spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": {"app": name}}, "topologyKey": "kubernetes.io/hostname"}
                ]
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def _running_pods(cluster: KubeCluster, namespace: str, app: str, count: int) -> list[dict[str, Any]] | None:
    pods = cluster.api.get(f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"app={app}")["items"]
    running = [
        pod
        for pod in pods
        if pod["status"].get("phase") == "Running"
        and pod["status"].get("podIP")
        and "deletionTimestamp" not in pod["metadata"]
    ]
    return running if len(running) == count else None


def test_three_kwok_nodes_are_ready_on_the_pinned_version(kube_cluster: KubeCluster) -> None:
    version = kube_cluster.api.get("/version")
    assert version["gitVersion"] == kube_cluster.versions["KUBERNETES_VERSION"]
    nodes = json.loads(kube_cluster.kubectl("get", "nodes", "-o", "json"))["items"]
    assert (
        sorted(n["metadata"]["name"] for n in nodes)
        == kube_cluster.node_names
        == [
            "kwok-node-0",
            "kwok-node-1",
            "kwok-node-2",
        ]
    )
    for index, node in enumerate(sorted(nodes, key=lambda n: n["metadata"]["name"])):
        conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == kube_cluster.node_internal_ip(index)


def test_deployment_pods_run_with_ips_on_fake_nodes(kube_cluster: KubeCluster) -> None:
    ns = "t-deploy"
    kube_cluster.create_namespace(ns)
    kube_cluster.api.create(f"/apis/apps/v1/namespaces/{ns}/deployments", _deployment("web", 3, spread=True))

    pods = wait_until(
        lambda: _running_pods(kube_cluster, ns, "web", 3), timeout=120, what="3 web pods Running with IPs"
    )

    nodes = {pod["spec"]["nodeName"] for pod in pods}
    assert nodes == set(kube_cluster.node_names), "anti-affinity puts one pod on each kwok node"
    for pod in pods:
        node = kube_cluster.api.get(f"/api/v1/nodes/{pod['spec']['nodeName']}")
        assert ipaddress.ip_address(pod["status"]["podIP"]) in ipaddress.ip_network(node["spec"]["podCIDR"])
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready.get("Ready") == "True"
    assert len({pod["status"]["podIP"] for pod in pods}) == 3
    deployment = wait_until(
        lambda: (
            d
            if (d := kube_cluster.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/web"))["status"].get(
                "readyReplicas"
            )
            == 3
            else None
        ),
        timeout=60,
        what="deployment web readyReplicas=3",
    )
    assert deployment["status"]["availableReplicas"] == 3
    table = kube_cluster.kubectl("get", "pods", "-n", ns, "-o", "wide")
    assert table.count("Running") == 3


def _slice_addresses(cluster: KubeCluster, namespace: str, service: str) -> set[str]:
    slices = cluster.api.get(
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
        labelSelector=f"kubernetes.io/service-name={service}",
    )["items"]
    return {
        address
        for eps in slices
        if eps["metadata"]["labels"].get("endpointslice.kubernetes.io/managed-by") == "endpointslice-controller.k8s.io"
        for endpoint in eps.get("endpoints") or []
        if endpoint.get("conditions", {}).get("ready")
        for address in endpoint["addresses"]
    }


def test_service_gets_endpointslices_that_follow_the_pods(kube_cluster: KubeCluster) -> None:
    ns = "t-service"
    kube_cluster.create_namespace(ns)
    kube_cluster.api.create(f"/apis/apps/v1/namespaces/{ns}/deployments", _deployment("api", 2))
    service = kube_cluster.api.create(
        f"/api/v1/namespaces/{ns}/services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "api"},
            "spec": {
                "selector": {"app": "api"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    )
    assert ipaddress.ip_address(service["spec"]["clusterIP"]) in ipaddress.ip_network("10.96.0.0/16")

    def slices_match(count: int) -> set[str] | None:
        pods = _running_pods(kube_cluster, ns, "api", count)
        if pods is None:
            return None
        want = {pod["status"]["podIP"] for pod in pods}
        return want if _slice_addresses(kube_cluster, ns, "api") == want else None

    first = wait_until(lambda: slices_match(2), timeout=120, what="EndpointSlice with the 2 api pod IPs")
    assert len(first) == 2

    kube_cluster.api.merge_patch(f"/apis/apps/v1/namespaces/{ns}/deployments/api", {"spec": {"replicas": 3}})
    second = wait_until(lambda: slices_match(3), timeout=120, what="EndpointSlice with the 3 api pod IPs")
    assert first < second
    slices = kube_cluster.api.get(
        f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
        labelSelector="kubernetes.io/service-name=api",
    )["items"]
    ports = {(p["name"], p["port"]) for eps in slices for p in eps.get("ports") or []}
    assert ports == {("http", 8080)}, "targetPort 'http' resolved to the container port by the controller"


# ---- mutating webhook ----------------------------------------------------------------------------


@dataclass
class _WebhookLog:
    reviews: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _review_response(review: dict[str, Any]) -> dict[str, Any]:
    request = review["request"]
    annotations = request["object"]["metadata"].get("annotations")
    patch: list[dict[str, Any]]
    if annotations:
        patch = [{"op": "add", "path": "/metadata/annotations/tether.test~1mutated", "value": "true"}]
    else:
        patch = [{"op": "add", "path": "/metadata/annotations", "value": {"tether.test/mutated": "true"}}]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": request["uid"],
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
        },
    }


@pytest.fixture
def webhook_server(tmp_path: Path) -> Iterator[tuple[str, bytes, _WebhookLog]]:
    """An HTTPS admission webhook on 127.0.0.1 with its own CA: yields (url, ca_pem, log of reviews)."""
    ca = CertificateAuthority(tmp_path, "webhook-ca", datetime.timedelta(hours=1))
    serving = ca.issue("webhook", "webhook.tether.test", ip_addresses=["127.0.0.1"], server=True)
    log = _WebhookLog()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with log.lock:
                log.reviews.append(review)
            body = json.dumps(_review_response(review)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(serving.cert), str(serving.key))
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="webhook", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/mutate", ca.pem, log
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": IMAGE}], **spec},
    }


def test_api_server_calls_mutating_webhook_on_pod_creation(
    kube_cluster: KubeCluster, webhook_server: tuple[str, bytes, _WebhookLog]
) -> None:
    url, ca_pem, log = webhook_server
    ns = "t-webhook"
    kube_cluster.create_namespace(ns, labels={"tether.test/webhook": "on"})
    config_path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
    kube_cluster.api.create(
        config_path,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "tether-test-mutator"},
            "webhooks": [
                {
                    "name": "mutate.tether.test",
                    "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_pem).decode()},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["pods"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"tether.test/webhook": "on"}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                }
            ],
        },
    )
    try:
        # The API server picks new webhook configurations up asynchronously: probe with dry runs.
        def dry_run_mutated() -> bool:
            pod = kube_cluster.api.request(
                "POST", f"/api/v1/namespaces/{ns}/pods", _pod("probe"), query={"dryRun": "All"}
            )
            return pod["metadata"].get("annotations", {}).get("tether.test/mutated") == "true"

        wait_until(dry_run_mutated, timeout=60, what="webhook configuration in effect")

        created = kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("mutated"))
        assert created["metadata"]["annotations"]["tether.test/mutated"] == "true"
        with log.lock:
            real = [r for r in log.reviews if not r["request"].get("dryRun")]
        assert [r["request"]["name"] for r in real] == ["mutated"]
        assert real[0]["request"]["namespace"] == ns
        assert real[0]["request"]["operation"] == "CREATE"
        stored = kube_cluster.api.get(f"/api/v1/namespaces/{ns}/pods/mutated")
        assert stored["metadata"]["annotations"]["tether.test/mutated"] == "true"

        kube_cluster.create_namespace("t-webhook-off")
        plain = kube_cluster.api.create("/api/v1/namespaces/t-webhook-off/pods", _pod("plain"))
        assert "tether.test/mutated" not in (plain["metadata"].get("annotations") or {})
    finally:
        kube_cluster.api.delete(f"{config_path}/tether-test-mutator")


# ---- TokenReview of a projected service-account token ----------------------------------------------


def _review(cluster: KubeCluster, token: str, audiences: list[str]) -> dict[str, Any]:
    review = cluster.api.create(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        },
    )
    status: dict[str, Any] = review["status"]
    return status


def test_token_review_validates_projected_service_account_token(kube_cluster: KubeCluster) -> None:
    ns = "t-token"
    kube_cluster.create_namespace(ns)
    kube_cluster.api.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "workload"}},
    )
    pod = kube_cluster.api.create(f"/api/v1/namespaces/{ns}/pods", _pod("workload", serviceAccountName="workload"))
    # What the kubelet does for a projected token volume: a TokenRequest bound to the pod.
    request = kube_cluster.api.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts/workload/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": ["tether.test/identity"],
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": "workload",
                    "uid": pod["metadata"]["uid"],
                },
            },
        },
    )
    token = request["status"]["token"]

    status = _review(kube_cluster, token, ["tether.test/identity"])
    assert status["authenticated"] is True, status
    assert status["user"]["username"] == f"system:serviceaccount:{ns}:workload"
    assert f"system:serviceaccounts:{ns}" in status["user"]["groups"]
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["workload"]
    assert status["audiences"] == ["tether.test/identity"]

    assert not _review(kube_cluster, token, ["someone-else"]).get("authenticated")
    header, payload, signature = token.split(".")
    forged = ".".join([header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")])
    assert not _review(kube_cluster, forged, ["tether.test/identity"]).get("authenticated")

    # A bound token dies with its pod.
    kube_cluster.api.request(
        "DELETE", f"/api/v1/namespaces/{ns}/pods/workload", {"kind": "DeleteOptions", "gracePeriodSeconds": 0}
    )
    wait_until(
        lambda: not _review(kube_cluster, token, ["tether.test/identity"]).get("authenticated"),
        timeout=60,
        what="token of the deleted pod to be rejected",
    )


# ---- helm ----------------------------------------------------------------------------------------


def test_helm_install_of_a_small_chart_shows_in_kubectl(kube_cluster: KubeCluster) -> None:
    ns = "t-helm"
    kube_cluster.helm(
        "install",
        "hello",
        str(CHARTS / "hello"),
        "--namespace",
        ns,
        "--create-namespace",
        "--set",
        "message=installed by the kube tier",
        "--wait",
        "--timeout",
        "150s",
        timeout=200,
    )
    releases = json.loads(kube_cluster.helm("list", "--namespace", ns, "--output", "json"))
    assert [(r["name"], r["status"]) for r in releases] == [("hello", "deployed")]

    config = json.loads(kube_cluster.kubectl("get", "configmap", "hello-config", "-n", ns, "-o", "json"))
    assert config["data"]["message"] == "installed by the kube tier"
    assert config["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    deployment = json.loads(kube_cluster.kubectl("get", "deployment", "hello", "-n", ns, "-o", "json"))
    assert deployment["status"]["readyReplicas"] == 2
    names = kube_cluster.kubectl("get", "service", "-n", ns, "-o", "name")
    assert names.split() == ["service/hello"]

    kube_cluster.helm("uninstall", "hello", "--namespace", ns, "--wait", "--timeout", "60s", timeout=90)
    with pytest.raises(KubeAPIError) as gone:
        kube_cluster.api.get(f"/api/v1/namespaces/{ns}/configmaps/hello-config")
    assert gone.value.status == 404
