"""The annotations that change a pod's proxy, read one way for Kubernetes and the local platform.

Pure: a mapping of annotations in, a :class:`ProxyOverrides` (only what the annotations set) or an
:class:`AnnotationError` naming the annotation and the value out. Keys are Linkerd's
(``config.linkerd.io/*``, ``config.alpha.linkerd.io/*``), so a workload annotated for Linkerd is
read unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from tether.core.durations import parse_duration

INJECT = "linkerd.io/inject"
ADMISSION_WEBHOOKS = "config.linkerd.io/admission-webhooks"  # a namespace *label*
OPAQUE_PORTS = "config.linkerd.io/opaque-ports"
SKIP_INBOUND = "config.linkerd.io/skip-inbound-ports"
SKIP_OUTBOUND = "config.linkerd.io/skip-outbound-ports"
SKIP_SUBNETS = "config.linkerd.io/skip-subnets"
LOG_LEVEL = "config.linkerd.io/proxy-log-level"
LOG_FORMAT = "config.linkerd.io/proxy-log-format"
PROXY_AWAIT = "config.linkerd.io/proxy-await"
PROXY_IMAGE = "config.linkerd.io/proxy-image"
PROXY_VERSION = "config.linkerd.io/proxy-version"
PULL_POLICY = "config.linkerd.io/image-pull-policy"
INIT_IMAGE = "config.linkerd.io/init-image"
INIT_IMAGE_VERSION = "config.linkerd.io/init-image-version"
CPU_REQUEST = "config.linkerd.io/proxy-cpu-request"
CPU_LIMIT = "config.linkerd.io/proxy-cpu-limit"
MEMORY_REQUEST = "config.linkerd.io/proxy-memory-request"
MEMORY_LIMIT = "config.linkerd.io/proxy-memory-limit"
EPHEMERAL_REQUEST = "config.linkerd.io/proxy-ephemeral-storage-request"
EPHEMERAL_LIMIT = "config.linkerd.io/proxy-ephemeral-storage-limit"
PROXY_UID = "config.linkerd.io/proxy-uid"
PROXY_GID = "config.linkerd.io/proxy-gid"
INBOUND_PORT = "config.linkerd.io/inbound-port"
OUTBOUND_PORT = "config.linkerd.io/outbound-port"
ADMIN_PORT = "config.linkerd.io/admin-port"
CONTROL_PORT = "config.linkerd.io/control-port"
OUTBOUND_CONNECT_TIMEOUT = "config.linkerd.io/proxy-outbound-connect-timeout"
INBOUND_CONNECT_TIMEOUT = "config.linkerd.io/proxy-inbound-connect-timeout"
OUTBOUND_CACHE_TIMEOUT = "config.linkerd.io/proxy-outbound-discovery-cache-unused-timeout"
DEFAULT_INBOUND_POLICY = "config.linkerd.io/default-inbound-policy"
SHUTDOWN_GRACE = "config.linkerd.io/shutdown-grace-period"
ADMIN_SHUTDOWN = "config.linkerd.io/proxy-admin-shutdown"
NATIVE_SIDECAR = "config.alpha.linkerd.io/proxy-enable-native-sidecar"
ACCESS_LOG = "config.linkerd.io/access-log"
TRACE_COLLECTOR = "config.linkerd.io/trace-collector"
TRACE_SVC_ACCOUNT_SEED = "config.linkerd.io/trace-collector-svc-account"  # the seeds' spelling (004)
TRACE_SVC_ACCOUNT = "config.alpha.linkerd.io/trace-collector-service-account"
WAIT_BEFORE_EXIT = "config.alpha.linkerd.io/proxy-wait-before-exit-seconds"

DEFAULT_POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-authenticated",
                    "cluster-unauthenticated", "deny", "audit")
# Accepted, but not (fully) honoured: injection goes on and says so (never silently).
NOT_HONOURED = {
    TRACE_SVC_ACCOUNT: "the collector's identity is not checked: spans are exported in plaintext",
    TRACE_SVC_ACCOUNT_SEED: "the collector's identity is not checked: spans are exported in plaintext "
                            f"(and Linkerd's key is {TRACE_SVC_ACCOUNT})",
}
_LOG_LEVEL = re.compile(r"^[a-z_][a-z0-9_:.,=\-]*$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*$")


class AnnotationError(ValueError):
    """An annotation's value is invalid; the message names the annotation, the value and the fix."""


