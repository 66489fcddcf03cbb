"""The Kubernetes store follows the real API server: what kubectl changes, the store's view shows.

Each test uses its own namespace on the session's cluster. The store runs on its own event loop
(tether.testing.kubeplatform.RunningStore); every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tether.core.resources.core import Service, Workload
from tether.platform.kubernetes.client import KubeClient
from tether.platform.kubernetes.informer import InformerSettings
from tether.platform.kubernetes.store import CUSTOM_KINDS, KubeStore
from tether.runtime.watch import Change, Snapshot
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeplatform import RunningStore, apply_crds, crd_manifest, kubectl_apply

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

IMAGE = "registry.invalid/tether/test:1.0"  # kwok never pulls it


@pytest.fixture(scope="module")
def cluster(kube_cluster: KubeCluster) -> KubeCluster:
    apply_crds(kube_cluster)
    return kube_cluster


@pytest.fixture
def ns(cluster: KubeCluster) -> Iterator[str]:
    with cluster.namespaces("store") as (name,):
        yield name


def deployment(name: str, replicas: int, port: int = 8080) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"config.linkerd.io/opaque-ports": "9000"}},
                "spec": {
                    "serviceAccountName": "default",
                    "containers": [{
                        "name": "app", "image": IMAGE,
                        "ports": [{"name": "http", "containerPort": port}],
                        "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                    }],
                },
            },
        },
    }


def service(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": "http"}]},
    }


def profile(ns: str, svc: str, regex: str = "/books/[0-9]+") -> dict[str, Any]:
    return {
        "apiVersion": "linkerd.io/v1alpha2",
        "kind": "ServiceProfile",
        "metadata": {"name": f"{svc}.{ns}.svc.cluster.local"},
        "spec": {"routes": [{"name": "GET /books/{id}", "condition": {"method": "GET", "pathRegex": regex}}]},
    }


def ready_workloads(store: KubeStore, ns: str, app: str) -> list[Workload]:
    out = []
    for w in store.list("Workload", ns):
        assert isinstance(w, Workload)
        if w.metadata.labels.get("app") == app and w.spec.ready and w.spec.addresses:
            out.append(w)
    return out


def test_store_follows_services_pods_and_crds(cluster: KubeCluster, ns: str) -> None:
    with RunningStore(str(cluster.kubeconfig)) as store:
        assert store.get("Namespace", "", ns) is not None
        kubectl_apply(cluster, ns, service("web"), deployment("web", 2))
        svc = wait_until(lambda: store.get("Service", ns, "web"), timeout=30, what="Service web in the store")
        assert isinstance(svc, Service)
        assert svc.spec.selector == {"app": "web"} and svc.spec.ports[0].target_port == "http"
        assert svc.spec.cluster_ip  # allocated by the API server
        # Pods: kwok runs them, the EndpointSlice controller lists them ready: two ready workloads.
        ws = wait_until(lambda: (ready_workloads(store, ns, "web") or None)
                        if len(ready_workloads(store, ns, "web")) == 2 else None,
                        timeout=90, what="two ready workloads")
        w = ws[0]
        assert w.spec.service_account == "default"
        assert [(p.name, p.port) for p in w.spec.ports] == [("http", 8080)]
        assert [(p.port, p.path) for p in w.spec.probes] == [("http", "/ready")]
        assert w.metadata.annotations["config.linkerd.io/opaque-ports"] == "9000"
        pod = cluster.api.get(f"/api/v1/namespaces/{ns}/pods/{w.name}")
        assert w.spec.addresses == [pod["status"]["podIP"]]

        # Scale down: the store loses a workload.
        cluster.kubectl("scale", "-n", ns, "deployment/web", "--replicas=1")
        wait_until(lambda: len([x for x in store.list("Workload", ns) if x.metadata.labels.get("app") == "web"]) == 1,
                   timeout=60, what="one workload after scaling down")

        # A CRD object: created, updated, deleted.
        kubectl_apply(cluster, ns, profile(ns, "web"))
        name = f"web.{ns}.svc.cluster.local"
        sp = wait_until(lambda: store.get("ServiceProfile", ns, name), timeout=30, what="the ServiceProfile")
        assert sp.spec.routes[0].condition.path_regex == "/books/[0-9]+"  # type: ignore[attr-defined]
        kubectl_apply(cluster, ns, profile(ns, "web", "/authors/[0-9]+"))
        wait_until(lambda: (s := store.get("ServiceProfile", ns, name)) is not None
                   and s.spec.routes[0].condition.path_regex == "/authors/[0-9]+",  # type: ignore[attr-defined]
                   timeout=30, what="the ServiceProfile's update")

        # Routes of both groups, a Server, an authorization.
        kubectl_apply(
            cluster, ns,
            {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "gw-route"},
             "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": "core", "port": 80}],
                      "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}},
            {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "HTTPRoute", "metadata": {"name": "l5d-route"},
             "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": "core", "port": 80}],
                      "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}},
            {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "metadata": {"name": "web-http"},
             "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": "http"}},
            {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "MeshTLSAuthentication",
             "metadata": {"name": "any-mesh"}, "spec": {"identities": ["*"]}},
        )
        wait_until(lambda: {r.name for r in store.list("HTTPRoute", ns)} == {"gw-route", "l5d-route"},
                   timeout=30, what="both HTTPRoutes")
        wait_until(lambda: store.get("Server", ns, "web-http"), timeout=30, what="the Server")
        wait_until(lambda: store.get("MeshTLSAuthentication", ns, "any-mesh"), timeout=30, what="the authentication")

        cluster.kubectl("delete", "-n", ns, f"serviceprofile/{name}", "httproutes.gateway.networking.k8s.io/gw-route",
                        "service/web")
        wait_until(lambda: store.get("ServiceProfile", ns, name) is None and store.get("Service", ns, "web") is None
                   and {r.name for r in store.list("HTTPRoute", ns)} == {"l5d-route"},
                   timeout=30, what="the deletions")
        assert not store.source_errors()


def test_invalid_object_is_refused_and_its_last_good_version_kept(cluster: KubeCluster, ns: str) -> None:
    with RunningStore(str(cluster.kubeconfig)) as store:
        name = f"web.{ns}.svc.cluster.local"
        kubectl_apply(cluster, ns, profile(ns, "web"))
        wait_until(lambda: store.get("ServiceProfile", ns, name), timeout=30, what="the ServiceProfile")
        kubectl_apply(cluster, ns, profile(ns, "web", "/books/(["))
        errors = wait_until(lambda: [e for e in store.source_errors() if name in e.source] or None,
                            timeout=30, what="the refusal")
        assert "spec.routes[0].condition.pathRegex: invalid regular expression" in errors[0].errors[0]
        kept = store.get("ServiceProfile", ns, name)
        assert kept is not None and kept.spec.routes[0].condition.path_regex == "/books/[0-9]+"  # type: ignore[attr-defined]
        kubectl_apply(cluster, ns, profile(ns, "web", "/ok"))
        wait_until(lambda: not [e for e in store.source_errors() if name in e.source], timeout=30,
                   what="the refusal cleared")


def test_dropped_watch_resumes_and_410_gone_relists(cluster: KubeCluster, ns: str) -> None:
    # Short server-side watch timeouts: the server ends watches often, sending bookmarks.
    running = RunningStore(str(cluster.kubeconfig), settings=InformerSettings(watch_timeout=3))
    store = running.start()
    try:
        inf = store.informers["serviceprofiles.linkerd.io"]
        kubectl_apply(cluster, ns, profile(ns, "a"))
        wait_until(lambda: store.get("ServiceProfile", ns, f"a.{ns}.svc.cluster.local"), timeout=30, what="a")
        lists = inf.stats.lists

        # A dropped connection: the watch resumes from its version, without listing again.
        running.call(inf.disconnect)
        kubectl_apply(cluster, ns, profile(ns, "b"))
        wait_until(lambda: store.get("ServiceProfile", ns, f"b.{ns}.svc.cluster.local"), timeout=30, what="b")
        assert inf.stats.lists == lists and inf.stats.relists_gone == 0

        # The server ends each watch after 3 s; the informer resumes, and bookmarks keep its version fresh.
        watches = inf.stats.watches
        wait_until(lambda: inf.stats.watches >= watches + 2 and inf.stats.bookmarks >= 1, timeout=30,
                   what="watches renewed after the server's timeout, with bookmarks")
        assert inf.stats.lists == lists
    finally:
        running.stop()
    # A store that listed, then lost the server for long: while nothing watches, "a" is deleted and "c"
    # created, and the store resumes from a version the server no longer has (as after a compaction):
    # 410 Gone, a re-list, and subscribers get exactly the differences as events.
    asyncio.run(_relist_after_gone(cluster, ns))


async def _relist_after_gone(cluster: KubeCluster, ns: str) -> None:
    a, b, c = (f"{x}.{ns}.svc.cluster.local" for x in "abc")
    async with KubeClient.connect(str(cluster.kubeconfig)) as client:
        store = KubeStore(client)
        await store.sync()
        sub = store.watch("ServiceProfile")
        snap = await sub.next()
        assert isinstance(snap, Snapshot) and {a, b} <= {k[1] for k in snap.state}
        await asyncio.to_thread(cluster.kubectl, "delete", "-n", ns, "serviceprofile", a)
        await asyncio.to_thread(kubectl_apply, cluster, ns, profile(ns, "c"))
        inf = store.informers["serviceprofiles.linkerd.io"]
        inf.version = "1"
        stop = asyncio.Event()
        running = asyncio.create_task(store.run(stop))
        seen: list[tuple[str, str]] = []
        try:
            async with asyncio.timeout(30):
                while not {("DELETED", a), ("ADDED", c)} <= set(seen):
                    update = await sub.next()
                    assert isinstance(update, Change)
                    seen.append((update.change.type, update.change.resource.name))
        finally:
            stop.set()
            await running
        assert inf.stats.relists_gone == 1
        assert [e for e in seen if e[1] in (a, b, c)] == [("DELETED", a), ("ADDED", c)]
        assert {r.name for r in store.list("ServiceProfile", ns)} == {b, c}


def test_missing_crd_is_reported_then_followed_once_installed(cluster: KubeCluster, ns: str) -> None:
    egress = next(ck for ck in CUSTOM_KINDS if ck.kind == "EgressNetwork")
    cluster.delete("crd", str(egress))
    settings = InformerSettings(backoff_initial=0.2, backoff_max=1.0)
    with RunningStore(str(cluster.kubeconfig), settings=settings) as store:
        missing = [e for e in store.source_errors() if e.source == str(egress)]
        assert missing and "is not installed" in missing[0].errors[0]
        apply_crds(cluster, [egress])
        cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=(
            '{"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "EgressNetwork", "metadata": {"name": "all"},'
            ' "spec": {"trafficPolicy": "Allow"}}'))
        wait_until(lambda: store.get("EgressNetwork", ns, "all"), timeout=30, what="the EgressNetwork")
        assert not [e for e in store.source_errors() if e.source == str(egress)]
    assert crd_manifest(egress)["metadata"]["name"] == "egressnetworks.policy.linkerd.io"
