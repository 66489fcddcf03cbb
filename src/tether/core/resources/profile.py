"""ServiceProfile (linkerd.io/v1alpha2): routes of a service, their response classes, retries, timeouts."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tether.core.resources.base import Duration, Quantity, Regex, Resource, Strict, notice

HttpMethod = Literal["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "HEAD", "TRACE"]


class RequestMatch(Strict):
    """A route condition: at least one field; all/any/not nest."""

    all: list[RequestMatch] | None = None
    any: list[RequestMatch] | None = None
    not_: RequestMatch | None = Field(default=None, alias="not")
    path_regex: Regex | None = None
    method: str | None = None

    @model_validator(mode="after")
    def _one_field(self) -> RequestMatch:
        if (
            self.all is None
            and self.any is None
            and self.not_ is None
            and self.path_regex is None
            and self.method is None
        ):
            raise ValueError("a condition needs at least one of pathRegex, method, all, any, not")
        return self

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.isascii() or not v.replace("-", "").isalpha()):
            raise ValueError(f"invalid HTTP method {v!r}")
        return v


class Range(Strict):
    min: int = 0
    max: int = 0

    @model_validator(mode="after")
    def _range(self) -> Range:
        lo, hi = self.min, self.max
        if (lo and not 100 <= lo <= 599) or (hi and not 100 <= hi <= 599):
            raise ValueError(f"status range {lo}-{hi}: statuses are 100-599")
        if lo and hi and lo > hi:
            raise ValueError(f"status range {lo}-{hi}: min is greater than max")
        return self


class ResponseMatch(Strict):
    all: list[ResponseMatch] | None = None
    any: list[ResponseMatch] | None = None
    not_: ResponseMatch | None = Field(default=None, alias="not")
    status: Range | None = None

    @model_validator(mode="after")
    def _one_field(self) -> ResponseMatch:
        if self.all is None and self.any is None and self.not_ is None and self.status is None:
            raise ValueError("a response condition needs at least one of status, all, any, not")
        return self


class ResponseClass(Strict):
    condition: ResponseMatch
    is_failure: bool = False


class RouteRetries(Strict):
    """Seed-only form (004): Linkerd has no `retries`; tether applies it (see Route._retries)."""

    limit: int = Field(default=1, ge=0, le=100)
    timeout: Duration | None = None


class Route(Strict):
    name: str = Field(min_length=1)
    condition: RequestMatch
    response_classes: list[ResponseClass] = Field(default_factory=list)
    is_retryable: bool = False
    timeout: Duration | None = None
    retries: RouteRetries | None = None

    @model_validator(mode="after")
    def _retries(self, info: ValidationInfo) -> Route:
        if self.retries is not None:
            per_try = f", {self.retries.timeout} per try" if self.retries.timeout else ""
            if "is_retryable" in self.model_fields_set and not self.is_retryable:
                raise ValueError("retries: contradicts isRetryable: false (remove one; Linkerd's field is isRetryable)")
            notice(
                info,
                f"route {self.name!r}: retries is tether's extension (applied: retryable, at most "
                f"{self.retries.limit} retries{per_try}, "
                "within spec.retryBudget); Linkerd rejects spec.routes[].retries: its fields are "
                "isRetryable and spec.retryBudget",
            )
        return self

    @property
    def retryable(self) -> bool:
        return self.is_retryable or (self.retries is not None and self.retries.limit > 0)


class RetryBudget(Strict):
    retry_ratio: float = Field(ge=0)
    min_retries_per_second: int = Field(ge=0)
    ttl: Duration


class WeightedDst(Strict):
    authority: str = Field(min_length=1)
    weight: Quantity


class ServiceProfileSpec(Strict):
    routes: list[Route] = Field(default_factory=list)
    retry_budget: RetryBudget | None = None
    dst_overrides: list[WeightedDst] = Field(default_factory=list)
    opaque_ports: list[str] = Field(default_factory=list)


class ServiceProfile(Resource):
    GROUP: ClassVar[str] = "linkerd.io"
    KIND: ClassVar[str] = "ServiceProfile"
    VERSIONS: ClassVar[dict[str, str | None]] = {"linkerd.io/v1alpha2": None}

    spec: ServiceProfileSpec
