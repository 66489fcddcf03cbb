"""Inject a pod (or a workload's pod template) with the proxy, and take it out again.

Pure: a pod as a dict, its namespace's annotations and the control plane's :class:`InjectValues` in;
the injected pod, the RFC 6902 JSON patch from the old pod to it, and the notices out. Injecting an
injected pod changes nothing; ``linkerd.io/inject: disabled`` on the pod wins over its namespace.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tether.core import sidecar
from tether.core.inject import annotations as ann
from tether.core.inject.values import (
    DESTINATION_SERVICE_ACCOUNT,
    IDENTITY_SERVICE_ACCOUNT,
    TOKEN_AUDIENCE,
    InjectValues,
)

PROXY = "linkerd-proxy"
INIT = "linkerd-init"
INIT_COMMAND = "tether-proxy-init"  # in the image: `tether proxy-init` with the capabilities it needs
TOKEN_VOLUME = "linkerd-identity-token"
ANCHORS_VOLUME = "linkerd-trust-anchors"
# proxy-init's iptables takes its lock in /run: writable scratch under a read-only root (Linkerd's name).
XTABLES_VOLUME = "linkerd-proxy-init-xtables-lock"
TOKEN_DIR = "/var/run/secrets/tokens"
ANCHORS_DIR = "/var/run/linkerd/identity/trust-anchors"
# The pod carries the trust anchors it was injected with; the proxy reads them through the downward
# API (a pod cannot mount the control plane's ConfigMap from another namespace).
ANCHORS_ANNOTATION = "tether.io/trust-anchors"
VERSION_ANNOTATION = "linkerd.io/proxy-version"
ROOT_SHA_ANNOTATION = "linkerd.io/trust-root-sha256"
IDENTITY_MODE_ANNOTATION = "linkerd.io/identity-mode"
CREATED_BY_ANNOTATION = "linkerd.io/created-by"
CONTROL_PLANE_NS_LABEL = "linkerd.io/control-plane-ns"
WORKLOAD_NS_LABEL = "linkerd.io/workload-ns"
OWNER_LABEL_PREFIX = "linkerd.io/proxy-"

ADDED_ANNOTATIONS = (ANCHORS_ANNOTATION, VERSION_ANNOTATION, ROOT_SHA_ANNOTATION, IDENTITY_MODE_ANNOTATION,
                     CREATED_BY_ANNOTATION)
_OWNER_KINDS = ("deployment", "replicaset", "statefulset", "daemonset", "job", "cronjob", "pod",
                "replicationcontroller")


class InjectError(ValueError):
    """The pod cannot be injected as asked (a bad annotation value); the message names the field."""


@dataclass(frozen=True)
class Injection:
    pod: dict[str, Any]  # the result (the input, unchanged, when not injected)
    patch: list[dict[str, Any]]  # RFC 6902, from the input to ``pod``
    injected: bool
    reason: str  # why not injected: "", "injection not enabled", "linkerd.io/inject: disabled", ...
    notices: tuple[str, ...] = field(default_factory=tuple)


def pod_problem(pod: Mapping[str, Any]) -> str | None:
    """What makes ``pod`` not a Pod the injector can patch (the API server never sends one), or None."""
    meta, spec = pod.get("metadata", {}), pod.get("spec")
    if not isinstance(meta, dict):
        return "metadata is not an object"
    for key in ("labels", "annotations"):
        if not isinstance(meta.get(key, {}), dict) and meta.get(key) is not None:
            return f"metadata.{key} is not an object"
    if not isinstance(meta.get("ownerReferences", []), list) and meta.get("ownerReferences") is not None:
        return "metadata.ownerReferences is not a list"
    if not isinstance(spec, dict):
        return "spec is not an object"
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key)
        if items is not None and not (isinstance(items, list) and all(isinstance(i, dict) for i in items)):
            return f"spec.{key} is not a list of objects"
        if key != "volumes" and any(not isinstance(i.get("name"), str) for i in items or ()):
            return f"spec.{key}: a container has no name"
    return None


def is_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    names = {c.get("name") for c in (*(spec.get("containers") or ()), *(spec.get("initContainers") or ()))}
    return PROXY in names


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata") or {}
    return meta if isinstance(meta, Mapping) else {}


def wants_injection(pod_annotations: Mapping[str, str], ns_annotations: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the pod is to be injected, and why not: the pod's ``linkerd.io/inject`` wins."""
    value = pod_annotations.get(ann.INJECT) or ns_annotations.get(ann.INJECT)
    if value in ("enabled", "ingress"):
        return True, ""
    if value == "disabled":
        where = "pod" if pod_annotations.get(ann.INJECT) else "namespace"
        return False, f"{ann.INJECT}: disabled on the {where}"
    if value is None:
        return False, f"injection not enabled ({ann.INJECT} is not set on the pod or its namespace)"
    raise InjectError(f"annotation {ann.INJECT}: {value!r} must be enabled, disabled or ingress")


