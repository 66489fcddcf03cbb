"""The local mesh's supervisor: the control plane and the pods of one host, kept as asked.

It runs the identity and destination controllers (one or, with HA, three of each) on the bridge's
gateway address and restarts any that exits; it reconciles the workloads `tether run` asked for
(``specs/``) into pods, each in its own network namespace with `tether proxy-init` rules, a proxy
as uid 2102 and the application, which starts only once the proxy is ready; it gives Services a
virtual IP and writes their names into every pod's hosts file. What it sees is written to
``status.json`` for `tether status` and `tether run`. On SIGTERM it stops every pod (application
first, then the proxy, which drains), the control plane, and removes the network it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tether.core import sidecar
from tether.core.identity.names import WorkloadIdentity
from tether.platform.local import linkerd2, network
from tether.platform.local.children import Supervised, http_status
from tether.platform.local.layout import PROXY_UID, Layout, MeshSettings, write_json
from tether.platform.local.spec import LINKERD2_PROXY, PROXY_IGNORED_INBOUND, PodSettings, SpecError, WorkloadSpec
from tether.platform.local.tokens import control_tokens_dir, ensure_control_token
from tether.platform.local.workloads import Workload, WorkloadError, WorkloadPort, WorkloadRegistry

log = logging.getLogger("tether.supervisor")

RECONCILE_INTERVAL = 0.2
HEALTH_INTERVAL = 1.0
PROXY_READY_TIMEOUT = 60.0
ADMIN_PORT = 4191
TAP_PORT = 4190
INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
# A new Service's names reach the pods' hosts files once every destination replica serves it (a
# proxy asked for a name before its destination replica knows it takes it for a name outside the
# mesh), or at the latest this long after the supervisor first saw it.
SERVICE_PUBLISH_MAX_DELAY = 10.0
# Pods set up at once: each starts a Python proxy, and a hundred at once starve a small machine.
START_CONCURRENCY = 8
START_SLOT_TIMEOUT = 20.0
# How long a stopping pod stays up after leaving its Services' endpoints (the store polls every 250 ms).
ENDPOINT_DRAIN = 0.5


def tether_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether", *args]


def proxy_argv(*args: str) -> list[str]:
    """``tether proxy`` as every deployment runs the sidecar (tether.core.sidecar: -OO, no debug ranges)."""
    return [*sidecar.python_argv(), "proxy", *args]


def identity_name(sa: str, ns: str, settings: MeshSettings) -> str:
    return f"{sa}.{ns}.serviceaccount.identity.{settings.controller_namespace}.{settings.trust_domain}"


# The control plane's own service accounts (Linkerd's names): their identities are what proxies
# require of the identity and destination services' certificates.
IDENTITY_SA = "linkerd-identity"
DESTINATION_SA = "linkerd-destination"


def control_identity(sa: str, settings: MeshSettings) -> str:
    return identity_name(sa, settings.controller_namespace, settings)


def pick_ports(host: str, count: int) -> list[int]:
    """``count`` ports free on ``host`` now (held together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


# --- control plane ------------------------------------------------------------------------------


@dataclass
class Component:
    name: str  # identity-0
    kind: str  # identity | destination
    addr: str
    admin_addr: str
    child: Supervised
    ready: bool = False

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "addr": self.addr, "adminAddr": self.admin_addr,
                "pid": self.child.pid, "ready": self.ready, "restarts": self.child.restarts}


def control_plane(layout: Layout, s: MeshSettings) -> list[Component]:
    out: list[Component] = []
    if s.agent:
        return out  # a joined host uses the first host's control plane
    cp_log = layout.logs_dir / "control-plane"
    common = ["--state-dir", str(layout.root), "-L", s.controller_namespace, "--identity-trust-domain", s.trust_domain]
    for i, (addr, admin) in enumerate(zip(s.identity_addrs, s.identity_admin_addrs, strict=True)):
        # TLS as linkerd-identity: proxies verify the service before they send their token.
        argv = tether_argv("controller", "identity", "--addr", addr, "--admin-addr", admin, "--tls",
                           "--identity-service-account", IDENTITY_SA,
                           "--identity-trust-anchors-file", s.trust_anchors,
                           "--identity-issuer-certificate-file", s.issuer_certificate,
                           "--identity-issuer-key-file", s.issuer_key, *common)
        out.append(Component(f"identity-{i}", "identity", addr, admin,
                             Supervised(f"identity-{i}", argv, cp_log / f"identity-{i}.log")))
    token = control_tokens_dir(layout.root) / f"{DESTINATION_SA}.token"
    for i, (addr, admin) in enumerate(zip(s.destination_addrs, s.destination_admin_addrs, strict=True)):
        # Mutual TLS as linkerd-destination on addr, its certificate from the identity service.
        tls = ["--identity-addrs", ",".join(s.identity_addrs), "--identity-token-path", str(token),
               "--identity-trust-anchors-file", s.trust_anchors, "--service-account", DESTINATION_SA,
               "--identity-service-account", IDENTITY_SA]
        if i < len(s.destination_local_addrs):
            tls += ["--plaintext-addr", s.destination_local_addrs[i]]
        argv = tether_argv("controller", "destination", "--addr", addr, "--admin-addr", admin, *tls,
                           "--resources-dir", str(layout.resources_dir), "--cluster-domain", s.cluster_domain,
                           "--cluster-networks", f"{s.pod_cidr},{s.service_cidr}", *common)
        out.append(Component(f"destination-{i}", "destination", addr, admin,
                             Supervised(f"destination-{i}", argv, cp_log / f"destination-{i}.log")))
    return out


