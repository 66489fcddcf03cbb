"""A local mesh made of real processes: an identity service, workloads with tokens, their proxies.

Used by the demo and the integration tests. Everything lives in one work directory; every
process is stopped by :meth:`LocalMesh.close`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.core.identity.names import DEFAULT_CONTROL_PLANE_NS, DEFAULT_TRUST_DOMAIN
from tether.platform.local.workloads import Workload, WorkloadRegistry
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for


@dataclass(frozen=True)
class MeshWorkload:
    name: str
    namespace: str
    identity: str
    token_path: Path


class LocalMesh:
    def __init__(self, work: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 control_plane_ns: str = DEFAULT_CONTROL_PLANE_NS) -> None:
        self.work = work
        self.trust_domain = trust_domain
        self.cp_ns = control_plane_ns
        self.state = work / "state"
        self.ca_dir = work / "ca"
        self.registry = WorkloadRegistry(self.state)
        self.procs: list[Proc] = []
        self.identity_addrs: list[str] = []
        self.identity_procs: dict[int, Proc] = {}
        self._identity_args: list[list[str]] = []
        self._identity_admin: list[str] = []

    @property
    def anchors(self) -> Path:
        return self.ca_dir / "ca.crt"

    def create_ca(self, issuer_lifetime: str | None = None) -> None:
        args = [sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(self.ca_dir),
                "--identity-trust-domain", self.trust_domain, "--controller-namespace", self.cp_ns]
        if issuer_lifetime:
            args += ["--issuer-lifetime", issuer_lifetime]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"create-ca failed: {r.stderr}")

    def start_identity(self, replicas: int = 1, *extra: str) -> list[Proc]:
        """Start identity service replicas over the same issuer; wait until each is ready."""
        started = []
        for _ in range(replicas):
            port, admin = free_port(), free_port()
            self.identity_addrs.append(f"127.0.0.1:{port}")
            self._identity_args.append([
                sys.executable, "-m", "tether", "controller", "identity",
                "--addr", f"127.0.0.1:{port}", "--admin-addr", f"127.0.0.1:{admin}",
                "--issuer-dir", str(self.ca_dir), "--state-dir", str(self.state),
                "--identity-trust-domain", self.trust_domain, "--controller-namespace", self.cp_ns, *extra])
            self._identity_admin.append(f"http://127.0.0.1:{admin}")
            started.append(self._launch_identity(len(self.identity_addrs) - 1))
        return started

    def _launch_identity(self, i: int) -> Proc:
        p = Proc(self._identity_args[i], self.work / f"identity-{i}-{len(self.procs)}.log")
        self.procs.append(p)
        self.identity_procs[i] = p
        url = self._identity_admin[i]
        try:
            wait_for(lambda: http_get(url + "/ready", timeout=1)[0] == 200, 20, what="identity service ready")
        except TimeoutError:
            raise TimeoutError(f"identity service not ready; log:\n{p.log()}") from None
        return p

    @property
    def identity_admin_urls(self) -> list[str]:
        return list(self._identity_admin)

    def stop_identity(self, i: int = 0) -> None:
        self.identity_procs[i].stop()

    def restart_identity(self, i: int = 0) -> Proc:
        """Start replica ``i`` again on the same address (after :meth:`stop_identity`)."""
        return self._launch_identity(i)

    def identity_name(self, sa: str, ns: str) -> str:
        return f"{sa}.{ns}.serviceaccount.identity.{self.cp_ns}.{self.trust_domain}"

    def workload(self, name: str, namespace: str = "default", service_account: str | None = None) -> MeshWorkload:
        sa = service_account or name
        self.registry.register(Workload(name=name, namespace=namespace, service_account=sa))
        return MeshWorkload(name, namespace, self.identity_name(sa, namespace),
                            self.registry.token_path(namespace, name))

    def proxy(self, w: MeshWorkload, ready: bool = True, **flags: Any) -> ProxyProc:
        flags.setdefault("log_level", "warn,tether=info")
        p = ProxyProc(self.work, name=f"proxy-{w.name}", identity_name=w.identity,
                      identity_token_path=str(w.token_path), identity_trust_anchors=str(self.anchors),
                      identity_addrs=",".join(self.identity_addrs), **flags)
        self.procs.append(p)
        if ready:
            p.wait_ready(30)
            self.record_admin(w, p)
        return p

    def record_admin(self, w: MeshWorkload, proxy: ProxyProc) -> None:
        """Write the proxy's admin address into the workload's registry entry (its token stays)."""
        current = self.registry.get(w.namespace, w.name)
        self.registry.update(dataclasses.replace(current, proxy_admin=f"{proxy.host}:{proxy.admin_port}"))

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(10)
        self.procs.clear()


_WEB_WITH_HEADER_ROUTE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: TARGET_PORT}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-headers, namespace: default}
spec:
  parentRefs: [{name: web, kind: Service, group: core, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: web-headers}]
      backendRefs: [{name: web, port: 80}]
"""


def web_with_header_route(target_port: int) -> str:
    """Resources for a local mesh: Service web (port 80 -> ``target_port``) and an HTTPRoute on it
    that sets ``x-route: web-headers`` (a route a proxy can only apply from the outbound policy)."""
    return _WEB_WITH_HEADER_ROUTE.replace("TARGET_PORT", str(target_port))