@dataclass(frozen=True)
class ProxyOverrides:
    """What a pod's (or its namespace's) annotations ask for; None means "not set here"."""

    inject: str | None = None  # enabled | disabled | ingress
    opaque_ports: tuple[str, ...] | None = None
    skip_inbound_ports: tuple[str, ...] | None = None
    skip_outbound_ports: tuple[str, ...] | None = None
    skip_subnets: tuple[str, ...] | None = None
    log_level: str | None = None
    log_format: str | None = None
    proxy_await: bool | None = None
    proxy_image: str | None = None
    proxy_version: str | None = None
    pull_policy: str | None = None
    init_image: str | None = None
    init_image_version: str | None = None
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None
    ephemeral_request: str | None = None
    ephemeral_limit: str | None = None
    uid: int | None = None
    gid: int | None = None
    inbound_port: int | None = None
    outbound_port: int | None = None
    admin_port: int | None = None
    control_port: int | None = None
    outbound_connect_timeout: str | None = None
    inbound_connect_timeout: str | None = None
    outbound_cache_timeout: str | None = None
    default_inbound_policy: str | None = None
    shutdown_grace_period: str | None = None
    admin_shutdown: bool | None = None
    native_sidecar: bool | None = None
    wait_before_exit: int | None = None
    access_log: str | None = None  # apache | json
    trace_collector: str | None = None  # host:port of an OTLP (gRPC) collector

    def over(self, base: ProxyOverrides) -> ProxyOverrides:
        """These overrides on top of ``base`` (a pod's over its namespace's)."""
        changes = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(base, **changes)


def parse_ports(value: str, key: str) -> tuple[str, ...]:
    """A comma-separated list of ports and ranges (``8080,5000-5010``), checked, as written."""
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or not 0 < int(lo) <= int(hi or lo) <= 65535:
            hint = ""
            try:
                ipaddress.ip_network(part, strict=False)
                hint = "; loopback is never redirected, and IP ranges go in " + SKIP_SUBNETS
            except ValueError:
                pass
            raise AnnotationError(f"annotation {key}: {part!r} is not a port (1-65535) or a range like "
                                  f"5000-5010{hint}")
        out.append(part)
    return tuple(out)


def parse_subnets(value: str, key: str) -> tuple[str, ...]:
    out = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise AnnotationError(f"annotation {key}: {part!r} is not a network like 10.0.0.0/8") from None
    return tuple(out)


def parse_switch(value: str, key: str) -> bool:
    if value not in ("enabled", "disabled", "true", "false"):
        raise AnnotationError(f"annotation {key}: {value!r} must be enabled or disabled")
    return value in ("enabled", "true")


def parse_log_level(value: str, key: str) -> str:
    if not _LOG_LEVEL.match(value):
        raise AnnotationError(f"annotation {key}: {value!r} is not a log level spec like warn,linkerd=info")
    return value


