"""ServiceProfiles built from what a service does: from the routes a tap observed, or from an OpenAPI
(Swagger 2 or OpenAPI 3) document, as Linkerd's ``profile --tap`` and ``profile --open-api`` build them.

Pure: observations or a parsed document in, a ServiceProfile document (a dict, YAML-ready) out.
Each route is named ``METHOD PATH`` and matches that method and the path as a regular expression
(the path's literal text escaped; an OpenAPI ``{param}`` segment matches ``[^/]*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

API_VERSION = "linkerd.io/v1alpha2"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAM = re.compile(r"\\\{[^}]*\\\}")


class OpenApiError(ValueError):
    """The document is not an OpenAPI/Swagger document tether can read; the message says where."""


def fqdn(service: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    return f"{service}.{namespace}.svc.{cluster_domain}"


def _doc(service: str, namespace: str, routes: list[dict[str, Any]], cluster_domain: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ServiceProfile",
        "metadata": {"name": fqdn(service, namespace, cluster_domain), "namespace": namespace},
        "spec": {"routes": routes},
    }


def path_regex(path: str) -> str:
    """An OpenAPI path as the regex a route matches: literal text escaped, ``{param}`` as one segment."""
    return _PARAM.sub("[^/]*", re.escape(path))


def from_observed(service: str, namespace: str, seen: Iterable[tuple[str, str]],
                  cluster_domain: str = "cluster.local") -> dict[str, Any]:
    """A profile with one route per (method, path) observed (the query string left out)."""
    keys = sorted({(p.split("?", 1)[0], m.upper()) for m, p in seen})
    routes = [{"name": f"{m} {p}", "condition": {"method": m, "pathRegex": re.escape(p)}} for p, m in keys]
    return _doc(service, namespace, routes, cluster_domain)


def from_openapi(service: str, namespace: str, spec: Mapping[str, Any],
                 cluster_domain: str = "cluster.local") -> dict[str, Any]:
    """A profile with one route per operation of the document; 5xx responses it declares are failures;
    ``x-linkerd-retryable`` and ``x-linkerd-timeout`` on an operation set isRetryable and timeout."""
    if not isinstance(spec, Mapping) or not ("swagger" in spec or "openapi" in spec):
        raise OpenApiError("not an OpenAPI document (no 'swagger' or 'openapi' field)")
    paths = spec.get("paths")
    if not isinstance(paths, Mapping):
        raise OpenApiError("'paths' is missing or not a mapping")
    base = str(spec.get("basePath") or "").rstrip("/") if "swagger" in spec else ""
    routes: list[dict[str, Any]] = []
    for path in sorted(paths):
        item = paths[path]
        if not isinstance(item, Mapping):
            raise OpenApiError(f"paths.{path}: not a mapping")
        full = base + str(path)
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            if not isinstance(op, Mapping):
                raise OpenApiError(f"paths.{path}.{method}: not a mapping")
            route: dict[str, Any] = {"name": f"{method.upper()} {full}",
                                     "condition": {"method": method.upper(), "pathRegex": path_regex(full)}}
            classes = []
            for code in sorted(str(c) for c in (op.get("responses") or {})):
                if code.isdigit() and 500 <= int(code) <= 599:
                    classes.append({"condition": {"status": {"min": int(code), "max": int(code)}}, "isFailure": True})
            if classes:
                route["responseClasses"] = classes
            if op.get("x-linkerd-retryable") is True:
                route["isRetryable"] = True
            timeout = op.get("x-linkerd-timeout")
            if timeout:
                route["timeout"] = str(timeout)
            routes.append(route)
    return _doc(service, namespace, routes, cluster_domain)


def template(service: str, namespace: str, cluster_domain: str = "cluster.local") -> dict[str, Any]:
    """A profile with one example route, to edit."""
    return _doc(service, namespace, [{"name": "GET /example", "condition": {"method": "GET", "pathRegex": "/example"},
                                      "responseClasses": [{"condition": {"status": {"min": 500, "max": 599}},
                                                           "isFailure": True}],
                                      "timeout": "10s"}], cluster_domain)
