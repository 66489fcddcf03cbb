"""HTTPRoute and GRPCRoute, as Linkerd serves them (policy.linkerd.io) and as the Gateway API does."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, model_validator

from tether.core.resources.base import Duration, Port, Resource, Strict, check_regex, notice


class ParentRef(Strict):
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    name: str = Field(min_length=1)
    section_name: str | None = None
    port: Port | None = None

    @property
    def is_service(self) -> bool:
        # "core" is how some manifests (seed 003) spell the empty core group; Linkerd accepts both.
        return (self.kind or "Service") == "Service" and (self.group or "") in ("", "core")


class PathMatch(Strict):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"

    @model_validator(mode="after")
    def _value(self) -> PathMatch:
        if self.type == "RegularExpression":
            check_regex(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must start with '/'")
        return self


class ValueMatch(Strict):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1)
    value: str

    @model_validator(mode="after")
    def _value(self) -> ValueMatch:
        if self.type == "RegularExpression":
            check_regex(self.value)
        return self


class HTTPRouteMatch(Strict):
    path: PathMatch | None = None
    headers: list[ValueMatch] = Field(default_factory=list)
    query_params: list[ValueMatch] = Field(default_factory=list)
    method: Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"] | None = None


class HeaderValue(Strict):
    name: str = Field(min_length=1)
    value: str


class HeaderModifier(Strict):
    set: list[HeaderValue] = Field(default_factory=list)
    add: list[HeaderValue] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class PathModifier(Strict):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = None
    replace_prefix_match: str | None = None


class RequestRedirect(Strict):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: Port | None = None
    status_code: Literal[301, 302] = 302


class HTTPRouteFilter(Strict):
    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect"]
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> HTTPRouteFilter:
        field = self.type[0].lower() + self.type[1:]
        if getattr(self, _snake(field)) is None:
            raise ValueError(f"type {self.type} needs the {field} field")
        return self


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


class BackendRef(Strict):
    group: str | None = None
    kind: str | None = None
    name: str = Field(min_length=1)
    namespace: str | None = None
    port: Port | None = None
    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: list[HTTPRouteFilter] = Field(default_factory=list)


class HTTPRouteTimeouts(Strict):
    request: Duration | None = None
    backend_request: Duration | None = None


class HTTPRouteRule(Strict):
    name: str | None = None
    matches: list[HTTPRouteMatch] = Field(default_factory=list)
    filters: list[HTTPRouteFilter] = Field(default_factory=list)
    backend_refs: list[BackendRef] = Field(default_factory=list)
    timeouts: HTTPRouteTimeouts | None = None


class HTTPRouteSpec(Strict):
    parent_refs: list[ParentRef] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: list[HTTPRouteRule] = Field(default_factory=list)


class HTTPRoute(Resource):
    GROUP: ClassVar[str] = "policy.linkerd.io"
    KIND: ClassVar[str] = "HTTPRoute"
    VERSIONS: ClassVar[dict[str, str | None]] = {
        "policy.linkerd.io/v1beta3": None,
        "policy.linkerd.io/v1beta2": None,
        "policy.linkerd.io/v1beta1": None,
        "gateway.networking.k8s.io/v1": None,
        "gateway.networking.k8s.io/v1beta1": None,
    }

    spec: HTTPRouteSpec

    @model_validator(mode="after")
    def _inbound_response_headers(self, info: ValidationInfo) -> HTTPRoute:
        if any(p.kind == "Server" for p in self.spec.parent_refs) and any(
            f.type == "ResponseHeaderModifier" for r in self.spec.rules for f in r.filters
        ):
            notice(
                info,
                "ResponseHeaderModifier is not applied on a Server's routes (inbound routes carry "
                "request filters only, in Linkerd's API as in tether's)",
            )
        return self

    @model_validator(mode="after")
    def _gateway_timeouts(self, info: ValidationInfo) -> HTTPRoute:
        if self.api_version.startswith("gateway.networking.k8s.io/") and any(
            r.timeouts is not None for r in self.spec.rules
        ):
            notice(
                info,
                "rules[].timeouts applied (request and "
                "backendRequest); Linkerd stores them on gateway.networking.k8s.io routes and ignores them",
            )
        return self


class GRPCMethodMatch(Strict):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = None
    method: str | None = None


class GRPCRouteMatch(Strict):
    method: GRPCMethodMatch | None = None
    headers: list[ValueMatch] = Field(default_factory=list)


class GRPCRouteFilter(Strict):
    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier"]
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None


class GRPCBackendRef(Strict):
    group: str | None = None
    kind: str | None = None
    name: str = Field(min_length=1)
    namespace: str | None = None
    port: Port | None = None
    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: list[GRPCRouteFilter] = Field(default_factory=list)


class GRPCRouteRule(Strict):
    name: str | None = None
    matches: list[GRPCRouteMatch] = Field(default_factory=list)
    filters: list[GRPCRouteFilter] = Field(default_factory=list)
    backend_refs: list[GRPCBackendRef] = Field(default_factory=list)


class GRPCRouteSpec(Strict):
    parent_refs: list[ParentRef] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)
    rules: list[GRPCRouteRule] = Field(default_factory=list)


class GRPCRoute(Resource):
    GROUP: ClassVar[str] = "gateway.networking.k8s.io"
    KIND: ClassVar[str] = "GRPCRoute"
    VERSIONS: ClassVar[dict[str, str | None]] = {
        "gateway.networking.k8s.io/v1": None,
        "gateway.networking.k8s.io/v1alpha2": None,
    }

    spec: GRPCRouteSpec


class TCPBackendRef(Strict):
    group: str | None = None
    kind: str | None = None
    name: str = Field(min_length=1)
    namespace: str | None = None
    port: Port | None = None
    weight: int = Field(default=1, ge=0, le=1_000_000)


class TCPRouteRule(Strict):
    name: str | None = None
    backend_refs: list[TCPBackendRef] = Field(min_length=1, max_length=16)


class TCPRouteSpec(Strict):
    parent_refs: list[ParentRef] = Field(default_factory=list)
    rules: list[TCPRouteRule] = Field(min_length=1, max_length=16)


class TCPRoute(Resource):
    """Opaque TCP to a Service or an EgressNetwork, sent to weighted backends. A TCPRoute has no
    matches: Linkerd serves the first rule of the oldest route attached to a parent."""

    GROUP: ClassVar[str] = "gateway.networking.k8s.io"
    KIND: ClassVar[str] = "TCPRoute"
    VERSIONS: ClassVar[dict[str, str | None]] = {"gateway.networking.k8s.io/v1alpha2": None}

    spec: TCPRouteSpec
