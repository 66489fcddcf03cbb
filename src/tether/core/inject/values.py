"""The chart values the sidecar is built from (Linkerd's value keys), read into one typed object.

The chart's ``values.yaml`` holds the defaults; callers merge the user's values over them
(:func:`merge`) and hand the result to :meth:`InjectValues.from_values`. The injector, ``tether
inject`` and the chart's own control-plane pods all build the proxy from this object, so they agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The audience of the projected service-account token the proxy sends to identity (Linkerd's, so a
# Linkerd proxy and tether's identity service understand each other).
TOKEN_AUDIENCE = "identity.l5d.io"
# The control plane's own service accounts (Linkerd's names). Their identities are what proxies require
# of the services' certificates; the policy service is the destination's process, so its name too.
IDENTITY_SERVICE_ACCOUNT = "linkerd-identity"
DESTINATION_SERVICE_ACCOUNT = "linkerd-destination"


class ValuesError(ValueError):
    """A value has the wrong type or an impossible value; the message names its key."""


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` recursively (maps merge, anything else replaces), as Helm does."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _get(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValuesError(f"value {path}: missing (the chart's values.yaml sets it)")
        node = node[part]
    return node


def _str(values: Mapping[str, Any], path: str) -> str:
    v = _get(values, path)
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise ValuesError(f"value {path}: {v!r} is not a string")
    return str(v)


def _opt_str(values: Mapping[str, Any], path: str) -> str:
    try:
        return _str(values, path)
    except ValuesError as e:
        if "missing" in str(e):
            return ""
        raise


def _int(values: Mapping[str, Any], path: str) -> int:
    v = _get(values, path)
    if isinstance(v, bool) or not isinstance(v, int | float) or int(v) != v:
        raise ValuesError(f"value {path}: {v!r} is not an integer")
    return int(v)


def _bool(values: Mapping[str, Any], path: str) -> bool:
    v = _get(values, path)
    if not isinstance(v, bool):
        raise ValuesError(f"value {path}: {v!r} is not true or false")
    return v


@dataclass(frozen=True)
class Resources:
    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""
    ephemeral_request: str = ""
    ephemeral_limit: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, Any], path: str) -> Resources:
        return cls(
            cpu_request=_opt_str(values, f"{path}.cpu.request"),
            cpu_limit=_opt_str(values, f"{path}.cpu.limit"),
            memory_request=_opt_str(values, f"{path}.memory.request"),
            memory_limit=_opt_str(values, f"{path}.memory.limit"),
            ephemeral_request=_opt_str(values, f"{path}.ephemeral-storage.request"),
            ephemeral_limit=_opt_str(values, f"{path}.ephemeral-storage.limit"),
        )

    def to_k8s(self) -> dict[str, dict[str, str]]:
        """A container's ``resources`` (empty values left out)."""
        out: dict[str, dict[str, str]] = {}
        for kind, name, value in (
            ("requests", "cpu", self.cpu_request), ("limits", "cpu", self.cpu_limit),
            ("requests", "memory", self.memory_request), ("limits", "memory", self.memory_limit),
            ("requests", "ephemeral-storage", self.ephemeral_request),
            ("limits", "ephemeral-storage", self.ephemeral_limit),
        ):
            if value:
                out.setdefault(kind, {})[name] = value
        return out