def settings(pod_annotations: Mapping[str, str], ns_annotations: Mapping[str, str]) -> ann.Read:
    """The namespace's overrides with the pod's on top, and every notice (AnnotationError on a bad value)."""
    ns = ann.read(ns_annotations)
    pod = ann.read(pod_annotations)
    notices = tuple(f"namespace {n}" for n in ns.notices) + pod.notices
    return ann.Read(pod.overrides.over(ns.overrides), notices)


def _join(*parts: str) -> str:
    return ",".join(p for part in parts for p in part.split(",") if p.strip())


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def proxy_container(v: InjectValues, o: ann.ProxyOverrides, native: bool) -> dict[str, Any]:
    """The proxy container for values ``v`` with overrides ``o`` (the chart's partial renders the same)."""
    inbound = o.inbound_port or v.inbound_port
    outbound = o.outbound_port or v.outbound_port
    admin = o.admin_port or v.admin_port
    uid = o.uid if o.uid is not None else v.uid
    gid = o.gid if o.gid is not None else v.gid
    image = o.proxy_image or v.proxy_image
    version = o.proxy_version or v.proxy_version
    identity = (f"$(_pod_sa).$(_pod_ns).serviceaccount.identity.{v.namespace}.{v.trust_domain}")
    # The names the control plane's certificates must carry: the proxy sends its token only to an
    # identity service proving its name, and speaks mutual TLS to destination and policy.
    identity_svc = v.control_identity(IDENTITY_SERVICE_ACCOUNT)
    destination_svc = v.control_identity(DESTINATION_SERVICE_ACCOUNT)
    env = [
        _field_env("_pod_name", "metadata.name"),
        _field_env("_pod_ns", "metadata.namespace"),
        _field_env("_pod_nodeName", "spec.nodeName"),
        _field_env("_pod_sa", "spec.serviceAccountName"),
        _env("TETHER_PROXY_LOG_LEVEL", o.log_level or v.log_level),
        _env("TETHER_PROXY_LOG_FORMAT", o.log_format or v.log_format),
        _env("TETHER_PROXY_INBOUND_ADDR", f"0.0.0.0:{inbound}"),
        _env("TETHER_PROXY_OUTBOUND_ADDR", f"127.0.0.1:{outbound}"),
        _env("TETHER_PROXY_ADMIN_ADDR", f"0.0.0.0:{admin}"),
        _env("TETHER_PROXY_OPAQUE_PORTS", ",".join(o.opaque_ports) if o.opaque_ports is not None
             else v.opaque_ports),
        _env("TETHER_PROXY_OUTBOUND_CONNECT_TIMEOUT", o.outbound_connect_timeout or v.outbound_connect_timeout),
        _env("TETHER_PROXY_INBOUND_CONNECT_TIMEOUT", o.inbound_connect_timeout or v.inbound_connect_timeout),
        _env("TETHER_PROXY_CACHE_MAX_IDLE_AGE", o.outbound_cache_timeout or v.outbound_cache_timeout),
        _env("TETHER_PROXY_SHUTDOWN_GRACE_PERIOD", o.shutdown_grace_period or v.shutdown_grace_period),
        _env("TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN",
             "true" if (o.admin_shutdown if o.admin_shutdown is not None else v.enable_admin_shutdown)
             else "false"),
        _env("TETHER_PROXY_DEFAULT_INBOUND_POLICY", o.default_inbound_policy or v.default_inbound_policy),
        _env("TETHER_PROXY_ACCESS_LOG", o.access_log or ""),  # config.linkerd.io/access-log
        _env("TETHER_PROXY_TRACE_COLLECTOR", o.trace_collector or ""),  # config.linkerd.io/trace-collector
        _env("TETHER_PROXY_CLUSTER_NETWORKS", v.cluster_networks),
        _env("TETHER_PROXY_DESTINATION_ADDRS", v.service("linkerd-dst", 8086)),
        _env("TETHER_PROXY_DESTINATION_SVC_NAME", destination_svc),
        _env("TETHER_PROXY_DESTINATION_CONTEXT",
             '{"ns":"$(_pod_ns)","nodeName":"$(_pod_nodeName)","pod":"$(_pod_name)"}'),
        _env("TETHER_PROXY_POLICY_ADDRS", v.service("linkerd-policy", 8090)),
        _env("TETHER_PROXY_POLICY_SVC_NAME", destination_svc),
        _env("TETHER_PROXY_POLICY_WORKLOAD", '{"ns":"$(_pod_ns)","pod":"$(_pod_name)"}'),
        _env("TETHER_PROXY_IDENTITY_NAME", identity),
        _env("TETHER_PROXY_IDENTITY_ADDRS", v.service("linkerd-identity", 8080)),
        _env("TETHER_PROXY_IDENTITY_SVC_NAME", identity_svc),
        _env("TETHER_PROXY_IDENTITY_TOKEN_PATH", f"{TOKEN_DIR}/{TOKEN_VOLUME}"),
        _env("TETHER_PROXY_IDENTITY_TRUST_ANCHORS", f"{ANCHORS_DIR}/ca-bundle.crt"),
        # Linkerd's variables with the same values, as Linkerd's injector writes them: the PEM itself
        # is what `check --proxy` (Linkerd's and tether's) reads to compare a proxy's anchors with the
        # control plane's; the service names say which control plane the proxy trusts. The proxy
        # reads the TETHER_PROXY_* ones.
        _env("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", v.trust_anchors_pem),
        _env("LINKERD2_PROXY_IDENTITY_SVC_NAME", identity_svc),
        _env("LINKERD2_PROXY_DESTINATION_SVC_NAME", destination_svc),
        _env("LINKERD2_PROXY_POLICY_SVC_NAME", destination_svc),
        # The interpreter's locale (tether.core.sidecar.LOCALE_ENV: no locale file mapped).
        *(_env(k, val) for k, val in sidecar.LOCALE_ENV.items()),
    ]
    env = [e for e in env if "value" not in e or e["value"] != ""]
    resources = replace(
        v.resources,
        **{k: getattr(o, k) for k in ("cpu_request", "cpu_limit", "memory_request", "memory_limit",
                                      "ephemeral_request", "ephemeral_limit") if getattr(o, k) is not None},
    )
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if gid >= 0:
        security["runAsGroup"] = gid
    c: dict[str, Any] = {
        "name": PROXY,
        "image": f"{image}:{version}",
        "imagePullPolicy": o.pull_policy or v.proxy_pull_policy,
        # The image's interpreter as every deployment runs the proxy (-OO, no debug ranges: ~1 MiB of
        # RSS) on this process only: other tether commands run in the container keep their help texts.
        "command": sidecar.python_argv(sidecar.IMAGE_PYTHON),
        "args": ["proxy"],
        "env": env,
        "ports": [
            {"name": "linkerd-proxy", "containerPort": inbound},
            {"name": "linkerd-admin", "containerPort": admin},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": admin}, "initialDelaySeconds": 2,
                           "timeoutSeconds": 1},
        "livenessProbe": {"httpGet": {"path": "/live", "port": admin}, "initialDelaySeconds": 10,
                          "timeoutSeconds": 1},
        "resources": resources.to_k8s(),
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": ANCHORS_VOLUME, "mountPath": ANCHORS_DIR, "readOnly": True},
        ],
    }
    proxy_await = o.proxy_await if o.proxy_await is not None else v.proxy_await
    lifecycle: dict[str, Any] = {}
    if native:
        c["restartPolicy"] = "Always"
        # The pod's containers start once the sidecar is ready: what proxy-await does otherwise.
        c["startupProbe"] = {"httpGet": {"path": "/ready", "port": admin}, "periodSeconds": 1,
                             "failureThreshold": 120}
    elif proxy_await:
        lifecycle["postStart"] = {"exec": {"command": ["tether", "proxy-await", "--admin-port", str(admin),
                                                       "--timeout", "2m"]}}
    wait = o.wait_before_exit if o.wait_before_exit is not None else v.wait_before_exit
    if wait > 0:
        lifecycle["preStop"] = {"exec": {"command": ["sleep", str(wait)]}}
    if lifecycle:
        c["lifecycle"] = lifecycle
    return c


