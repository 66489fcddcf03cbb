"""Kubernetes objects (decoded JSON) as the mesh's typed resources, the same models the local store makes.

Pure: dicts in, models out. Core objects keep only the fields the models know (the API server adds
many the mesh never reads); the mesh's own kinds (CRDs) are decoded strictly by the same
:func:`tether.core.resources.decode` as ``tether apply``, so an invalid object that slipped past
admission is refused with the same field-level message. A Pod becomes a ``Workload``: its labels,
annotations, service account, pod IPs, container ports and HTTP probes, and whether it is meshed (a
``linkerd-proxy`` container); whether it is ready is decided
by the store, from the EndpointSlices that list it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tether.core.resources import Loaded, LoadError, Resource, decode
from tether.core.resources.base import ObjectMeta
from tether.core.resources.core import Namespace, Service, ServiceSpec, Workload

Key = tuple[str, str]
PROXY_CONTAINER = "linkerd-proxy"

# Fields of metadata the models keep; the rest (managedFields, resourceVersion, ownerReferences, ...)
# changes without changing anything the mesh serves, so keeping it would only make spurious updates.
_META_FIELDS = ("name", "namespace", "labels", "annotations", "uid", "creationTimestamp")


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {k: meta[k] for k in _META_FIELDS if meta.get(k) is not None}


def _aliases(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def _known(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the keys ``model`` does not declare (fields the API server adds)."""
    names = _aliases(model)
    return {k: v for k, v in data.items() if k in names}


class ConversionError(ValueError):
    """An object the mesh cannot use; the message names it and the field."""


def namespace(obj: Mapping[str, Any]) -> Namespace:
    return Namespace.model_validate({"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(obj)})


def service(obj: Mapping[str, Any]) -> Service:
    from tether.core.resources.core import ServicePort

    spec = _known(ServiceSpec, obj.get("spec") or {})
    spec["ports"] = [_known(ServicePort, p) for p in spec.get("ports") or []]
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(obj), "spec": spec}
    try:
        return Service.model_validate(doc)
    except ValidationError as e:
        raise ConversionError(f"Service {'/'.join(key_of(obj))}: {_first(e)}") from None


def _first(e: ValidationError) -> str:
    err = e.errors(include_url=False)[0]
    path = ".".join(str(p) for p in err["loc"])
    return f"{path}: {err['msg']}" if path else str(err["msg"])


def _probes(container: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = (container.get(kind) or {}).get("httpGet")
        if isinstance(get, Mapping) and get.get("port") is not None:
            path = str(get.get("path") or "/")
            out.append({"port": get["port"], "path": path if path.startswith("/") else "/" + path})
    return out


def pod_gone(obj: Mapping[str, Any]) -> bool:
    """A pod that has ended (Succeeded, Failed) runs nothing: the mesh forgets it."""
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def pod_workload(obj: Mapping[str, Any], ready: bool) -> Workload:
    """A Pod as a Workload; ConversionError when it has something the model refuses."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    ports: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    for c in containers:
        for p in c.get("ports") or []:
            port, proto = p.get("containerPort"), p.get("protocol") or "TCP"
            if not isinstance(port, int) or (port, proto) in seen:
                continue
            seen.add((port, proto))
            ports.append({"port": port, "protocol": proto, **({"name": p["name"]} if p.get("name") else {})})
        probes.extend(_probes(c))
    doc = {
        "apiVersion": "workload.tether.io/v1alpha1",
        "kind": "Workload",
        "metadata": _meta(obj),
        "spec": {
            "serviceAccount": spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
            "addresses": ips,
            "ports": ports,
            "probes": probes,
            "ready": ready,
            # Meshed when the injector added the proxy (as a container, or a native sidecar).
            "meshed": any(c.get("name") == PROXY_CONTAINER for c in containers),
        },
    }
    try:
        return Workload.model_validate(doc)
    except ValidationError as e:
        raise ConversionError(f"Pod {'/'.join(key_of(obj))}: {_first(e)}") from None


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    """What one EndpointSlice says about pods: (namespace, pod name) -> ready."""

    service: str
    pods: Mapping[Key, bool]


def endpoint_slice(obj: Mapping[str, Any]) -> SliceEndpoints:
    """The pods an EndpointSlice lists and whether each is ready (a missing ``ready`` counts as ready,
    as the API documents). Endpoints without a Pod targetRef (hand-made slices of a selector-less
    Service) name no workload and are not represented."""
    ns = str((obj.get("metadata") or {}).get("namespace") or "")
    labels = (obj.get("metadata") or {}).get("labels") or {}
    pods: dict[Key, bool] = {}
    for ep in obj.get("endpoints") or []:
        ref = ep.get("targetRef") or {}
        if ref.get("kind") != "Pod" or not ref.get("name"):
            continue
        ready = (ep.get("conditions") or {}).get("ready")
        k = (str(ref.get("namespace") or ns), str(ref["name"]))
        pods[k] = pods.get(k, False) or ready is None or bool(ready)
    return SliceEndpoints(str(labels.get("kubernetes.io/service-name", "")), pods)


def custom(obj: Mapping[str, Any], source: str) -> Loaded | list[LoadError]:
    """A mesh resource (a CRD object) decoded as ``tether apply`` decodes a document."""
    doc = {k: v for k, v in obj.items() if k != "metadata"}
    meta = _meta(obj)
    doc["metadata"] = _known(ObjectMeta, meta)
    return decode(doc, source, 0)


def strip_status(res: Resource) -> Resource:
    """The object without its status: the mesh never reads status, and it changes constantly."""
    return res if res.status is None else res.model_copy(update={"status": None})
