"""The destination service's view of the store, and name resolution over it (pure: no I/O, no gRPC).

:class:`World` is an immutable snapshot of every kind the service reads. Resolution follows cluster
DNS: ``web.prod.svc.cluster.local``, ``web.prod.svc``, ``web.prod`` and (with the caller's namespace
from the context token) ``web`` all name Service prod/web; a Service's cluster IP names it too, and a
workload's own address names that single endpoint.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tether.core.resources import Resource
from tether.core.resources.core import ExternalWorkload, Service, ServicePort, Workload
from tether.core.resources.events import KindState

DEFAULT_CLUSTER_DOMAIN = "cluster.local"


class LookupError_(Exception):
    """An authority that cannot be resolved; the message says why (for NOT_FOUND / INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class World:
    """Every kind's current objects (by kind name, then (namespace, name))."""

    kinds: Mapping[str, KindState] = field(default_factory=dict)
    # Indexes built on first use; a World never changes, so they never go stale.
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def by_label(self) -> dict[tuple[str, str, str], list[Workload | ExternalWorkload]]:
        """(namespace, label key, label value) -> the workloads carrying that label, in name order."""
        idx: dict[tuple[str, str, str], list[Workload | ExternalWorkload]] | None = self._cache.get("by_label")
        if idx is None:
            idx = {}
            for kind in ("Workload", "ExternalWorkload"):
                for (ns, _), w in sorted(self.of(kind).items()):
                    assert isinstance(w, Workload | ExternalWorkload)
                    for k, v in w.metadata.labels.items():
                        idx.setdefault((ns, k, v), []).append(w)
            self._cache["by_label"] = idx
        return idx

    def by_ip(self) -> dict[str, Resource]:
        """Service cluster IPs and workload addresses -> the object (a Service wins over a workload)."""
        idx: dict[str, Resource] | None = self._cache.get("by_ip")
        if idx is None:
            idx = {}
            for kind in ("ExternalWorkload", "Workload"):
                for w in self.of(kind).values():
                    for ip in workload_ips(w):
                        idx[ip] = w
            for svc in self.of("Service").values():
                assert isinstance(svc, Service)
                for cip in {svc.spec.cluster_ip or "", *svc.spec.cluster_ips} - {"", "None"}:
                    try:
                        idx[str(ipaddress.ip_address(cip))] = svc
                    except ValueError:
                        continue
            self._cache["by_ip"] = idx
        return idx

    def of(self, kind: str) -> KindState:
        return self.kinds.get(kind, {})

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        return self.of(kind).get((namespace, name))

    def in_namespace(self, kind: str, namespace: str) -> list[Resource]:
        return [r for (ns, _), r in sorted(self.of(kind).items()) if ns == namespace]

    def replace(self, kind: str, state: KindState) -> World:
        kinds = dict(self.kinds)
        kinds[kind] = state
        return World(kinds)


@dataclass(frozen=True, slots=True)
class Target:
    """What an authority resolved to: a Service port, or one workload's address."""

    host: str
    port: int
    service: Service | None = None
    service_port: ServicePort | None = None
    workload: Workload | ExternalWorkload | None = None
    address: str | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """The caller, from the context token (Linkerd's proxies send JSON ``{"ns": ..., "pod": ...}``)."""

    namespace: str | None = None
    pod: str | None = None

    @staticmethod
    def parse(token: str) -> Context:
        if not token:
            return Context()
        try:
            doc: Any = json.loads(token)
        except ValueError:
            # Older proxies: "ns:<namespace>"
            if token.startswith("ns:"):
                return Context(namespace=token[3:] or None)
            return Context()
        if not isinstance(doc, dict):
            return Context()
        ns, pod = doc.get("ns"), doc.get("pod")
        return Context(ns if isinstance(ns, str) else None, pod if isinstance(pod, str) else None)


def split_authority(authority: str) -> tuple[str, int]:
    """("host", port) from "host:port" (port 80 when absent); LookupError_ when malformed."""
    a = authority.strip()
    if not a:
        raise LookupError_("empty authority: want host:port, e.g. web.prod.svc.cluster.local:80")
    if a.startswith("["):
        host, _, rest = a[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif a.count(":") == 1:
        host, port_text = a.split(":")
    else:
        host, port_text = a, ""
    if not port_text:
        return host.lower().rstrip("."), 80
    try:
        port = int(port_text)
    except ValueError:
        raise LookupError_(f"authority {authority!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise LookupError_(f"authority {authority!r}: port {port} is out of range")
    return host.lower().rstrip("."), port


def service_fqdn(svc: Resource, domain: str = DEFAULT_CLUSTER_DOMAIN) -> str:
    return f"{svc.name}.{svc.namespace}.svc.{domain}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def candidates(host: str, ctx: Context, domain: str = DEFAULT_CLUSTER_DOMAIN) -> list[tuple[str, str]]:
    """(namespace, service) pairs ``host`` may mean, in the order cluster DNS's search path tries them."""
    labels = host.split(".")
    out: list[tuple[str, str]] = []
    full_suffix = ["svc", *domain.split(".")]
    # Absolute: name.ns.svc.<domain>
    if len(labels) == 2 + len(full_suffix) and labels[2:] == full_suffix:
        return [(labels[1], labels[0])]
    # The search path of a pod in ctx.namespace: <ns>.svc.<domain>, svc.<domain>, <domain>.
    if len(labels) == 1 and ctx.namespace:
        out.append((ctx.namespace, labels[0]))
    if len(labels) == 2:
        out.append((labels[1], labels[0]))
    if len(labels) == 3 and labels[2] == "svc":
        out.append((labels[1], labels[0]))
    return out


def resolve(world: World, authority: str, ctx: Context, domain: str = DEFAULT_CLUSTER_DOMAIN) -> Target:
    """The target an authority names; LookupError_ when it names nothing tether knows."""
    host, port = split_authority(authority)
    if _is_ip(host):
        ip = str(ipaddress.ip_address(host))
        found = world.by_ip().get(ip)
        if isinstance(found, Service):
            return _service_target(found, host, port)
        if isinstance(found, Workload | ExternalWorkload):
            return Target(host, port, workload=found, address=ip)
        raise LookupError_(f"no Service or workload has address {ip}")
    for ns, name in candidates(host, ctx, domain):
        found = world.get("Service", ns, name)
        if found is not None:
            assert isinstance(found, Service)
            return _service_target(found, host, port)
    if not candidates(host, ctx, domain):
        raise LookupError_(
            f"{host!r} is not a cluster service name (want name.namespace.svc.{domain}, or a short form "
            "resolvable from the caller's namespace)"
        )
    raise LookupError_(f"no Service named by {host!r}")


def _service_target(svc: Service, host: str, port: int) -> Target:
    for p in svc.spec.ports:
        if p.port == port:
            return Target(host, port, service=svc, service_port=p)
    return Target(host, port, service=svc, service_port=None)


def workload_ips(w: Resource) -> list[str]:
    # Addresses are canonical already (the models normalise them when decoding).
    if isinstance(w, Workload):
        return list(w.spec.addresses)
    if isinstance(w, ExternalWorkload):
        return [i.ip for i in w.spec.workload_ips]
    return []


def selected(world: World, svc: Service) -> list[Workload | ExternalWorkload]:
    """The ready workloads a Service's selector picks (none for a selector-less Service)."""
    sel = svc.spec.selector
    if not sel:
        return []
    idx = world.by_label()
    # Start from the rarest label of the selector, then check the others.
    candidates = min((idx.get((svc.namespace, k, v), []) for k, v in sel.items()), key=len)
    return [
        w
        for w in candidates
        if all(w.metadata.labels.get(k) == v for k, v in sel.items())
        and not (isinstance(w, Workload) and not w.spec.ready)
    ]


def target_port(w: Workload | ExternalWorkload, port: ServicePort) -> int | None:
    """The workload port a Service port forwards to (a named targetPort resolved on the workload)."""
    t = port.target
    if isinstance(t, int):
        return t
    for p in w.spec.ports:
        if p.name == t:
            return p.port
    return None


def annotation(world: World, obj: Resource, key: str) -> str | None:
    """An annotation on the object, else on its Namespace (Linkerd's inheritance for config.*)."""
    v = obj.metadata.annotations.get(key)
    if v is not None:
        return v
    ns = world.get("Namespace", "", obj.namespace)
    return ns.metadata.annotations.get(key) if ns is not None else None


def opaque_ports(world: World, obj: Resource) -> set[int]:
    """Ports listed in config.linkerd.io/opaque-ports ("3306,5432" or ranges "4000-4010")."""
    return ports_annotation(world, obj, "config.linkerd.io/opaque-ports")


def ports_annotation(world: World, obj: Resource, key: str) -> set[int]:
    """Ports listed in a ports annotation ("3306,5432" or ranges "4000-4010") on the object or its Namespace."""
    raw = annotation(world, obj, key) or ""
    out: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            continue
        out.update(range(a, b + 1))
    return out
