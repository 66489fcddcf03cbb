"""AdmissionReview requests in, AdmissionReview responses out (admission.k8s.io/v1), no I/O.

The mutating review injects a Pod with core/inject (a JSON patch, notices as warnings, a bad
annotation refused with its message); the validating review decodes a CRD object with the same
models and messages as `tether apply` (core/resources).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.core.inject import InjectError, InjectValues, inject
from tether.core.inject.pod import pod_problem
from tether.core.resources import LoadError, decode

# (namespace) -> its annotations; raises LookupError when the namespace cannot be read.
NamespaceAnnotations = Callable[[str], Mapping[str, str]]


class ReviewError(ValueError):
    """The body is not an AdmissionReview; answered with HTTP 400 and this message."""


@dataclass(frozen=True)
class Outcome:
    response: dict[str, Any]  # the whole AdmissionReview to send back
    result: str  # injected | skipped | refused | allowed | error (a metric label)


def _request(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except ValueError as e:
        raise ReviewError(f"body is not JSON: {e}") from None
    if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
        raise ReviewError("not an AdmissionReview: no request")
    request = review["request"]
    if not isinstance(request.get("uid"), str):
        raise ReviewError("not an AdmissionReview: request.uid missing")
    return review


def _answer(review: Mapping[str, Any], allowed: bool, *, patch: list[dict[str, Any]] | None = None,
            message: str = "", code: int = 200, warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch, separators=(",", ":")).encode()).decode()
    if not allowed:
        response["status"] = {"code": code, "message": message}
    if warnings:
        # The API server shows warnings to the client (kubectl prints "Warning: ..."); each must be short.
        response["warnings"] = [w[:512] for w in warnings]
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
            "response": response}


def mutate(body: bytes, values: InjectValues, namespaces: NamespaceAnnotations, version: str) -> Outcome:
    """The injector's answer to one review: the patch that adds the proxy, or why not."""
    review = _request(body)
    request = review["request"]
    pod = request.get("object")
    kind = request.get("kind")
    if not isinstance(kind, dict) or kind.get("kind") != "Pod" or not isinstance(pod, dict):
        return Outcome(_answer(review, True), "skipped")
    problem = pod_problem(pod)
    if problem is not None:
        return Outcome(_answer(review, False, code=400, message=f"not a Pod: {problem}"), "refused")
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    if not isinstance(namespace, str):
        return Outcome(_answer(review, False, code=400, message="request.namespace is not a string"), "refused")
    try:
        ns_annotations = namespaces(namespace)
    except LookupError as e:
        # Without the namespace's annotations the decision cannot be made: refuse, the failure policy decides.
        return Outcome(_answer(review, False, code=503, message=f"namespace {namespace}: {e}"), "error")
    # The API server has not set the namespace yet at admission; the proxy's labels and identity need it.
    seen = dict(pod, metadata=dict(pod.get("metadata") or {}))
    seen["metadata"].setdefault("namespace", namespace)
    try:
        result = inject(seen, ns_annotations, values, created_by=f"tether/proxy-injector {version}")
    except InjectError as e:
        return Outcome(_answer(review, False, code=400, message=str(e)), "refused")
    if not result.injected:
        return Outcome(_answer(review, True, warnings=result.notices), "skipped")
    patch = [op for op in result.patch if op["path"] != "/metadata/namespace"]
    if "metadata" not in pod:
        # The patch adds to metadata; the object sent has none (fuzzing found it), so create it first.
        patch.insert(0, {"op": "add", "path": "/metadata", "value": {}})
    return Outcome(_answer(review, True, patch=patch, warnings=result.notices), "injected")


def _errors_line(errors: list[LoadError]) -> str:
    return "; ".join(e.in_object() for e in errors)


def validate(body: bytes) -> Outcome:
    """The validator's answer: the object decoded as `tether apply` decodes it, or its field errors."""
    review = _request(body)
    request = review["request"]
    obj = request.get("object")
    if request.get("operation") == "DELETE" or not isinstance(obj, dict):
        return Outcome(_answer(review, True), "allowed")
    obj = dict(obj)
    raw_meta = obj.get("metadata")
    meta = dict(raw_meta) if isinstance(raw_meta, dict) else {}
    if isinstance(request.get("namespace"), str) and request["namespace"] and not meta.get("namespace"):
        meta["namespace"] = request["namespace"]
    # Fields the API server writes (managedFields, uid, ...) are not the user's: the models know the user's.
    obj["metadata"] = {k: v for k, v in meta.items() if k in (
        "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation", "creationTimestamp")}
    if isinstance(meta.get("generateName"), str) and "name" not in meta:
        obj["metadata"]["name"] = str(meta["generateName"]) + "x"
    result = decode(obj, source="admission", document=1)
    if isinstance(result, list):
        return Outcome(_answer(review, False, code=422, message=_errors_line(result)), "refused")
    return Outcome(_answer(review, True, warnings=result.notices), "allowed")