@dataclass
class Addon:
    name: str
    child: Supervised

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.child.pid, "restarts": self.child.restarts,
                "argv": self.child.argv}


def _label_name(key: str) -> str:
    """A pod label's key as a Prometheus label name (what Kubernetes service discovery makes of it)."""
    out = "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_" for ch in key)
    return out if out and not out[0].isdigit() else f"_{out}"


# --- pods ---------------------------------------------------------------------------------------


@dataclass
class Pod:
    spec: WorkloadSpec
    index: int
    ip: str
    veth_index: int
    netns: str  # "" for an --explicit pod
    app_ip: str = ""  # an --explicit pod's application listens here (its proxy on ``ip``)
    phase: str = "Creating"
    message: str = ""
    # The Services its /etc/hosts lists (None: not written yet): see _reconcile_services.
    hosts_written: list[tuple[str, str, str]] | None = None
    proxy: Supervised | None = None
    app: Supervised | None = None
    proxy_ready: bool = False
    created_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.spec.pod_name(self.index)

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.namespace, self.name)

    def status(self, settings: MeshSettings) -> dict[str, Any]:
        return {
            "namespace": self.spec.namespace, "workload": self.spec.name, "name": self.name, "ip": self.ip,
            "netns": self.netns, "phase": self.phase, "message": self.message,
            "proxyReady": self.proxy_ready, "meshed": self.spec.settings.inject, "explicit": self.spec.explicit,
            "appIp": self.app_ip or self.ip,
            "appRunning": bool(self.app and self.app.running),
            "appPid": self.app.pid if self.app else None, "proxyPid": self.proxy.pid if self.proxy else None,
            "appRestarts": self.app.restarts if self.app else 0,
            "proxyRestarts": self.proxy.restarts if self.proxy else 0,
            "identity": identity_name(self.spec.sa, self.spec.namespace, settings),
            "proxyAdmin": f"{self.ip}:{ADMIN_PORT}",
            "createdAt": self.created_at, "readyAt": self.ready_at,
        }


