"""Kubernetes objects as the mesh's models (pure conversion), and the informer's list/watch protocol
against a scripted API server (the real one is in tests/kube)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import pytest

from tether.control.destination.translate import Settings, identity_of
from tether.core.resources import LoadError
from tether.core.resources.core import Service
from tether.platform.kubernetes import convert
from tether.platform.kubernetes.client import ApiResource, KubeError
from tether.platform.kubernetes.informer import Backoff, Informer, InformerSettings


def pod(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}, "resourceVersion": "77",
                     "annotations": {"config.linkerd.io/opaque-ports": "4000"}, "managedFields": [{}]},
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{"name": "linkerd-init", "image": "x"}],
            "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9000,
                                                                                    "protocol": "UDP"}],
                 "readinessProbe": {"httpGet": {"port": "http", "path": "ready"}},
                 "livenessProbe": {"tcpSocket": {"port": 8080}}},
                {"name": "linkerd-proxy", "ports": [{"name": "linkerd-admin", "containerPort": 4191}]},
            ],
        },
        "status": {"phase": "Running", "podIP": "10.244.0.5",
                   "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00::5"}],
                   "conditions": [{"type": "Ready", "status": "True"}], **status},
    }


def test_pod_becomes_a_workload_with_what_the_mesh_reads() -> None:
    w = convert.pod_workload(pod(), ready=True)
    assert w.key == ("shop", "web-1")
    assert w.spec.service_account == "web"
    assert w.spec.addresses == ["10.244.0.5", "fd00::5"]
    assert [(p.name, p.port, p.protocol) for p in w.spec.ports] == [
        ("http", 8080, "TCP"), (None, 9000, "UDP"), ("linkerd-admin", 4191, "TCP")]
    assert [(p.port, p.path) for p in w.spec.probes] == [("http", "/ready")]  # tcpSocket probes are not HTTP
    assert w.metadata.annotations == {"config.linkerd.io/opaque-ports": "4000"}
    assert w.metadata.resource_version is None  # a status-only change must not look like a change
    assert w.spec.meshed  # it has the linkerd-proxy container
    settings = Settings(control_plane_ns="linkerd", trust_domain="cluster.local")
    assert identity_of(w, settings) == "web.shop.serviceaccount.identity.linkerd.cluster.local"
    plain = pod()
    plain["spec"]["containers"] = plain["spec"]["containers"][:1]
    unmeshed = convert.pod_workload(plain, ready=True)
    assert not unmeshed.spec.meshed and identity_of(unmeshed, settings) is None  # clients skip mTLS
    assert convert.pod_gone(pod(phase="Succeeded")) and not convert.pod_gone(pod())


def test_endpoint_slice_lists_pods_with_readiness() -> None:
    s = convert.endpoint_slice({
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "a"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "b"}},
            {"addresses": ["10.0.0.3"], "targetRef": {"kind": "Pod", "name": "c", "namespace": "shop"}},
            {"addresses": ["192.0.2.1"], "conditions": {"ready": True}},  # hand-made, no pod
        ],
    })
    assert s.service == "web"
    assert s.pods == {("shop", "a"): True, ("shop", "b"): False, ("shop", "c"): True}


def test_service_keeps_what_the_model_knows() -> None:
    svc = convert.service({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "managedFields": [{}]},
        "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "trafficDistribution": "PreferClose", "internalTrafficPolicy": "Cluster",
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
        "status": {"loadBalancer": {}},
    })
    assert isinstance(svc, Service)
    assert svc.spec.cluster_ip == "10.96.0.10" and svc.spec.ports[0].target == "http"
    with pytest.raises(convert.ConversionError, match=r"^Service shop/bad: "):
        convert.service({"metadata": {"name": "bad", "namespace": "shop"},
                         "spec": {"ports": [{"port": 70000}]}})


def test_custom_resource_is_decoded_strictly_like_apply() -> None:
    doc = {
        "apiVersion": "linkerd.io/v1alpha2", "kind": "ServiceProfile",
        "metadata": {"name": "web.shop.svc.cluster.local", "namespace": "shop", "generation": 3,
                     "managedFields": [{"manager": "kubectl"}], "resourceVersion": "5"},
        "spec": {"routes": [{"name": "r", "condition": {"method": "GET", "pathRegex": "/a("}}]},
    }
    errors = convert.custom(doc, "kubernetes serviceprofiles.linkerd.io")
    assert isinstance(errors, list) and isinstance(errors[0], LoadError)
    assert str(errors[0]).startswith(
        "kubernetes serviceprofiles.linkerd.io: spec.routes[0].condition.pathRegex: invalid regular expression")
    doc["spec"]["routes"][0]["condition"]["pathRegex"] = "/a"  # type: ignore[index]
    ok = convert.custom(doc, "k")
    assert not isinstance(ok, list) and ok.resource.key == ("shop", "web.shop.svc.cluster.local")


# -- the informer against a scripted server ---------------------------------------------------------------


class ScriptedClient:
    """Answers lists from ``lists`` and watches from ``watches`` (each a list of events or an exception)."""

    def __init__(self, lists: list[Any], watches: list[Any]) -> None:
        self.lists = lists
        self.watches = watches
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def get(self, path: str, **params: str) -> Any:
        self.requests.append(("list", dict(params)))
        item = self.lists.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def lines(self, path: str, params: Mapping[str, str]) -> AsyncIterator[bytes]:
        self.requests.append(("watch", dict(params)))
        if not self.watches:
            await asyncio.Event().wait()  # a quiet watch
        item = self.watches.pop(0)
        if isinstance(item, Exception):
            raise item
        for ev in item:
            yield json.dumps(ev).encode()


class Recorder:
    def __init__(self, until: tuple[str, Any]) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.until = until
        self.done = asyncio.Event()

    def replace(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.calls.append(("replace", sorted(i["metadata"]["name"] for i in items)))
        if self.calls[-1] == self.until:
            self.done.set()

    def event(self, type_: str, obj: Mapping[str, Any]) -> None:
        self.calls.append((type_, obj["metadata"]["name"]))


def obj(name: str, rv: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}


def test_informer_lists_pages_watches_resumes_and_relists_on_gone() -> None:
    client = ScriptedClient(
        lists=[
            {"metadata": {"continue": "tok"}, "items": [obj("a", "3")]},
            {"metadata": {"resourceVersion": "5"}, "items": [obj("b", "4")]},
            KubeError("GET: HTTP 500", 500),
            {"metadata": {"resourceVersion": "20"}, "items": [obj("b", "4"), obj("c", "19")]},
        ],
        watches=[
            [{"type": "ADDED", "object": obj("c", "6")}, {"type": "BOOKMARK", "object": obj("", "9")}],
            [{"type": "DELETED", "object": obj("a", "10")}],
            KubeError("watch: connection reset"),
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}],
        ],
    )
    rec = Recorder(until=("replace", ["b", "c"]))
    settings = InformerSettings(page_size=1, backoff_initial=0.001, backoff_max=0.002)
    inf = Informer(client, ApiResource("", "v1", "pods", "Pod"), rec, settings=settings)  # type: ignore[arg-type]

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(inf.run(stop))
        async with asyncio.timeout(5):
            await rec.done.wait()
        stop.set()
        await task

    asyncio.run(run())
    assert rec.calls == [("replace", ["a", "b"]), ("ADDED", "c"), ("DELETED", "a"), ("replace", ["b", "c"])]
    lists = [p for kind, p in client.requests if kind == "list"]
    watches = [p for kind, p in client.requests if kind == "watch"]
    assert lists[0] == {"limit": "1"} and lists[1] == {"limit": "1", "continue": "tok"}
    assert [w.get("resourceVersion") for w in watches[:4]] == ["5", "9", "10", "10"]
    assert all(w["allowWatchBookmarks"] == "true" and w["watch"] == "true" for w in watches)
    assert inf.stats.relists_gone == 1 and inf.stats.bookmarks == 1 and inf.stats.errors == 2
    assert watches[-1].get("resourceVersion") == "20"  # after the re-list, from the list's version


def test_backoff_grows_to_its_bound_with_jitter_and_resets() -> None:
    b = Backoff(0.2, 30.0, rng=lambda: 1.0)
    assert [b.next() for _ in range(10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    low = Backoff(0.2, 30.0, rng=lambda: 0.0)
    assert low.next() == 0.1
    b.reset()
    assert b.next() == 0.2


# -- the store's merging of sources (handlers fed directly; no server) ---------------------------------


def _store() -> Any:
    from tether.platform.kubernetes.store import KubeStore

    return KubeStore(client=None)  # type: ignore[arg-type]  # handlers only: nothing is requested


def test_pod_readiness_follows_its_endpoint_slices() -> None:
    store = _store()
    pods = store.informers["pods"].handler
    slices = store.informers["endpointslices.discovery.k8s.io"].handler
    sub = store.watch("Workload")
    assert sub.poll() is not None  # the (empty) snapshot; changes after it come as events
    pods.replace([pod()])
    w = store.get("Workload", "shop", "web-1")
    assert w is not None and not w.spec.ready  # no slice lists it yet: an endpoint of nothing
    slice_obj = {"metadata": {"name": "web-x", "namespace": "shop"},
                 "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True},
                                "targetRef": {"kind": "Pod", "name": "web-1"}}]}
    slices.event("ADDED", slice_obj)
    assert store.get("Workload", "shop", "web-1").spec.ready
    slices.event("DELETED", slice_obj)
    assert not store.get("Workload", "shop", "web-1").spec.ready
    pods.event("DELETED", pod())
    assert store.get("Workload", "shop", "web-1") is None
    types = []
    while (u := sub.poll()) is not None:
        types.append(getattr(getattr(u, "change", None), "type", "snapshot"))
    assert types == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]


def test_httproute_from_both_groups_policy_wins_and_the_clash_is_reported() -> None:
    store = _store()
    policy = store.informers.get("httproutes.policy.linkerd.io")
    assert policy is None  # custom informers are made once their CRD is found; feed the handlers directly
    from tether.platform.kubernetes.store import CUSTOM_KINDS

    def handler(group: str) -> Any:
        ck = next(c for c in CUSTOM_KINDS if c.plural == "httproutes" and c.group == group)
        return store._custom_informer(ck, ck.versions[0]).handler

    l5d, gw = handler("policy.linkerd.io"), handler("gateway.networking.k8s.io")

    def route(api: str) -> dict[str, Any]:
        return {"apiVersion": api, "kind": "HTTPRoute", "metadata": {"name": "r", "namespace": "shop"},
                "spec": {"parentRefs": [{"name": "web", "kind": "Service", "group": "core", "port": 80}],
                         "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}

    gw.event("ADDED", route("gateway.networking.k8s.io/v1"))
    assert store.get("HTTPRoute", "shop", "r").api_version == "gateway.networking.k8s.io/v1"
    l5d.event("ADDED", route("policy.linkerd.io/v1beta3"))
    assert store.get("HTTPRoute", "shop", "r").api_version == "policy.linkerd.io/v1beta3"
    [clash] = store.source_errors()
    assert "exists in httproutes.policy.linkerd.io and httproutes.gateway.networking.k8s.io" in clash.errors[0]
    l5d.event("DELETED", route("policy.linkerd.io/v1beta3"))
    assert store.get("HTTPRoute", "shop", "r").api_version == "gateway.networking.k8s.io/v1"
    assert not store.source_errors()