def init_container(v: InjectValues, o: ann.ProxyOverrides) -> dict[str, Any]:
    """``tether proxy-init`` with the pod's skip ports and subnets (what linkerd-init does)."""
    uid = o.uid if o.uid is not None else v.uid
    admin = o.admin_port or v.admin_port
    control = o.control_port or v.control_port
    inbound_ignore = _join(f"{control},{admin}", v.ignore_inbound_ports, ",".join(o.skip_inbound_ports or ()))
    outbound_ignore = _join(v.ignore_outbound_ports, ",".join(o.skip_outbound_ports or ()))
    subnets = _join(v.skip_subnets, ",".join(o.skip_subnets or ()))
    args = [
        "--incoming-proxy-port", str(o.inbound_port or v.inbound_port),
        "--outgoing-proxy-port", str(o.outbound_port or v.outbound_port),
        "--proxy-uid", str(uid),
        "--inbound-ports-to-ignore", inbound_ignore,
    ]
    if outbound_ignore:
        args += ["--outbound-ports-to-ignore", outbound_ignore]
    if subnets:
        args += ["--subnets-to-ignore", subnets]
    args += ["--iptables-mode", v.iptables_mode]
    image = o.init_image or v.init_image
    version = o.init_image_version or v.init_version
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": not v.init_run_as_root,
        "runAsUser": 0 if v.init_run_as_root else v.init_run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "name": INIT,
        "image": f"{image}:{version}",
        "imagePullPolicy": o.pull_policy or v.init_pull_policy,
        # `tether proxy-init` under the image's interpreter copy that carries NET_ADMIN and NET_RAW as
        # file capabilities: a non-root process keeps the capabilities a container adds only across an
        # exec of a file that carries them (and with no_new_privs, only those it already had).
        "command": [INIT_COMMAND],
        "args": args,
        "resources": v.init_resources.to_k8s(),
        "securityContext": security,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def volumes() -> list[dict[str, Any]]:
    """The projected service-account token (audience identity.l5d.io) and the trust anchors."""
    return [
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE, "expirationSeconds": 86400, "path": TOKEN_VOLUME}}]}},
        {"name": ANCHORS_VOLUME, "downwardAPI": {"items": [{
            "path": "ca-bundle.crt",
            "fieldRef": {"fieldPath": f"metadata.annotations['{ANCHORS_ANNOTATION}']"}}]}},
        {"name": XTABLES_VOLUME, "emptyDir": {}},
    ]


