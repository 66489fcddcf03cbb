"""The Kubernetes platform under test: minimal CRDs (until the charts' CRDs are on this branch) and a
running store.

Each CRD serves every version the Kubernetes store reads, with an open schema
(``x-kubernetes-preserve-unknown-fields``): the API server stores whatever it is given, so the
store's own validation (the same models as ``tether apply``) is what refuses a bad object. The
real CRDs (charts/tether-crds) carry schemas generated from the models; these do not.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.core.identity.authority import create_anchor, create_issuer
from tether.platform.kubernetes.client import KubeClient
from tether.platform.kubernetes.store import CUSTOM_KINDS, CustomKind, KubeStore
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubelet import make_volumes
from tether.testing.procs import Proc, free_port, http_get

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


# ---- identity ------------------------------------------------------------------------------------

PEM = serialization.Encoding.PEM
TRUST_DOMAIN = "cluster.local"


def pem_key(key: Any) -> bytes:
    return bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Issuers:
    """Trust anchor and issuers for one control-plane namespace."""

    def __init__(self, cp_ns: str) -> None:
        self.now = dt.datetime.now(dt.UTC)
        self.cp_ns = cp_ns
        self.anchor, self.anchor_key = create_anchor(f"root.{cp_ns}.{TRUST_DOMAIN}", self.now)

    def issuer(self) -> tuple[x509.Certificate, Any]:
        return create_issuer(f"identity.{self.cp_ns}.{TRUST_DOMAIN}", self.anchor, self.anchor_key, self.now)

    def secret(self, cert: x509.Certificate, key: Any, scheme: str = "kubernetes.io/tls") -> dict[str, Any]:
        if scheme == "kubernetes.io/tls":
            data = {"tls.crt": b64(cert.public_bytes(PEM)), "tls.key": b64(pem_key(key)),
                    "ca.crt": b64(self.anchor.public_bytes(PEM))}
        else:
            data = {"crt.pem": b64(cert.public_bytes(PEM)), "key.pem": b64(pem_key(key))}
        return {"apiVersion": "v1", "kind": "Secret", "type": scheme,
                "metadata": {"name": "linkerd-identity-issuer", "namespace": self.cp_ns}, "data": data}

    def roots(self) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "linkerd-identity-trust-roots", "namespace": self.cp_ns},
                "data": {"ca-bundle.crt": self.anchor.public_bytes(PEM).decode()}}


class KubeControllerProc(Proc):
    """A control-plane service as a child process on this host, its admin port on loopback."""

    def __init__(self, what: str, argv: list[str], log: Path, *, host: str, port: int, admin_port: int,
                 env: dict[str, str] | None = None, plaintext_port: int | None = None) -> None:
        self.what, self.host, self.port, self.admin_port = what, host, port, admin_port
        self.plaintext_port = plaintext_port  # the operators' plaintext listener, on loopback (destination)
        super().__init__(argv, log, env=env)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> KubeControllerProc:
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.what} exited {self.popen.returncode}:\n{self.log()}")
            try:
                return http_get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout=timeout, what=f"the {self.what} service ready")
        return self

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.admin_port}/metrics")[1].decode()


class _ControllerCommand(KubeControllerProc):
    """`tether controller COMPONENT --platform kubernetes` as a child process."""

    COMPONENT: ClassVar[str]

    def __init__(self, tmp: Path, cluster: KubeCluster, cp_ns: str, *extra: str, host: str = "127.0.0.1",
                 port: int = 0, env: dict[str, str] | None = None) -> None:
        port, admin_port = port or free_port(host), free_port()
        what = self.COMPONENT
        super().__init__(
            what,
            [sys.executable, "-m", "tether", "controller", what, "--platform", "kubernetes",
             "--kubeconfig", str(cluster.kubeconfig), "-L", cp_ns,
             "--addr", f"{host}:{port}", "--admin-addr", f"127.0.0.1:{admin_port}", *extra],
            tmp / f"{what}-{port}.log", host=host, port=port, admin_port=admin_port, env=env,
        )


class KubeIdentityProc(_ControllerCommand):
    """`tether controller identity --platform kubernetes` as a child process."""

    COMPONENT = "identity"

    def wait_ready(self, timeout: float = 30.0) -> KubeIdentityProc:
        super().wait_ready(timeout)
        return self


def apply(cluster: KubeCluster, *docs: Mapping[str, Any]) -> None:
    """kubectl apply of objects that name their namespaces."""
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


def token_for(cluster: KubeCluster, ns: str, sa: str, audience: str = "identity.l5d.io") -> bytes:
    """A projected service-account token, minted by the API server (TokenRequest)."""
    answer = cluster.api.create(
        f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
         "spec": {"audiences": [audience], "expirationSeconds": 3600}},
    )
    return str(answer["status"]["token"]).encode()


# ---- destination ---------------------------------------------------------------------------------


class KubeDestinationProc(_ControllerCommand):
    """`tether controller destination --platform kubernetes` as a child process."""

    COMPONENT = "destination"

    def wait_ready(self, timeout: float = 60.0) -> KubeDestinationProc:
        super().wait_ready(timeout)
        return self


# ---- the control plane as the chart runs it -------------------------------------------------------


def chart_controller(tmp: Path, cluster: KubeCluster, deployment: Mapping[str, Any], *, host: str, port: int,
                     services: Mapping[str, str], env: dict[str, str] | None = None) -> KubeControllerProc:
    """The controller container of a rendered control-plane Deployment, run on this host as its pod would
    run it: the chart's args, with three changes a pod does not need. It listens on ``host:port`` (where
    the tests' pods find its Service) with its admin port on loopback; the files of the volumes it mounts
    are made on this host as the kubelet makes them (a projected token minted by the API server for the
    pod's service account, a ConfigMap's keys) and its path arguments point there; a control-plane
    Service name in an address is resolved as the cluster's DNS would (``services``: name -> address).
    It reaches the API server with the cluster's kubeconfig, where a pod uses its service account."""
    meta, template = deployment["metadata"], deployment["spec"]["template"]
    spec = template["spec"]
    container = next(c for c in spec["containers"] if c["name"] != "linkerd-proxy")
    what = str(container["name"])
    admin_port = free_port()
    mounts = container.get("volumeMounts") or []
    pod = {"metadata": {**template["metadata"], "name": meta["name"], "namespace": meta["namespace"]},
           "spec": {**spec, "volumes": [v for v in spec.get("volumes") or () if v["name"] in
                                        {m["name"] for m in mounts}]}}
    dirs = make_volumes(cluster, pod, tmp / f"{what}-{port}-{uuid.uuid4().hex[:6]}-volumes")
    # The pod's loopback ports become this host's: one free port each, so that controllers run side by side.
    plaintext_port = free_port() if "--plaintext-addr" in container["args"] else None
    where = {"--addr": f"{host}:{port}", "--admin-addr": f"127.0.0.1:{admin_port}",
             "--plaintext-addr": f"127.0.0.1:{plaintext_port}"}

    def on_host(arg: str) -> str:
        for m in mounts:
            prefix = m["mountPath"].rstrip("/") + "/"
            if arg.startswith(prefix):
                return str(dirs[m["name"]] / arg[len(prefix):])
        addrs = []
        for addr in arg.split(","):
            name, sep, svc_port = addr.rpartition(":")
            addrs.append(f"{services[name]}:{svc_port}" if sep and name in services else addr)
        return ",".join(addrs)

    args = list(container["args"])
    argv = [sys.executable, "-m", "tether"]  # the image's entrypoint
    for i, arg in enumerate(args):
        argv.append(where[args[i - 1]] if i and args[i - 1] in where else on_host(arg))
    argv += ["--kubeconfig", str(cluster.kubeconfig)]
    return KubeControllerProc(what, argv, tmp / f"{what}-{port}.log", host=host, port=port,
                              admin_port=admin_port, env=env, plaintext_port=plaintext_port)