class Supervisor:
    def __init__(self, layout: Layout, settings: MeshSettings) -> None:
        self.layout = layout
        self.s = settings
        self.registry: Any = WorkloadRegistry(layout.root)
        self._join_token = ""
        if settings.agent:
            from tether.platform.local.join import RemoteRegistry

            self._join_token = layout.join_token_path.read_text().strip()
            self.registry = RemoteRegistry(settings.join_addr, self._join_token)
        self._remote_ok = False
        self._remote_checked = 0.0
        self.components: list[Component] = []
        self.pods: dict[tuple[str, str], Pod] = {}
        self.specs: dict[tuple[str, str], WorkloadSpec] = {}
        self.spec_errors: dict[str, str] = {}
        self.services: dict[tuple[str, str], str] = {}  # (ns, name) -> virtual IP
        self.hosts_services: list[tuple[str, str, str]] = []
        self._service_seen: dict[tuple[str, str], float] = {}  # first seen (monotonic)
        self._service_served: set[tuple[str, str]] = set()  # every destination replica serves it
        self._service_port: dict[tuple[str, str], int] = {}
        self.stopping = False
        self._free_ips: list[str] = []
        self._free_loopback: list[tuple[str, str]] = []
        self._veth_next = 0
        self._last_status = ""
        self._stop = asyncio.Event()
        self._store: Any = None
        self._starting = asyncio.Semaphore(START_CONCURRENCY)
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.addons: dict[str, Addon] = {}
        self._last_scrape: dict[str, str] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Bridge, addresses and the runtime directory; the settings get their control-plane ports."""
        if not self.s.explicit_only:
            network.create_bridge(self.s.bridge, self.s.gateway, self.s.prefixlen)
            hosts = ipaddress.ip_network(self.s.pod_cidr).hosts()
            next(hosts)  # the gateway
            self._free_ips = [str(h) for h, _ in zip(hosts, range(4096), strict=False)]
        if self.s.loopback_cidr:
            lo = ipaddress.ip_network(self.s.loopback_cidr).hosts()
            self._free_loopback = [(str(a), str(b)) for a, b, _ in zip(lo, lo, range(2048), strict=False)]
        if not self.s.identity_addrs:
            n = self.s.replicas
            ports = pick_ports(self.s.gateway, 4 * n + 1)
            gw = self.s.gateway
            self.s = replace(
                self.s,
                identity_addrs=[f"{gw}:{p}" for p in ports[0:n]],
                identity_admin_addrs=[f"{gw}:{p}" for p in ports[n:2 * n]],
                destination_addrs=[f"{gw}:{p}" for p in ports[2 * n:3 * n]],
                destination_admin_addrs=[f"{gw}:{p}" for p in ports[3 * n:4 * n]],
                join_addr="" if self.s.explicit_only else f"{gw}:{ports[4 * n]}",
            )
            self.layout.write_settings(self.s)
        if not self.s.agent and not self.s.destination_local_addrs:
            # (A mesh.json from before the destination served mutual TLS has none yet.)
            self.s = replace(self.s, destination_local_addrs=[
                f"127.0.0.1:{p}" for p in pick_ports("127.0.0.1", self.s.replicas)])
            self.layout.write_settings(self.s)
        if not self.s.agent:
            ensure_control_token(self.layout.root, DESTINATION_SA)
        if self.s.join_addr and not self.s.agent and not self.layout.join_token_path.exists():
            from tether.platform.local.join import new_token

            fd = os.open(self.layout.join_token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_token() + "\n")
        rt = self.layout.runtime_dir(self.s)
        rt.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(rt.parent, 0o755)  # the proxies' uid 2102 reads below it
            os.chmod(rt, 0o755)
        shutil.copyfile(self.s.trust_anchors, rt / "ca.crt")
        os.chmod(rt / "ca.crt", 0o644)
        # Pods left from a supervisor that died without cleaning up.
        for ns in network.leftover_netns(self.s.netns_prefix) if not self.s.explicit_only else ():
            network.delete_pod_netns(ns)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        from tether.platform.local.store import LocalStore

        self.layout.resources_dir.mkdir(parents=True, exist_ok=True)
        self._store = LocalStore(self.layout.resources_dir)
        self.services = self._read_services()
        self.components = control_plane(self.layout, self.s)
        join_server = None
        if self.s.join_addr and not self.s.agent:
            join_server = await self._serve_join()
        try:
            async with asyncio.TaskGroup() as tg:
                for c in self.components:
                    tg.create_task(c.child.run())
                health = tg.create_task(self._health_loop())
                try:
                    while not self._stop.is_set():
                        await self._reconcile(tg)
                        self._reconcile_addons(tg)
                        self._write_scrape_targets()
                        self._write_status()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(RECONCILE_INTERVAL):
                                await self._stop.wait()
                finally:
                    self.stopping = True
                    self._write_status()
                    log.info("stopping: %d pods, then the control plane", len(self.pods))
                    await self._stop_all_pods()
                    for c in self.components:
                        c.child.request_stop()
                    for a in self.addons.values():
                        a.child.request_stop()
                    health.cancel()
                    if join_server is not None:
                        join_server.close()
        finally:
            await asyncio.to_thread(self.teardown)

    def teardown(self) -> None:
        teardown(self.layout, self.s)

    # --- other hosts ----------------------------------------------------------------------------

    async def _serve_join(self) -> asyncio.Server:
        from tether.platform.local.join import JoinServer

        api = JoinServer(self.layout.join_token_path.read_text().strip(), self.registry, self._mesh_info,
                         self._service_list, lambda cidr, via: add_route(self.layout, cidr, via))
        host, _, port = self.s.join_addr.rpartition(":")
        return await asyncio.start_server(api.handle, host, int(port))

    def _mesh_info(self) -> dict[str, Any]:
        s = self.s
        return {"identityAddrs": s.identity_addrs, "destinationAddrs": s.destination_addrs,
                "trustAnchorsPem": Path(s.trust_anchors).read_text(), "controllerNamespace": s.controller_namespace,
                "trustDomain": s.trust_domain, "clusterDomain": s.cluster_domain, "serviceCIDR": s.service_cidr}

    def _service_list(self) -> list[dict[str, str]]:
        """The Services whose names the pods have (those the destination replicas serve)."""
        return [{"namespace": ns, "name": name, "clusterIP": vip} for ns, name, vip in self.hosts_services]

    def _remote_services(self) -> dict[tuple[str, str], str] | None:
        from tether.platform.local.join import JoinError, call

        try:
            items = call(self.s.join_addr, self._join_token, "GET", "/services")
        except JoinError as e:
            if self._remote_ok:
                log.error("the first host's join API does not answer: %s", e)
            self._remote_ok = False
            return None
        self._remote_ok = True
        return {(str(i["namespace"]), str(i["name"])): str(i["clusterIP"]) for i in items}

    # --- status ---------------------------------------------------------------------------------

    def _write_status(self) -> None:
        # A joined host's control plane is the first host's, reached through its join API.
        cp_ready = self._remote_ok if self.s.agent else bool(self.components) and all(
            c.ready for c in self.components)
        if cp_ready and self.ready_at is None:
            self.ready_at = time.time()
        doc = {
            "supervisor": {"pid": os.getpid(), "startedAt": self.started_at, "stopping": self.stopping},
            "controlPlaneReady": cp_ready, "controlPlaneReadyAt": self.ready_at,
            "components": [c.status() for c in self.components],
            "pods": [p.status(self.s) for _, p in sorted(self.pods.items())],
            "workloads": [{"namespace": k[0], "name": k[1], "replicas": v.replicas} for k, v in
                          sorted(self.specs.items())],
            "specErrors": self.spec_errors,
            "services": [{"namespace": k[0], "name": k[1], "clusterIP": v} for k, v in sorted(self.services.items())],
            "addons": [a.status() for _, a in sorted(self.addons.items())],
        }
        text = json.dumps(doc, sort_keys=True)
        if text != self._last_status:
            self._last_status = text
            write_json(self.layout.status_path, doc)

    async def _health_loop(self) -> None:
        while True:
            for c in self.components:
                host, _, port = c.admin_addr.rpartition(":")
                c.ready = c.child.running and await http_status(host, int(port), "/ready") == 200
            for p in list(self.pods.values()):
                if p.proxy is not None and p.phase in ("Running", "WaitingForProxy"):
                    p.proxy_ready = p.proxy.running and await http_status(p.ip, ADMIN_PORT, "/ready") == 200
            await asyncio.sleep(HEALTH_INTERVAL)

    # --- add-ons and scrape targets ------------------------------------------------------------

    def _read_addons(self) -> dict[str, tuple[list[str], float]]:
        out: dict[str, tuple[list[str], float]] = {}
        for path in sorted(self.layout.addons_dir.glob("*.json")):
            try:
                doc = json.loads(path.read_text())
                argv = [str(a) for a in doc["argv"]]
                grace = float(doc.get("grace", 10.0))
            except (OSError, ValueError, KeyError, TypeError) as e:
                old = self.addons.get(path.stem)
                if old is not None:
                    out[path.stem] = (old.child.argv, old.child.grace)
                log.error("add-on %s: %s (keeping what runs)", path, e)
                continue
            if argv:
                out[path.stem] = (argv, grace)
        return out

    def _reconcile_addons(self, tg: asyncio.TaskGroup) -> None:
        """Start the add-ons ``addons/`` asks for, restart a changed one, stop a removed one."""
        want = self._read_addons()
        for name, addon in list(self.addons.items()):
            if addon.child.done.is_set():
                del self.addons[name]
            elif name not in want or want[name][0] != addon.child.argv:
                addon.child.request_stop()  # removed once stopped; a changed one then starts anew
        for name, (argv, grace) in want.items():
            if name in self.addons:
                continue
            child = Supervised(f"addon/{name}", argv, self.layout.logs_dir / "addons" / f"{name}.log", grace=grace)
            self.addons[name] = Addon(name, child)
            tg.create_task(child.run())

    def scrape_targets(self) -> dict[str, list[dict[str, Any]]]:
        """The proxies' and the control plane's admin addresses with the labels the seeds' queries use."""
        s = self.s
        proxies = []
        for (ns, name), pod in sorted(self.pods.items()):
            if pod.proxy is None or pod.phase not in ("WaitingForProxy", "Running"):
                continue
            labels = {_label_name(k): v for k, v in pod.spec.pod_labels.items()}
            labels.update({"namespace": ns, "pod": name, "deployment": pod.spec.name,
                           "control_plane_ns": s.controller_namespace, "workload_ns": ns,
                           "serviceaccount": pod.spec.sa})
            proxies.append({"targets": [f"{pod.ip}:{ADMIN_PORT}"], "labels": labels})
        controllers = [{"targets": [c.admin_addr],
                        "labels": {"namespace": s.controller_namespace, "pod": c.name, "component": c.kind}}
                       for c in self.components]
        return {"proxies": proxies, "controllers": controllers}

    def _write_scrape_targets(self) -> None:
        for name, groups in self.scrape_targets().items():
            text = json.dumps(groups, sort_keys=True)
            if self._last_scrape.get(name) != text:
                self._last_scrape[name] = text
                write_json(self.layout.scrape_dir / f"{name}.json", groups)

    # --- desired state --------------------------------------------------------------------------

    def _read_specs(self) -> dict[tuple[str, str], WorkloadSpec]:
        out: dict[tuple[str, str], WorkloadSpec] = {}
        errors: dict[str, str] = {}
        for path in sorted(self.layout.specs_dir.glob("*/*.yaml")):
            try:
                doc = yaml.safe_load(path.read_text())
                spec = WorkloadSpec.from_dict(doc if isinstance(doc, dict) else {}, str(path))
            except (OSError, yaml.YAMLError, SpecError) as err:
                errors[str(path)] = str(err)
                old = self.specs.get((path.parent.name, path.stem))
                if old is not None:
                    out[(old.namespace, old.name)] = old
                continue
            out[(spec.namespace, spec.name)] = spec
        if errors != self.spec_errors:
            for p, msg in errors.items():
                log.error("workload spec %s: %s (keeping its last good version)", p, msg)
        self.spec_errors = errors
        return out

    async def _reconcile(self, tg: asyncio.TaskGroup) -> None:
        self.specs = self._read_specs()
        want: dict[tuple[str, str], tuple[WorkloadSpec, int]] = {}
        for spec in self.specs.values():
            for i in range(spec.replicas):
                want[(spec.namespace, spec.pod_name(i))] = (spec, i)
        for key, pod in list(self.pods.items()):
            wanted = want.get(key)
            same = wanted is not None and replace(wanted[0], replicas=0) == replace(pod.spec, replicas=0)
            if not same and not pod.stop.is_set():
                log.info("pod %s/%s: %s", key[0], key[1], "spec changed" if wanted else "not wanted")
                pod.stop.set()
        for key, (spec, i) in want.items():
            if key in self.pods or not (self._free_loopback if spec.explicit else self._free_ips):
                continue
            if spec.explicit:
                proxy_ip, app_ip = self._free_loopback.pop(0)
                pod = Pod(spec, i, proxy_ip, -1, "", app_ip=app_ip)
            else:
                pod = Pod(spec, i, self._free_ips.pop(0), self._veth_next,
                          f"{self.s.netns_prefix}{spec.namespace}-{spec.pod_name(i)}")
            self._veth_next += 1
            self.pods[key] = pod
            pod.task = tg.create_task(self._run_pod(pod))
        await self._reconcile_services()

    async def _reconcile_services(self) -> None:
        if self.s.agent:
            if time.monotonic() - self._remote_checked > 1.0:
                self._remote_checked = time.monotonic()
                remote = await asyncio.to_thread(self._remote_services)
                if remote is not None:
                    self.services = remote
        else:
            await self._reconcile_own_services()
        now = time.monotonic()
        for key in self.services:
            self._service_seen.setdefault(key, now)
        for key in set(self._service_seen) - set(self.services):
            del self._service_seen[key]
            self._service_served.discard(key)
        pending = [k for k in self.services if k not in self._service_served]
        if self.s.agent:
            # The first host lists a Service only once its destination replicas serve it.
            self._service_served |= set(pending)
        elif pending:
            served = await asyncio.to_thread(self._destinations_serve, pending)
            self._service_served |= {k for k in pending if k in served
                                     or now - self._service_seen[k] >= SERVICE_PUBLISH_MAX_DELAY}
        hosts = sorted((k[0], k[1], v) for k, v in self.services.items() if k in self._service_served)
        if hosts != self.hosts_services:
            self.hosts_services = hosts
        # Every pod whose hosts file is not the current list, not only when the list changes: a pod
        # being created when it changed wrote the list of that moment (_create_pod, in a thread) and
        # would keep it (a Service published meanwhile stayed unresolvable in that pod).
        for pod in list(self.pods.values()):
            if pod.netns and pod.phase not in ("Creating", "Terminating", "Failed") \
                    and pod.hosts_written != self.hosts_services:
                await asyncio.to_thread(self._write_pod_etc, pod)

    async def _reconcile_own_services(self) -> None:
        store = self._store
        changed = await asyncio.to_thread(store.scan) if store is not None else False
        if changed or not self.hosts_services:
            svcs = store.list("Service") if store is not None else []
            current: dict[tuple[str, str], str] = {}
            to_write = []
            for svc in svcs:
                key = (svc.namespace, svc.name)
                cip = svc.spec.cluster_ip
                if cip == "None" or svc.spec.type == "ExternalName":
                    continue
                if not cip:
                    cip = self.services.get(key) or self._allocate_vip(current)
                    to_write.append((svc, cip))
                current[key] = cip
                self._service_port[key] = svc.spec.ports[0].port if svc.spec.ports else 80
            self.services = current
            write_json(self.layout.services_path, {f"{k[0]}/{k[1]}": v for k, v in sorted(current.items())})
            if to_write:
                await asyncio.to_thread(self._write_cluster_ips, to_write)

    def _destinations_serve(self, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The Services every destination replica already knows (its first answer to Get says it exists)."""
        import grpc

        from tether.api.gen import destination_pb2, destination_pb2_grpc

        out = set()
        for ns, name in keys:
            path = f"{name}.{ns}.svc.{self.s.cluster_domain}:{self._service_port.get((ns, name), 80)}"
            known = True
            for addr in self.s.destination_local_addrs:  # plaintext, on loopback
                try:
                    with grpc.insecure_channel(addr) as ch:
                        call = destination_pb2_grpc.DestinationStub(ch).Get(
                            destination_pb2.GetDestination(scheme="k8s", path=path), timeout=1.0)
                        first = next(iter(call))
                        call.cancel()
                except (grpc.RpcError, StopIteration):
                    known = False
                    break
                if first.WhichOneof("update") == "no_endpoints" and not first.no_endpoints.exists:
                    known = False
                    break
            if known:
                out.add((ns, name))
        return out

    def _read_services(self) -> dict[tuple[str, str], str]:
        try:
            doc = json.loads(self.layout.services_path.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for k, v in doc.items() if isinstance(doc, dict) else ():
            ns, _, name = str(k).partition("/")
            out[(ns, name)] = str(v)
        return out

    def _allocate_vip(self, taken_now: dict[tuple[str, str], str]) -> str:
        used = set(self.services.values()) | set(taken_now.values())
        for h in ipaddress.ip_network(self.s.service_cidr).hosts():
            if str(h) not in used:
                return str(h)
        raise RuntimeError(f"service CIDR {self.s.service_cidr} is full")

    def _write_cluster_ips(self, items: list[tuple[Any, str]]) -> None:
        """Give Services their virtual IP in the store, as the API server fills in spec.clusterIP."""
        from tether.platform.local.apply import ApplyError, apply

        for svc, vip in items:
            doc = svc.dump()
            doc.setdefault("spec", {})["clusterIP"] = vip
            try:
                apply(self.layout.resources_dir, [(f"supervisor ({svc.ref()})", yaml.safe_dump(doc))])
                log.info("service %s/%s: virtual IP %s", svc.namespace, svc.name, vip)
            except (ApplyError, OSError) as e:
                log.error("service %s/%s: cannot record its virtual IP: %s", svc.namespace, svc.name, e)

    def _write_pod_etc(self, pod: Pod) -> None:
        hosts = self.hosts_services
        network.write_netns_etc(
            pod.netns,
            network.hosts_file(pod.name, pod.ip, pod.spec.namespace, hosts, self.s.cluster_domain),
            network.resolv_conf(pod.spec.namespace, self.s.cluster_domain))
        pod.hosts_written = hosts

    # --- one pod --------------------------------------------------------------------------------

    def _pod_runtime(self, pod: Pod) -> Path:
        return self.layout.runtime_dir(self.s) / pod.spec.namespace / pod.name

    def _create_pod(self, pod: Pod) -> None:
        """Blocking: the namespace, its files, the registry entry, the token for the proxy, proxy-init."""
        s, spec = self.s, pod.spec
        if not spec.explicit:
            network.create_pod_netns(pod.netns, network.veth_name(s.mesh_id, pod.veth_index), s.bridge, pod.ip,
                                     s.prefixlen, s.gateway)
            self._write_pod_etc(pod)
        # Registered without its address: it becomes an endpoint only once its application runs.
        token = self.registry.register(self._workload(pod, addressed=False))
        rt = self._pod_runtime(pod)
        rt.mkdir(parents=True, exist_ok=True)
        for d in (rt.parent, rt):
            os.chmod(d, 0o755 if os.geteuid() == 0 else 0o700)  # as root: uid 2102 reads below
        tok = rt / "token"
        fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        if self._as_proxy_uid(pod):
            os.chown(tok, PROXY_UID, PROXY_UID)
        if not spec.settings.inject or spec.explicit:
            return
        if spec.settings.linkerd2_proxy:
            self._prepare_linkerd2_proxy(pod, rt)
        ps = spec.settings
        argv = tether_argv("proxy-init", "--incoming-proxy-port", str(INBOUND_PORT),
                           "--outgoing-proxy-port", str(OUTBOUND_PORT), "--proxy-uid", str(PROXY_UID),
                           "--inbound-ports-to-ignore", ",".join((*PROXY_IGNORED_INBOUND, *ps.skip_inbound_ports)))
        if ps.skip_outbound_ports:
            argv += ["--outbound-ports-to-ignore", ",".join(ps.skip_outbound_ports)]
        if ps.skip_subnets:
            argv += ["--subnets-to-ignore", ",".join(ps.skip_subnets)]
        if ps.linkerd2_proxy:
            argv += ["--no-redirect-self-calls"]  # its inbound side dials the pod's address
        import subprocess

        r = subprocess.run(network.netns_exec(pod.netns, argv), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise network.NetworkError(f"proxy-init: {r.stderr.strip() or r.stdout.strip()}")

    def _workload(self, pod: Pod, addressed: bool) -> Workload:
        spec = pod.spec
        return Workload(name=pod.name, namespace=spec.namespace, service_account=spec.sa,
                        addresses=(pod.ip,) if addressed else (),
                        ports=tuple(WorkloadPort(p.port, p.name) for p in spec.ports),
                        # As Linkerd's injector labels a Deployment's pods: the destination service
                        # turns it into the endpoints' dst_deployment metric label.
                        labels={**spec.pod_labels, "linkerd.io/proxy-deployment": spec.name},
                        proxy_admin=f"{pod.ip}:{ADMIN_PORT}", annotations=dict(spec.annotations))

    @staticmethod
    def _as_proxy_uid(pod: Pod) -> bool:
        """A transparent pod's proxy runs as uid 2102 (its iptables rules let that uid's traffic out);
        an --explicit pod's as this process's user."""
        return not pod.spec.explicit and os.geteuid() == 0

    def _prepare_linkerd2_proxy(self, pod: Pod, rt: Path) -> None:
        """Blocking: check uid 2102 can run the binary; write its identity documents."""
        binary = pod.spec.settings.linkerd2_proxy
        assert binary is not None
        if os.geteuid() == 0:
            check = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", "test", "-x", binary]
            if subprocess.run(check, capture_output=True, timeout=30).returncode != 0:
                raise WorkloadError(f"annotation {LINKERD2_PROXY}: {binary} is not an executable file uid {PROXY_UID} "
                                    "(the proxy's user) can run: put it where that user can read it")
        elif not os.access(binary, os.X_OK):
            raise WorkloadError(f"annotation {LINKERD2_PROXY}: {binary} is not an executable file")
        spec = pod.spec
        linkerd2.write_identity_documents(
            rt / "identity",
            WorkloadIdentity(spec.sa, spec.namespace, self.s.controller_namespace, self.s.trust_domain),
            PROXY_UID if self._as_proxy_uid(pod) else None)

    def _linkerd2_proxy_env(self, pod: Pod) -> dict[str, str]:
        s, spec, ps = self.s, pod.spec, pod.spec.settings
        rt = self._pod_runtime(pod)
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **linkerd2.proxy_env(
            namespace=spec.namespace, pod=pod.name, pod_ip=pod.ip, identity=identity_name(spec.sa, spec.namespace, s),
            token_path=rt / "token", identity_dir=rt / "identity",
            trust_anchors_pem=(self.layout.runtime_dir(s) / "ca.crt").read_text(),
            # One address each (Linkerd's proxy takes a single name or address): the first replica.
            identity_addr=s.identity_addrs[0], identity_name=control_identity(IDENTITY_SA, s),
            destination_addr=s.destination_addrs[0], destination_name=control_identity(DESTINATION_SA, s),
            cluster_domain=s.cluster_domain, cluster_networks=f"{s.pod_cidr},{s.service_cidr}",
            inbound_ports=[p.port for p in spec.ports], opaque_ports=ps.opaque_ports,
            log_level=None if ps.log_level == PodSettings().log_level else ps.log_level)}

    def _proxy_command(self, pod: Pod) -> tuple[list[str], dict[str, str]]:
        """The sidecar's argv and environment: tether's proxy, or linkerd2-proxy when the pod asks."""
        binary = pod.spec.settings.linkerd2_proxy
        if binary is None:
            return self._proxy_argv(pod), sidecar.proxy_env()
        uid = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"] \
            if self._as_proxy_uid(pod) else []
        return network.netns_exec(pod.netns, [*uid, binary]), self._linkerd2_proxy_env(pod)

    def _proxy_argv(self, pod: Pod) -> list[str]:
        s, spec, ps = self.s, pod.spec, pod.spec.settings
        rt = self._pod_runtime(pod)
        if spec.explicit:
            # Its inbound listener takes the address and port clients are given (no iptables to send
            # them to 4143) and hands connections to the application's own address.
            port = spec.ports[0].port if spec.ports else INBOUND_PORT
            listeners = ["--inbound-addr", f"{pod.ip}:{port}", "--outbound-addr", f"{pod.ip}:{OUTBOUND_PORT}",
                         "--admin-addr", f"{pod.ip}:{ADMIN_PORT}", "--inbound-app-addr", f"{pod.app_ip}:{port}",
                         "--tap-addr", f"{pod.ip}:{TAP_PORT}"]
            uid: list[str] = []
        else:
            listeners = ["--inbound-addr", f"0.0.0.0:{INBOUND_PORT}", "--outbound-addr",
                         f"127.0.0.1:{OUTBOUND_PORT}", "--admin-addr", f"0.0.0.0:{ADMIN_PORT}",
                         "--tap-addr", f"0.0.0.0:{TAP_PORT}"]
            uid = ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups"]
        argv = [*uid,
                *proxy_argv(*listeners,
                             "--log-level", ps.log_level,
                             "--identity-name", identity_name(spec.sa, spec.namespace, s),
                             "--identity-token-path", str(rt / "token"),
                             "--identity-trust-anchors", str(self.layout.runtime_dir(s) / "ca.crt"),
                             "--identity-addrs", ",".join(s.identity_addrs),
                             "--identity-svc-name", control_identity(IDENTITY_SA, s),
                             "--destination-addrs", ",".join(s.destination_addrs),
                             "--destination-svc-name", control_identity(DESTINATION_SA, s),
                             "--policy-svc-name", control_identity(DESTINATION_SA, s),
                             # Who is asking (the destination context, the inbound policy's workload)
                             # and where inbound policy comes from: the same destination controllers.
                             "--destination-context", json.dumps({"ns": spec.namespace, "pod": pod.name},
                                                                 separators=(",", ":")),
                             "--policy-addrs", ",".join(s.destination_addrs),
                             # The mesh's networks: the cluster-* default policies, and the original
                             # destinations whose profile says whether they are opaque.
                             "--cluster-networks", f"{s.pod_cidr},{s.service_cidr}",
                             "--shutdown-grace-period", "10s")]
        if ps.opaque_ports:
            argv += ["--opaque-ports", ",".join(ps.opaque_ports)]
        if ps.access_log:
            argv += ["--access-log", ps.access_log]  # written to the proxy's log (standard error)
        if ps.trace_collector_service_account:
            log.warning("pod %s/%s: spans go to %s over plaintext OTLP; the collector's identity (service account "
                        "%s) is not verified", spec.namespace, pod.name, ps.trace_collector,
                        ps.trace_collector_service_account)
        if ps.trace_collector:
            argv += ["--trace-collector", ps.trace_collector, "--trace-collector-protocol", ps.trace_collector_protocol,
                     "--trace-attributes", f"k8s.pod.name={pod.name},k8s.namespace.name={spec.namespace}"]
        return argv if spec.explicit else network.netns_exec(pod.netns, argv)

    def _app_env(self, pod: Pod) -> dict[str, str]:
        env = {**os.environ, "POD_NAME": pod.name, "POD_NAMESPACE": pod.spec.namespace,
               "POD_IP": pod.app_ip or pod.ip, "PYTHONUNBUFFERED": "1"}
        if pod.spec.explicit:
            env.update(explicit_env(pod.ip))
        return {**env, **pod.spec.env}

    def _app_argv(self, pod: Pod) -> list[str]:
        cmd = list(pod.spec.command)
        return cmd if pod.spec.explicit else network.netns_exec(pod.netns, cmd)

    async def _run_pod(self, pod: Pod) -> None:
        try:
            await self._run_pod_inner(pod)
        except Exception:  # one pod's bug must not take the supervisor and every other pod down
            log.exception("pod %s/%s failed", pod.spec.namespace, pod.name)

    async def _run_pod_inner(self, pod: Pod) -> None:
        logs = self.layout.pod_logs(pod.spec.namespace, pod.name)
        try:
            async with asyncio.TaskGroup() as tg:
                failed = ""
                async with self._starting:
                    if pod.stop.is_set():
                        return
                    try:
                        await asyncio.to_thread(self._create_pod, pod)
                    except (network.NetworkError, WorkloadError, OSError, ValueError) as e:
                        failed = str(e) or type(e).__name__
                    if not failed and pod.spec.settings.inject:
                        argv, env = self._proxy_command(pod)
                        pod.proxy = Supervised(f"{pod.name}/proxy", argv, logs / "proxy.log", env=env, grace=12)
                        tg.create_task(pod.proxy.run())
                        pod.phase = "WaitingForProxy"
                        if pod.spec.settings.proxy_await:
                            # A proxy that never gets ready must not hold a start slot for ever.
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(START_SLOT_TIMEOUT):
                                    await self._await_proxy(pod)
                if failed:
                    pod.phase, pod.message = "Failed", failed
                    log.error("pod %s/%s: %s", pod.spec.namespace, pod.name, failed)
                    await pod.stop.wait()
                    return
                if pod.proxy is not None and pod.spec.settings.proxy_await and not pod.proxy_ready:
                    await self._await_proxy(pod)
                if not pod.stop.is_set():
                    pod.app = Supervised(f"{pod.name}/app", self._app_argv(pod), logs / "app.log",
                                         env=self._app_env(pod), cwd=pod.spec.working_dir)
                    tg.create_task(pod.app.run())
                    await asyncio.to_thread(self.registry.update, self._workload(pod, addressed=True))
                    pod.phase = "Running"
                    if pod.ready_at is None and (pod.proxy_ready or pod.proxy is None):
                        pod.ready_at = time.time()
                await pod.stop.wait()
                pod.phase = "Terminating"
                if pod.app is not None:
                    # Out of the endpoints first, and a moment for clients' proxies to hear of it.
                    await asyncio.to_thread(self.registry.update, self._workload(pod, addressed=False))
                    await asyncio.sleep(ENDPOINT_DRAIN)
                # The application first; the proxy last, so the app's last requests still get out.
                if pod.app is not None:
                    pod.app.request_stop()
                    await pod.app.done.wait()
                if pod.proxy is not None:
                    pod.proxy.request_stop()
        finally:
            pod.phase = "Terminating"
            with contextlib.suppress(WorkloadError, OSError):
                self.registry.remove(pod.spec.namespace, pod.name)
            if pod.netns:
                await asyncio.to_thread(network.delete_pod_netns, pod.netns)
            shutil.rmtree(self._pod_runtime(pod), ignore_errors=True)
            if self.pods.get(pod.key) is pod:
                del self.pods[pod.key]
            if pod.spec.explicit:
                self._free_loopback.insert(0, (pod.ip, pod.app_ip))
            else:
                self._free_ips.insert(0, pod.ip)

    async def _await_proxy(self, pod: Pod) -> None:
        """proxy-await: hold the application until the proxy's /ready answers 200 (or the pod stops)."""
        deadline = time.monotonic() + PROXY_READY_TIMEOUT
        while not pod.stop.is_set():
            if await http_status(pod.ip, ADMIN_PORT, "/ready", timeout=0.5) == 200:
                pod.proxy_ready = True
                pod.ready_at = time.time()
                return
            if time.monotonic() > deadline:
                pod.message = f"proxy not ready after {PROXY_READY_TIMEOUT:g}s; application held back"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await pod.stop.wait()

    async def _stop_all_pods(self) -> None:
        for pod in self.pods.values():
            pod.stop.set()
        tasks = [p.task for p in self.pods.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=60)


