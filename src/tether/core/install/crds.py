"""CustomResourceDefinitions of every kind the mesh reads, with openAPIV3Schema generated from the
same pydantic models ``tether apply`` and the validating webhook decode with (core/resources).

Kubernetes wants *structural* schemas: every node typed, no $ref, unions only of the kinds it knows.
The conversion below inlines references, turns optional fields into their type, int-or-string unions
into ``x-kubernetes-int-or-string`` and free-form maps into ``x-kubernetes-preserve-unknown-fields``.
What a structural schema cannot say (regular expressions, cross-field rules, unknown-field refusal
with a reason) the validating webhook says, with `tether apply`'s messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tether.core.resources import KINDS, Resource

# Groups served by another project's CRDs that the chart installs only when asked (Gateway API).
GATEWAY_GROUP = "gateway.networking.k8s.io"
# Kinds that are Kubernetes' own, or tether's local platform only.
NOT_CRDS = ("Namespace", "Service", "Workload")
_DROP = ("title", "default", "format", "pattern", "examples", "discriminator")


def _plural(kind: str) -> str:
    lower = kind.lower()
    return lower[:-1] + "ies" if lower.endswith("y") else lower + "s"


def _convert(node: Mapping[str, Any], defs: Mapping[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if "$ref" in node:
        name = str(node["$ref"]).rsplit("/", 1)[-1]
        if name in seen:  # a recursive type: Kubernetes schemas cannot recurse; the webhook checks it
            return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        return _convert(defs[name], defs, (*seen, name))
    if "anyOf" in node or "oneOf" in node:
        options = [o for o in (node.get("anyOf") or node.get("oneOf") or []) if o.get("type") != "null"]
        types = {o.get("type") for o in options}
        out: dict[str, Any]
        if len(options) == 1:
            out = _convert(options[0], defs, seen)
        elif types and types <= {"integer", "string", "number"} and "string" in types:
            out = {"x-kubernetes-int-or-string": True}
        elif types <= {"integer", "number"}:
            out = {"type": "number"}
        else:
            out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        if "description" in node:
            out["description"] = node["description"]
        return out
    out = {k: v for k, v in node.items() if k not in _DROP and k not in ("$defs", "additionalProperties",
                                                                          "properties", "items", "const")}
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: _convert(v, defs, seen) for k, v in props.items()}
        elif isinstance(extra, Mapping) and extra:
            out["additionalProperties"] = _convert(extra, defs, seen)
        elif not props:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        items = node.get("items")
        out["items"] = _convert(items, defs, seen) if isinstance(items, Mapping) and items else {
            "x-kubernetes-preserve-unknown-fields": True}
    elif kind is None:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def schema(model: type[Resource]) -> dict[str, Any]:
    """The openAPIV3Schema of one kind (metadata and status left to the API server)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    out = _convert(raw, defs)
    props = out["properties"]
    props["metadata"] = {"type": "object"}
    props["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    out["required"] = [r for r in out.get("required", []) if r not in ("metadata", "apiVersion", "kind")]
    if not out["required"]:
        del out["required"]
    return out


def crd(model: type[Resource], group: str) -> dict[str, Any]:
    versions = [v.split("/", 1)[1] for v in model.VERSIONS if v.split("/", 1)[0] == group]
    body = schema(model)
    plural = _plural(model.KIND)
    meta: dict[str, Any] = {
        "name": f"{plural}.{group}",
        "labels": {"app.kubernetes.io/part-of": "tether", "tether.io/crd": "true"},
    }
    if group.endswith(".k8s.io"):
        # The API server refuses CRDs in *.k8s.io groups without this (KEP 1111); the Gateway API's own.
        meta["annotations"] = {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": meta,
        "spec": {
            "group": group,
            "names": {"kind": model.KIND, "listKind": f"{model.KIND}List", "plural": plural,
                      "singular": model.KIND.lower()},
            "scope": "Namespaced" if model.NAMESPACED else "Cluster",
            "versions": [
                {"name": v, "served": True, "storage": i == 0, "schema": {"openAPIV3Schema": body}}
                for i, v in enumerate(versions)
            ],
        },
    }


def all_crds() -> list[tuple[str, dict[str, Any]]]:
    """Every CRD as (file stem, object), in a stable order."""
    out = []
    for kind, model in sorted(KINDS.items()):
        if kind in NOT_CRDS:
            continue
        groups = sorted({v.split("/", 1)[0] for v in model.VERSIONS})
        for group in groups:
            obj = crd(model, group)
            out.append((obj["metadata"]["name"], obj))
    return out