@dataclass(frozen=True)
class InjectValues:
    """Everything the sidecar depends on, from the control plane's values."""

    namespace: str
    version: str
    cluster_domain: str
    trust_domain: str
    trust_anchors_pem: str
    cluster_networks: str
    proxy_image: str
    proxy_version: str
    proxy_pull_policy: str
    init_image: str
    init_version: str
    init_pull_policy: str
    log_level: str
    log_format: str
    admin_port: int
    control_port: int
    inbound_port: int
    outbound_port: int
    uid: int
    gid: int  # -1: not set
    resources: Resources
    init_resources: Resources
    proxy_await: bool
    native_sidecar: bool
    opaque_ports: str
    default_inbound_policy: str
    outbound_connect_timeout: str
    inbound_connect_timeout: str
    outbound_cache_timeout: str
    shutdown_grace_period: str
    enable_admin_shutdown: bool
    wait_before_exit: int
    ignore_inbound_ports: str
    ignore_outbound_ports: str
    skip_subnets: str
    init_run_as_root: bool
    init_run_as_user: int
    iptables_mode: str

    @classmethod
    def from_values(cls, values: Mapping[str, Any], namespace: str, version: str) -> InjectValues:
        """The values (defaults already merged in) of a control plane installed in ``namespace``."""
        trust_domain = _str(values, "identityTrustDomain") or _str(values, "clusterDomain")
        proxy_version = _str(values, "proxy.image.version") or version
        init_resources = Resources.from_values(values, "proxy.resources")
        # proxyInit.resources: the seeds set it (004); Linkerd ignores it since 2.16, tether applies it.
        if isinstance(values.get("proxyInit"), Mapping) and values["proxyInit"].get("resources"):
            init_resources = Resources.from_values(values, "proxyInit.resources")
        return cls(
            namespace=namespace,
            version=version,
            cluster_domain=_str(values, "clusterDomain"),
            trust_domain=trust_domain,
            trust_anchors_pem=_str(values, "identityTrustAnchorsPEM"),
            cluster_networks=_str(values, "clusterNetworks"),
            proxy_image=_str(values, "proxy.image.name"),
            proxy_version=proxy_version,
            proxy_pull_policy=_str(values, "proxy.image.pullPolicy") or _str(values, "imagePullPolicy"),
            init_image=_str(values, "proxyInit.image.name"),
            init_version=_str(values, "proxyInit.image.version") or version,
            init_pull_policy=_str(values, "proxyInit.image.pullPolicy") or _str(values, "imagePullPolicy"),
            log_level=_str(values, "proxy.logLevel"),
            log_format=_str(values, "proxy.logFormat"),
            admin_port=_int(values, "proxy.ports.admin"),
            control_port=_int(values, "proxy.ports.control"),
            inbound_port=_int(values, "proxy.ports.inbound"),
            outbound_port=_int(values, "proxy.ports.outbound"),
            uid=_int(values, "proxy.uid"),
            gid=_int(values, "proxy.gid"),
            resources=Resources.from_values(values, "proxy.resources"),
            init_resources=init_resources,
            proxy_await=_bool(values, "proxy.await"),
            native_sidecar=_bool(values, "proxy.nativeSidecar"),
            opaque_ports=_str(values, "proxy.opaquePorts"),
            default_inbound_policy=_str(values, "proxy.defaultInboundPolicy"),
            outbound_connect_timeout=_str(values, "proxy.outboundConnectTimeout"),
            inbound_connect_timeout=_str(values, "proxy.inboundConnectTimeout"),
            outbound_cache_timeout=_str(values, "proxy.outboundDiscoveryCacheUnusedTimeout"),
            shutdown_grace_period=_str(values, "proxy.shutdownGracePeriod"),
            enable_admin_shutdown=_bool(values, "proxy.enableShutdownEndpoint"),
            wait_before_exit=_int(values, "proxy.waitBeforeExitSeconds"),
            ignore_inbound_ports=_str(values, "proxyInit.ignoreInboundPorts"),
            ignore_outbound_ports=_str(values, "proxyInit.ignoreOutboundPorts"),
            skip_subnets=_str(values, "proxyInit.skipSubnets"),
            init_run_as_root=_bool(values, "proxyInit.runAsRoot"),
            init_run_as_user=_int(values, "proxyInit.runAsUser"),
            iptables_mode=_str(values, "proxyInit.iptablesMode"),
        )

    def service(self, name: str, port: int) -> str:
        """A control-plane Service's address, as proxies dial it."""
        return f"{name}.{self.namespace}.svc.{self.cluster_domain}:{port}"

    def control_identity(self, service_account: str) -> str:
        """The TLS identity of a control-plane service running as ``service_account``."""
        return f"{service_account}.{self.namespace}.serviceaccount.identity.{self.namespace}.{self.trust_domain}"