def explicit_env(proxy_ip: str) -> dict[str, str]:
    """What points an --explicit pod's HTTP clients at its proxy."""
    url = f"http://{proxy_ip}:{OUTBOUND_PORT}"
    return {"HTTP_PROXY": url, "http_proxy": url, "NO_PROXY": "", "no_proxy": ""}


def add_route(layout: Layout, cidr: str, via: str) -> None:
    """Route another host's pod network via that host, forwarding on: recorded, so `down` undoes it."""
    try:
        doc = json.loads(layout.routes_path.read_text())
    except (OSError, ValueError):
        doc = {}
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    doc.setdefault("ipForward", forward.read_text().strip())
    forward.write_text("1\n")
    network.run_ip("route", "replace", cidr, "via", via)
    doc.setdefault("routes", {})[cidr] = via
    write_json(layout.routes_path, doc)


def undo_routes(layout: Layout) -> None:
    try:
        doc = json.loads(layout.routes_path.read_text())
    except (OSError, ValueError):
        return
    for cidr, via in doc.get("routes", {}).items():
        network.run_ip("route", "del", cidr, "via", via, check=False)
    if doc.get("ipForward") in ("0", "1"):
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/ipv4/ip_forward").write_text(doc["ipForward"] + "\n")
    layout.routes_path.unlink(missing_ok=True)


