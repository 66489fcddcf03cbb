"""The Kubernetes platform under test: minimal CRDs (until the charts' CRDs are on this branch) and a
running store.

Each CRD serves every version the Kubernetes store reads, with an open schema
(``x-kubernetes-preserve-unknown-fields``): the API server stores whatever it is given, so the
store's own validation (the same models as ``tether apply``) is what refuses a bad object. The
real CRDs (charts/tether-crds) carry schemas generated from the models; these do not.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from tether.platform.kubernetes.client import KubeClient
from tether.platform.kubernetes.store import CUSTOM_KINDS, CustomKind, KubeStore
from tether.testing.kubecluster import KubeCluster, wait_until

T = TypeVar("T")


def crd_manifest(ck: CustomKind) -> dict[str, Any]:
    """One CRD: every version served, the first stored, any object accepted."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{ck.plural}.{ck.group}",
            # Groups under k8s.io are protected: the Gateway API's own CRDs carry this approval.
            **({"annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}}
               if ck.group.endswith(".k8s.io") else {}),
        },
        "spec": {
            "group": ck.group,
            "scope": "Namespaced",
            "names": {"plural": ck.plural, "singular": ck.kind.lower(), "kind": ck.kind,
                      "listKind": f"{ck.kind}List"},
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": i == 0,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }
                for i, v in enumerate(ck.versions)
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd_manifest(ck) for ck in CUSTOM_KINDS]


def apply_crds(cluster: KubeCluster, kinds: Sequence[CustomKind] = CUSTOM_KINDS) -> None:
    """Create (or update) the CRDs and wait until the API server serves each of them."""
    docs = [crd_manifest(ck) for ck in kinds]
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    for ck in kinds:
        path = ck.at(ck.versions[0]).path()

        def served(p: str = path) -> bool:
            return cluster.api.exists(p)

        wait_until(served, timeout=60, what=f"CRD {ck} served")


def kubectl_apply(cluster: KubeCluster, namespace: str, *docs: Mapping[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


class RunningStore:
    """A KubeStore following a cluster on its own event loop in a thread, for synchronous tests.

    The store's states are immutable mappings replaced on each change, so reading ``store.list`` or
    ``store.get`` from the test's thread is safe; anything else goes through :meth:`call`.
    """

    def __init__(self, kubeconfig: str, **store_args: Any) -> None:
        self.kubeconfig = kubeconfig
        self.store_args = store_args
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="kube-store", daemon=True)
        self.store: KubeStore | None = None

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with KubeClient.connect(self.kubeconfig) as client:
                self.store = KubeStore(client, **self.store_args)
                await self.store.sync()
                self._ready.set()
                await self.store.run(self._stop)

        try:
            asyncio.run(run())
        except BaseException as e:  # reported to the test by start()/stop()
            self._error = e
            self._ready.set()

    def start(self, timeout: float = 60.0) -> KubeStore:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the Kubernetes store did not sync within {timeout}s")
        if self._error is not None:
            raise self._error
        assert self.store is not None
        return self.store

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the store's loop and return its result."""
        assert self._loop is not None

        async def wrapped() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the Kubernetes store did not stop")
        if self._error is not None:
            raise self._error

    def __enter__(self) -> KubeStore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
