"""SMI TrafficSplit (split.smi-spec.io): a root service's traffic shared among backend services."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, model_validator

from tether.core.resources.base import Quantity, Resource, Strict, notice, parse_quantity


class TrafficSplitBackend(Strict):
    service: str = Field(min_length=1)
    weight: Quantity

    @property
    def weight_value(self) -> float:
        return parse_quantity(self.weight)


class TrafficSplitSpec(Strict):
    service: str = Field(min_length=1)
    backends: list[TrafficSplitBackend] = Field(min_length=1)
    # v1alpha2+ (HTTPRouteGroup refs); accepted for the schema, and refused below since tether has
    # no HTTPRouteGroup kind.
    matches: list[dict[str, str]] | None = None


class TrafficSplit(Resource):
    GROUP: ClassVar[str] = "split.smi-spec.io"
    KIND: ClassVar[str] = "TrafficSplit"
    VERSIONS: ClassVar[dict[str, str | None]] = {
        "split.smi-spec.io/v1alpha1": None,
        "split.smi-spec.io/v1alpha2": None,
    }

    spec: TrafficSplitSpec

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo) -> TrafficSplit:
        if self.spec.matches:
            raise ValueError("spec.matches: HTTPRouteGroup matches are not supported; use an HTTPRoute")
        if self.api_version == "split.smi-spec.io/v1alpha2":
            for i, b in enumerate(self.spec.backends):
                if not isinstance(b.weight, int):
                    raise ValueError(f"spec.backends[{i}].weight: v1alpha2 weights are integers, got {b.weight!r}")
        if sum(b.weight_value for b in self.spec.backends) <= 0:
            raise ValueError("spec.backends: the weights add up to 0, so no backend would get traffic")
        notice(
            info,
            "applied natively (Linkerd needs the deprecated "
            "linkerd-smi extension for split.smi-spec.io; its native form is an HTTPRoute with weighted backendRefs)",
        )
        return self
