"""Decode YAML documents into resource models, with errors a person can act on.

Every error names where it is: ``FILE: document N (Kind ns/name): field.path: reason``, e.g.
``profiles.yaml: document 2 (ServiceProfile prod/web.prod.svc.cluster.local):
spec.routes[1].condition.pathRegex: invalid regular expression '/a(': missing ), unterminated
subpattern at position 2``. Documents count from 1, as an editor shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from tether.core.resources.base import Resource
from tether.core.resources.core import ExternalWorkload, Namespace, Service, Workload
from tether.core.resources.policy import (
    AuthorizationPolicy,
    EgressNetwork,
    HTTPLocalRateLimitPolicy,
    MeshTLSAuthentication,
    NetworkAuthentication,
    Server,
    ServerAuthorization,
)
from tether.core.resources.profile import ServiceProfile
from tether.core.resources.route import GRPCRoute, HTTPRoute, TCPRoute
from tether.core.resources.split import TrafficSplit

# libyaml's loader when PyYAML was built with it (an order of magnitude faster), else the Python one.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

KINDS: dict[str, type[Resource]] = {
    m.KIND: m
    for m in (
        Namespace,
        Service,
        Workload,
        ExternalWorkload,
        ServiceProfile,
        HTTPRoute,
        GRPCRoute,
        TCPRoute,
        TrafficSplit,
        Server,
        ServerAuthorization,
        AuthorizationPolicy,
        MeshTLSAuthentication,
        NetworkAuthentication,
        HTTPLocalRateLimitPolicy,
        EgressNetwork,
    )
}
"""Every kind tether reads, by kind name."""

# Names a user may type for a kind (`tether get sp`), as kubectl's short names and plurals.
_KIND_NAMES: dict[str, str] = {}
for _kind, _short in (
    ("Namespace", "ns"),
    ("Service", "svc"),
    ("Workload", "wl"),
    ("ExternalWorkload", "ew"),
    ("ServiceProfile", "sp"),
    ("HTTPRoute", "httproute"),
    ("GRPCRoute", "grpcroute"),
    ("TCPRoute", "tcproute"),
    ("TrafficSplit", "ts"),
    ("Server", "srv"),
    ("ServerAuthorization", "saz"),
    ("AuthorizationPolicy", "authzpolicy"),
    ("MeshTLSAuthentication", "meshtlsauthn"),
    ("NetworkAuthentication", "netauthn"),
    ("HTTPLocalRateLimitPolicy", "ratelimit"),
    ("EgressNetwork", "egressnetwork"),
):
    for _n in (_kind.lower(), _kind.lower() + "s", _short):
        _KIND_NAMES[_n] = _kind
_KIND_NAMES["serviceprofiles"] = "ServiceProfile"
_KIND_NAMES["authorizationpolicies"] = "AuthorizationPolicy"
_KIND_NAMES["httplocalratelimitpolicies"] = "HTTPLocalRateLimitPolicy"


def kind_named(name: str) -> type[Resource]:
    """The model for a kind as a user types it (``ServiceProfile``, ``sp``, ``serviceprofiles``)."""
    kind = _KIND_NAMES.get(name.lower())
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise ValueError(f"unknown kind {name!r} (known: {known})")
    return KINDS[kind]


@dataclass(frozen=True, slots=True)
class LoadError:
    """One problem in one document; ``str()`` is the line to print."""

    source: str
    document: int  # 1-based; 0 when the whole file is unreadable
    ref: str  # "Kind ns/name", or "" when the document has no identity yet
    path: str  # dotted field path, "" for the document as a whole
    reason: str

    def __str__(self) -> str:
        where = self.source
        if self.document:
            where += f": document {self.document}"
            if self.ref:
                where += f" ({self.ref})"
        line = f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"
        return _one_line(line)

    def in_object(self) -> str:
        """The problem without the file: "Kind ns/name: path: reason" (an admission review's message)."""
        where = f"{self.ref}: " if self.ref else ""
        return _one_line(f"{where}{self.path}: {self.reason}" if self.path else f"{where}{self.reason}")


def _one_line(line: str) -> str:
    # One line whatever the document holds: a kind, name or field spanning lines (a YAML plain
    # scalar or a JSON key may) is shown escaped, so it can neither break the line nor forge another
    # (found by fuzzing).
    return line.replace("\r", "\\r").replace("\n", "\\n")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A decoded resource and the notices its decoding produced."""

    resource: Resource
    source: str
    document: int
    notices: tuple[str, ...] = ()


def _path(loc: Sequence[int | str]) -> str:
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item in ("int", "str", "float", "bool", "list", "dict"):
            continue  # pydantic's union-member and validator tags, not fields
        else:
            out += ("." if out else "") + item
    return out


def _reason(err: Mapping[str, Any], hints: Mapping[str, str], path: str) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return hints.get(path, "required field is missing")
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def _ref(doc: Mapping[str, Any]) -> str:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(kind, str):
        return ""
    if not isinstance(name, str):
        return kind
    model = KINDS.get(kind)
    if model is not None and not model.NAMESPACED:
        return f"{kind} {name}"
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return f"{kind} {ns if isinstance(ns, str) else 'default'}/{name}"


def decode(doc: object, source: str = "<input>", document: int = 1) -> Loaded | list[LoadError]:
    """One parsed YAML document as a resource, or the list of its errors."""

    def error(path: str, reason: str, ref: str = "") -> list[LoadError]:
        return [LoadError(source, document, ref, path, reason)]

    if not isinstance(doc, Mapping):
        return error("", f"not an object (a mapping with apiVersion, kind, metadata); got {type(doc).__name__}")
    ref = _ref(doc)
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        return error("kind", "required field is missing", ref)
    if not isinstance(api_version, str) or not api_version:
        return error("apiVersion", "required field is missing", ref)
    model = KINDS.get(kind)
    if model is None:
        return error(
            "kind", f"{kind!r} ({api_version}) is not a kind tether reads (known: {', '.join(sorted(KINDS))})", ref
        )
    if api_version not in model.VERSIONS:
        served = ", ".join(model.VERSIONS)
        return error("apiVersion", f"{api_version!r} is not served for {kind} (served: {served})", ref)
    meta = doc.get("metadata")
    if isinstance(meta, Mapping) and not model.NAMESPACED and meta.get("namespace"):
        return error("metadata.namespace", f"{kind} is cluster-scoped: remove the namespace", ref)
    context: dict[str, Any] = {"notices": []}
    try:
        resource = model.model_validate(doc, context=context)
    except ValidationError as e:
        hints: Mapping[str, str] = getattr(model, "MISSING_HINTS", {})
        out = []
        for err in e.errors(include_url=False):
            path = _path(err["loc"])
            out.append(LoadError(source, document, ref, path, _reason(err, hints, path)))
        return out
    notices = [f"{resource.ref()}: {n}" for n in context["notices"]]
    version_notice = model.VERSIONS[api_version]
    if version_notice:
        notices.insert(0, f"{resource.ref()}: {version_notice}")
    return Loaded(resource, source, document, tuple(notices))


@dataclass(frozen=True, slots=True)
class LoadResult:
    loaded: tuple[Loaded, ...]
    errors: tuple[LoadError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def load_text(text: str, source: str) -> LoadResult:
    """Every document of a multi-document YAML text; empty documents are skipped (but counted)."""
    loaded: list[Loaded] = []
    errors: list[LoadError] = []
    try:
        docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        # One line, as every error here is (a reader error's text spans two: the fuzzer found it).
        problem = "; ".join(part.strip() for part in str(problem).splitlines() if part.strip())
        return LoadResult((), (LoadError(source, 0, "", "", f"invalid YAML: {where}{problem}"),))
    for index, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items: list[object] = list(doc["items"])
        else:
            items = [doc]
        for item in items:
            result = decode(item, source, index)
            if isinstance(result, Loaded):
                loaded.append(result)
            else:
                errors.extend(result)
    seen: dict[tuple[str, str, str], Loaded] = {}
    for item in loaded:
        key = (item.resource.KIND, *item.resource.key)
        if key in seen:
            errors.append(
                LoadError(
                    source,
                    item.document,
                    item.resource.ref(),
                    "metadata.name",
                    f"same {item.resource.KIND} as document {seen[key].document}",
                )
            )
        seen[key] = item
    return LoadResult(tuple(loaded), tuple(errors))