def pod_annotations_added(v: InjectValues, created_by: str) -> dict[str, str]:
    return {
        CREATED_BY_ANNOTATION: created_by,
        IDENTITY_MODE_ANNOTATION: "default",
        VERSION_ANNOTATION: v.proxy_version,
        ROOT_SHA_ANNOTATION: hashlib.sha256(v.trust_anchors_pem.encode()).hexdigest(),
        ANCHORS_ANNOTATION: v.trust_anchors_pem,
    }


def owner_label(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(linkerd.io/proxy-<kind>, name)`` from the pod's controller (a ReplicaSet's Deployment by its hash)."""
    meta = _meta(pod)
    labels = meta.get("labels") or {}
    for ref in meta.get("ownerReferences") or ():
        if not isinstance(ref, Mapping) or not ref.get("controller"):
            continue
        kind, name = str(ref.get("kind", "")).lower(), str(ref.get("name", ""))
        if kind == "replicaset":
            suffix = "-" + str(labels.get("pod-template-hash", ""))
            if labels.get("pod-template-hash") and name.endswith(suffix):
                return OWNER_LABEL_PREFIX + "deployment", name[: -len(suffix)]
        if kind in _OWNER_KINDS:
            return OWNER_LABEL_PREFIX + kind, name
    return None


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An RFC 6902 patch from ``before`` to ``after``, one op per changed field of metadata and spec."""
    ops: list[dict[str, Any]] = []
    for part in ("metadata", "spec"):
        old, new = before.get(part) or {}, after.get(part) or {}
        if part not in before:
            if new:
                ops.append({"op": "add", "path": f"/{part}", "value": new})
            continue
        for key in sorted(set(old) | set(new)):
            path = f"/{part}/{key.replace('~', '~0').replace('/', '~1')}"
            if key not in new:
                ops.append({"op": "remove", "path": path})
            elif old.get(key) != new[key]:
                ops.append({"op": "add", "path": path, "value": new[key]})
    return ops