def _port(value: str, key: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise AnnotationError(f"annotation {key}: {value!r} is not a port (1-65535)")
    return int(value)


def parse_collector(value: str, key: str) -> str:
    """An OTLP collector's host:port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise AnnotationError(f"annotation {key}: {value!r} is not host:port (e.g. collector.linkerd-jaeger:4317)")
    return value


def _id(value: str, key: str) -> int:
    if not value.isdigit() or int(value) > 2**31 - 1:
        raise AnnotationError(f"annotation {key}: {value!r} is not a user or group id (0-2147483647)")
    return int(value)


def _quantity(value: str, key: str) -> str:
    if not _QUANTITY.match(value):
        raise AnnotationError(f"annotation {key}: {value!r} is not a quantity like 100m, 1, 64Mi")
    return value


def _duration(value: str, key: str) -> str:
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise AnnotationError(f"annotation {key}: {value!r} is not a duration like 500ms, 5s, 1m")
    # The proxy reads one number and one unit: Go's compound forms (1m30s) are given to it in ms.
    return value if re.fullmatch(r"[0-9]+(\.[0-9]+)?(ms|s|m|h)", value) else f"{seconds * 1000:g}ms"


def _image(value: str, key: str) -> str:
    if not _IMAGE.match(value):
        raise AnnotationError(f"annotation {key}: {value!r} is not an image name")
    return value


def _choice(options: tuple[str, ...]) -> object:
    def check(value: str, key: str) -> str:
        if value not in options:
            raise AnnotationError(f"annotation {key}: {value!r} must be one of {', '.join(options)}")
        return value

    return check


def _inject(value: str, key: str) -> str:
    if value not in ("enabled", "disabled", "ingress"):
        raise AnnotationError(f"annotation {key}: {value!r} must be enabled, disabled or ingress")
    return value


def _seconds(value: str, key: str) -> int:
    if not value.isdigit():
        raise AnnotationError(f"annotation {key}: {value!r} is not a number of seconds")
    return int(value)


# annotation -> (ProxyOverrides field, parser)
READERS: dict[str, tuple[str, object]] = {
    INJECT: ("inject", _inject),
    OPAQUE_PORTS: ("opaque_ports", parse_ports),
    SKIP_INBOUND: ("skip_inbound_ports", parse_ports),
    SKIP_OUTBOUND: ("skip_outbound_ports", parse_ports),
    SKIP_SUBNETS: ("skip_subnets", parse_subnets),
    LOG_LEVEL: ("log_level", parse_log_level),
    LOG_FORMAT: ("log_format", _choice(("plain", "json"))),
    PROXY_AWAIT: ("proxy_await", parse_switch),
    PROXY_IMAGE: ("proxy_image", _image),
    PROXY_VERSION: ("proxy_version", _image),
    PULL_POLICY: ("pull_policy", _choice(("Always", "IfNotPresent", "Never"))),
    INIT_IMAGE: ("init_image", _image),
    INIT_IMAGE_VERSION: ("init_image_version", _image),
    CPU_REQUEST: ("cpu_request", _quantity),
    CPU_LIMIT: ("cpu_limit", _quantity),
    MEMORY_REQUEST: ("memory_request", _quantity),
    MEMORY_LIMIT: ("memory_limit", _quantity),
    EPHEMERAL_REQUEST: ("ephemeral_request", _quantity),
    EPHEMERAL_LIMIT: ("ephemeral_limit", _quantity),
    PROXY_UID: ("uid", _id),
    PROXY_GID: ("gid", _id),
    INBOUND_PORT: ("inbound_port", _port),
    OUTBOUND_PORT: ("outbound_port", _port),
    ADMIN_PORT: ("admin_port", _port),
    CONTROL_PORT: ("control_port", _port),
    OUTBOUND_CONNECT_TIMEOUT: ("outbound_connect_timeout", _duration),
    INBOUND_CONNECT_TIMEOUT: ("inbound_connect_timeout", _duration),
    OUTBOUND_CACHE_TIMEOUT: ("outbound_cache_timeout", _duration),
    DEFAULT_INBOUND_POLICY: ("default_inbound_policy", _choice(DEFAULT_POLICIES)),
    SHUTDOWN_GRACE: ("shutdown_grace_period", _duration),
    ADMIN_SHUTDOWN: ("admin_shutdown", parse_switch),
    NATIVE_SIDECAR: ("native_sidecar", parse_switch),
    WAIT_BEFORE_EXIT: ("wait_before_exit", _seconds),
    ACCESS_LOG: ("access_log", _choice(("apache", "json"))),
    TRACE_COLLECTOR: ("trace_collector", parse_collector),
}


@dataclass(frozen=True)
class Read:
    overrides: ProxyOverrides
    notices: tuple[str, ...]  # accepted but not (fully) honoured: shown to the user, never silent


def read(annotations: Mapping[str, str]) -> Read:
    """The overrides the annotations ask for; a bad value raises AnnotationError.

    Keys outside Linkerd's configuration namespaces are left to their owners; an unknown key inside
    ``config.linkerd.io/`` gets a notice (injection goes on: a pod is not refused for a typo).
    """
    overrides = ProxyOverrides()
    notices = []
    for key, value in sorted(annotations.items()):
        entry = READERS.get(key)
        if entry is not None:
            name, parse = entry
            overrides = replace(overrides, **{name: parse(str(value), key)})  # type: ignore[operator]
        elif key in NOT_HONOURED:
            notices.append(f"annotation {key}: accepted but not honoured: {NOT_HONOURED[key]}")
        elif key == ADMISSION_WEBHOOKS:
            notices.append(f"annotation {key}: has no effect as an annotation; the webhooks skip a namespace "
                           f"*labelled* {key}=disabled (kubectl label namespace NS {key}=disabled)")
        elif key.startswith(("config.linkerd.io/", "config.alpha.linkerd.io/")):
            notices.append(f"annotation {key}: not a proxy setting tether knows; ignored")
    return Read(overrides, tuple(notices))