def teardown(layout: Layout, s: MeshSettings) -> None:
    """Remove the network and runtime files a mesh made (also what a crashed run left behind)."""
    undo_routes(layout)
    if not s.explicit_only:
        for ns in network.leftover_netns(s.netns_prefix):
            network.delete_pod_netns(ns)
        for d in network.leftover_netns_etc(s.netns_prefix):
            shutil.rmtree(d, ignore_errors=True)
        network.delete_leftover_veths(s.mesh_id)
        network.delete_bridge(s.bridge)
    shutil.rmtree(layout.runtime_dir(s), ignore_errors=True)
    with contextlib.suppress(OSError):
        layout.runtime_dir(s).parent.rmdir()  # only when no other mesh uses it


def iter_pids(status: dict[str, Any]) -> Iterator[int]:
    """Every child pid a status file names (for `tether down` after a supervisor that was killed)."""
    for c in status.get("components", []):
        if c.get("pid"):
            yield int(c["pid"])
    for p in status.get("pods", []):
        for k in ("appPid", "proxyPid"):
            if p.get(k):
                yield int(p[k])
    for a in status.get("addons", []):
        if a.get("pid"):
            yield int(a["pid"])


def serve(layout: Layout) -> int:
    """Run the supervisor in this process until SIGTERM; returns the exit status."""
    settings = layout.read_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    layout.pid_path.write_text(f"{os.getpid()}\n")
    sup = Supervisor(layout, settings)
    try:
        try:
            sup.prepare()
        except (network.NetworkError, OSError) as e:
            log.error("cannot set up the mesh's network: %s", e)
            sup.teardown()
            write_json(layout.status_path, {"error": f"cannot set up the mesh's network: {e}"})
            return 1
        asyncio.run(sup.run())
        write_json(layout.status_path, {"stopped": True})
        return 0
    finally:
        with contextlib.suppress(OSError):
            layout.pid_path.unlink()