def inject(
    pod: Mapping[str, Any],
    ns_annotations: Mapping[str, str],
    values: InjectValues,
    *,
    created_by: str,
    force: bool = False,
    owner: tuple[str, str] | None = None,
) -> Injection:
    """The pod with the proxy, or the pod unchanged and the reason.

    ``force`` injects whatever ``linkerd.io/inject`` says (``tether inject --manual`` on a file);
    ``owner`` is the ``linkerd.io/proxy-<kind>`` label (else read from the pod's ownerReferences).
    Raises InjectError on an annotation with a bad value.
    """
    meta = _meta(pod)
    pod_annotations = {str(k): str(val) for k, val in (meta.get("annotations") or {}).items()}
    try:
        read = settings(pod_annotations, ns_annotations)
        wanted, reason = wants_injection(pod_annotations, ns_annotations)
    except ann.AnnotationError as e:
        raise InjectError(str(e)) from None
    original = dict(pod)
    if is_injected(pod):
        return Injection(original, [], False, "already injected", read.notices)
    if not force and not wanted:
        return Injection(original, [], False, reason, read.notices)
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return Injection(original, [], False, "hostNetwork: true (the proxy would capture the node's traffic)",
                         read.notices)
    notices = list(read.notices)
    o = read.overrides
    if (pod_annotations.get(ann.INJECT) or ns_annotations.get(ann.INJECT)) == "ingress":
        notices.append(f"annotation {ann.INJECT}: ingress: tether's proxy has no ingress mode yet; "
                       "injected as enabled")
    native = o.native_sidecar if o.native_sidecar is not None else values.native_sidecar
    out = copy.deepcopy(dict(pod))
    new_meta = out.setdefault("metadata", {})
    new_spec = out.setdefault("spec", {})
    proxy = proxy_container(values, o, native)
    inits = [init_container(values, o), *(new_spec.get("initContainers") or [])]
    containers = list(new_spec.get("containers") or [])
    if native:
        inits.insert(1, proxy)
    elif o.proxy_await if o.proxy_await is not None else values.proxy_await:
        containers.insert(0, proxy)  # first, so its postStart hook holds the others until it is ready
    else:
        containers.append(proxy)
    new_spec["initContainers"] = inits
    new_spec["containers"] = containers
    new_spec["volumes"] = [*(new_spec.get("volumes") or []), *volumes()]
    labels = dict(new_meta.get("labels") or {})
    labels[CONTROL_PLANE_NS_LABEL] = values.namespace
    if meta.get("namespace"):
        labels[WORKLOAD_NS_LABEL] = str(meta["namespace"])
    owned = owner or owner_label(pod)
    if owned is not None:
        labels[owned[0]] = owned[1]
    new_meta["labels"] = labels
    new_meta["annotations"] = {**pod_annotations, **pod_annotations_added(values, created_by)}
    return Injection(out, json_patch(pod, out), True, "", tuple(notices))


def uninject(pod: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The pod without the proxy, init container, volumes, labels and annotations injection added."""
    out = copy.deepcopy(dict(pod))
    spec = out.get("spec")
    if not isinstance(spec, dict):
        return out, False
    changed = False
    for key in ("containers", "initContainers"):
        if key in spec:
            kept = [c for c in spec[key] or () if c.get("name") not in (PROXY, INIT)]
            if len(kept) != len(spec[key] or ()):
                changed = True
                if kept or key == "containers":
                    spec[key] = kept
                else:
                    del spec[key]
    if "volumes" in spec:
        ours = (TOKEN_VOLUME, ANCHORS_VOLUME, XTABLES_VOLUME)
        kept = [vol for vol in spec["volumes"] or () if vol.get("name") not in ours]
        if len(kept) != len(spec["volumes"] or ()):
            changed = True
            if kept:
                spec["volumes"] = kept
            else:
                del spec["volumes"]
    meta = out.get("metadata")
    if isinstance(meta, dict):
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for key in (*ADDED_ANNOTATIONS, ann.INJECT):
                if key in annotations:
                    changed = True
                    del annotations[key]
            if not annotations:
                del meta["annotations"]
        labels = meta.get("labels")
        if isinstance(labels, dict):
            for key in [k for k in labels if k in (CONTROL_PLANE_NS_LABEL, WORKLOAD_NS_LABEL)
                        or (k.startswith(OWNER_LABEL_PREFIX) and k[len(OWNER_LABEL_PREFIX):] in _OWNER_KINDS)]:
                changed = True
                del labels[key]
            if not labels:
                del meta["labels"]
        if not meta and changed:
            del out["metadata"]
    return out, changed


def patch_json(patch: list[dict[str, Any]]) -> bytes:
    return json.dumps(patch, separators=(",", ":")).encode()