class EndpointWatch:
    """A Destination.Get stream followed in a thread: the current addresses and when each change came."""

    def __init__(self, addr: str, authority: str, context: str = "") -> None:
        import grpc

        from tether.api.gen import destination_pb2, destination_pb2_grpc

        self.addresses: set[str] = set()
        self.changes: list[tuple[float, frozenset[str]]] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(addr)
        stub = destination_pb2_grpc.DestinationStub(self._channel)
        self._stream = stub.Get(destination_pb2.GetDestination(scheme="k8s", path=authority, context_token=context))
        self._thread = threading.Thread(target=self._follow, daemon=True, name=f"get {authority}")
        self._thread.start()

    def _follow(self) -> None:
        import ipaddress
        import time

        try:
            for update in self._stream:
                kind = update.WhichOneof("update")
                with self._lock:
                    if kind == "add":
                        for a in update.add.addrs:
                            ip = str(ipaddress.ip_address(a.addr.ip.ipv4)) if a.addr.ip.HasField("ipv4") else "?"
                            self.addresses.add(f"{ip}:{a.addr.port}")
                    elif kind == "remove":
                        for r in update.remove.addrs:
                            ip = str(ipaddress.ip_address(r.ip.ipv4)) if r.ip.HasField("ipv4") else "?"
                            self.addresses.discard(f"{ip}:{r.port}")
                    elif kind == "no_endpoints":
                        self.addresses.clear()
                    self.changes.append((time.monotonic(), frozenset(self.addresses)))
        except Exception as e:  # the stream ended (cancelled by close(), or the server went away)
            self.error = e

    def current(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self.addresses)

    def close(self) -> None:
        self._stream.cancel()
        self._channel.close()
        self._thread.join(5)


def pod_addresses(cluster: KubeCluster, ns: str, app: str, port: int) -> frozenset[str]:
    """The ip:port of every Ready pod of ``app``."""
    pods = cluster.api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=f"app={app}")["items"]
    out = set()
    for p in pods:
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (p.get("status") or {}).get("conditions") or [])
        if ready and p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp"):
            out.add(f"{p['status']['podIP']}:{port}")
    return frozenset(out)
