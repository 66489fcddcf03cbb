"""A local workload's desired state (what `tether run` asks for) and its annotations, read like the
injector reads a pod's.

Pure: values in, typed settings or a :class:`SpecError` naming the field out. The supervisor turns
a :class:`WorkloadSpec` into replicas.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# The keys and their parsing are core/inject's: the local platform reads annotations as the injector does.
from tether.core.inject.annotations import (
    ACCESS_LOG,
    INJECT,
    LOG_LEVEL,
    OPAQUE_PORTS,
    PROXY_AWAIT,
    SKIP_INBOUND,
    SKIP_OUTBOUND,
    SKIP_SUBNETS,
    TRACE_COLLECTOR,
    TRACE_SVC_ACCOUNT,
    TRACE_SVC_ACCOUNT_SEED,
    AnnotationError,
    parse_collector,
    parse_log_level,
    parse_ports,
    parse_subnets,
)

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A label key: optional DNS-subdomain prefix and a name (Kubernetes' rule).
_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

# The proxy's admin and tap ports are never redirected inbound (linkerd-init's defaults).
PROXY_IGNORED_INBOUND = ("4190", "4191")
MAX_REPLICAS = 256

TRACE_COLLECTOR_PROTOCOL = "config.linkerd.io/trace-collector-protocol"  # tether's: grpc | http (OTLP)
# The pod's proxy is Linkerd's linkerd2-proxy at this path (tether.platform.local.linkerd2).
LINKERD2_PROXY = "local.tether.io/linkerd2-proxy"
SUPPORTED_ANNOTATIONS = (ACCESS_LOG, INJECT, LOG_LEVEL, OPAQUE_PORTS, PROXY_AWAIT, SKIP_INBOUND, SKIP_OUTBOUND,
                         SKIP_SUBNETS, TRACE_COLLECTOR, TRACE_COLLECTOR_PROTOCOL, TRACE_SVC_ACCOUNT,
                         TRACE_SVC_ACCOUNT_SEED, LINKERD2_PROXY)


class SpecError(ValueError):
    """A workload definition is invalid; the message names the field and the value."""


@dataclass(frozen=True)
class PodSettings:
    """What the annotations change in a pod: the proxy's flags and proxy-init's."""

    inject: bool = True
    proxy_await: bool = True
    log_level: str = "warn,tether=info"
    opaque_ports: tuple[str, ...] = ()
    skip_inbound_ports: tuple[str, ...] = ()
    skip_outbound_ports: tuple[str, ...] = ()
    skip_subnets: tuple[str, ...] = ()
    access_log: str | None = None  # apache | json
    trace_collector: str | None = None  # host:port of an OTLP collector
    trace_collector_protocol: str = "grpc"
    trace_collector_service_account: str | None = None
    linkerd2_proxy: str | None = None  # path of a linkerd2-proxy binary to run instead of tether's proxy


def _ports(value: str, key: str) -> tuple[str, ...]:
    try:
        return parse_ports(value, key)
    except AnnotationError as e:
        raise SpecError(str(e)) from None


def _subnets(value: str, key: str) -> tuple[str, ...]:
    try:
        return parse_subnets(value, key)
    except AnnotationError as e:
        raise SpecError(str(e)) from None


def _switch(value: str, key: str) -> bool:
    if value not in ("enabled", "disabled"):
        raise SpecError(f"annotation {key}: {value!r} must be enabled or disabled")
    return value == "enabled"


def pod_settings(annotations: Mapping[str, str]) -> PodSettings:
    """The settings the annotations ask for; an unknown linkerd.io annotation or a bad value is refused."""
    s = PodSettings()
    for key, value in sorted(annotations.items()):
        if key == OPAQUE_PORTS:
            s = replace(s, opaque_ports=_ports(value, key))
        elif key == SKIP_INBOUND:
            s = replace(s, skip_inbound_ports=_ports(value, key))
        elif key == SKIP_OUTBOUND:
            s = replace(s, skip_outbound_ports=_ports(value, key))
        elif key == SKIP_SUBNETS:
            s = replace(s, skip_subnets=_subnets(value, key))
        elif key == LOG_LEVEL:
            try:
                s = replace(s, log_level=parse_log_level(value, key))
            except AnnotationError as e:
                raise SpecError(str(e)) from None
        elif key == PROXY_AWAIT:
            s = replace(s, proxy_await=_switch(value, key))
        elif key == INJECT:
            s = replace(s, inject=_switch(value, key))
        elif key == ACCESS_LOG:
            if value not in ("apache", "json"):
                raise SpecError(f"annotation {key}: {value!r} must be apache or json")
            s = replace(s, access_log=value)
        elif key == TRACE_COLLECTOR:
            try:
                s = replace(s, trace_collector=parse_collector(value, key))
            except AnnotationError as e:
                raise SpecError(str(e)) from None
        elif key == TRACE_COLLECTOR_PROTOCOL:
            if value not in ("grpc", "http"):
                raise SpecError(f"annotation {key}: {value!r} must be grpc or http (OTLP)")
            s = replace(s, trace_collector_protocol=value)
        elif key in (TRACE_SVC_ACCOUNT, TRACE_SVC_ACCOUNT_SEED):
            if not _LABEL.match(value):
                raise SpecError(f"annotation {key}: {value!r} is not a service account name")
            s = replace(s, trace_collector_service_account=value)
        elif key == LINKERD2_PROXY:
            if not value.startswith("/") or "\x00" in value:
                raise SpecError(f"annotation {key}: {value!r} must be the absolute path of a linkerd2-proxy binary")
            s = replace(s, linkerd2_proxy=value)
        elif key.split("/", 1)[0].endswith(("linkerd.io", "tether.io")):
            raise SpecError(f"annotation {key}: not supported by the local platform "
                            f"(supported: {', '.join(SUPPORTED_ANNOTATIONS)})")
        elif not _KEY.match(key):
            raise SpecError(f"annotation {key!r}: not a valid annotation key")
    return s


@dataclass(frozen=True)
class PortSpec:
    port: int
    name: str | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    namespace: str
    command: tuple[str, ...]
    service_account: str = ""
    ports: tuple[PortSpec, ...] = ()
    replicas: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = "/"
    # No network namespace: the proxy on loopback addresses, the application told HTTP_PROXY.
    explicit: bool = False

    def __post_init__(self) -> None:
        if not self.service_account:
            object.__setattr__(self, "service_account", self.name)  # one spelling: equal specs compare equal
        for what, value in (("name", self.name), ("namespace", self.namespace),
                            ("service account", self.service_account or self.name)):
            if not _LABEL.match(value):
                raise SpecError(f"{what} {value!r} is not a DNS label (1-63 of a-z, 0-9, '-')")
        # Pod names are NAME-<index>: keep room for the suffix.
        if len(self.name) > 58:
            raise SpecError(f"name {self.name!r} is longer than 58 characters (pods are named NAME-INDEX)")
        if not self.command:
            raise SpecError("no command: give the workload's command after --, e.g. tether run web -- python app.py")
        if not 0 <= self.replicas <= MAX_REPLICAS:
            raise SpecError(f"replicas {self.replicas}: must be 0-{MAX_REPLICAS}")
        seen: set[int] = set()
        for p in self.ports:
            if not 0 < p.port < 65536:
                raise SpecError(f"port {p.port}: out of range 1-65535")
            if p.port in (4140, 4143, 4190, 4191):
                raise SpecError(f"port {p.port}: used by the pod's proxy (4140, 4143, 4190, 4191)")
            if p.port in seen:
                raise SpecError(f"port {p.port}: given twice")
            seen.add(p.port)
        for k, v in self.labels.items():
            if not _KEY.match(k):
                raise SpecError(f"label {k!r}: not a valid label key")
            if not _VALUE.match(v):
                raise SpecError(f"label {k}={v!r}: not a valid label value (63 of A-Z, a-z, 0-9, '-', '_', '.')")
        pod_settings(self.annotations)
        if self.explicit and pod_settings(self.annotations).linkerd2_proxy:
            raise SpecError(f"--explicit: not with annotation {LINKERD2_PROXY} (linkerd2-proxy takes its "
                            "connections' targets from iptables, which an --explicit pod has not)")
        if self.explicit and len(self.ports) > 1:
            raise SpecError("--explicit: one --port at most (the proxy's inbound listener stands in for it)")

    @property
    def sa(self) -> str:
        return self.service_account or self.name

    @property
    def settings(self) -> PodSettings:
        return pod_settings(self.annotations)

    @property
    def pod_labels(self) -> dict[str, str]:
        return {"app": self.name, **self.labels}

    def pod_name(self, index: int) -> str:
        return f"{self.name}-{index}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "namespace": self.namespace, "serviceAccount": self.sa,
            "command": list(self.command), "replicas": self.replicas,
            "ports": [{"port": p.port, **({"name": p.name} if p.name else {})} for p in self.ports],
            "labels": dict(self.labels), "annotations": dict(self.annotations), "env": dict(self.env),
            "workingDir": self.working_dir, **({"explicit": True} if self.explicit else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> WorkloadSpec:
        try:
            return cls(
                name=str(d["name"]), namespace=str(d["namespace"]),
                command=tuple(str(c) for c in d["command"]),
                service_account=str(d.get("serviceAccount") or ""),
                ports=tuple(PortSpec(int(p["port"]), p.get("name")) for p in d.get("ports") or ()),
                replicas=int(d.get("replicas", 1)),
                labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
                annotations={str(k): str(v) for k, v in (d.get("annotations") or {}).items()},
                env={str(k): str(v) for k, v in (d.get("env") or {}).items()},
                working_dir=str(d.get("workingDir") or "/"),
                explicit=bool(d.get("explicit", False)),
            )
        except SpecError as e:
            raise SpecError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"{source}: not a workload spec ({e!r})") from None


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def parse_port(text: str) -> PortSpec:
    num, _, name = text.partition(":")
    if not num.isdigit() or not 0 < int(num) < 65536:
        raise SpecError(f"--port {text!r}: expected PORT or PORT:NAME with PORT 1-65535")
    if name and not _LABEL.match(name):
        raise SpecError(f"--port {text!r}: the name must be a DNS label")
    return PortSpec(int(num), name or None)
