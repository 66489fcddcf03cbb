"""What every resource model shares: strict decoding, camelCase names, object metadata, notices.

Decoding is strict like Linkerd's ServiceProfile validator (and kubectl's strict field validation):
an unknown field is an error, never dropped. A field a seed uses that real Linkerd lacks but whose
intent is clear is accepted by the model with a *notice* (a one-line message a CLI prints and the
store logs): validators append it to the ``notices`` list passed in the validation context.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo
from pydantic.alias_generators import to_camel

from tether.core.durations import parse_duration

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class Strict(BaseModel):
    """Base of every nested object: unknown fields refused, camelCase on the wire."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        str_strip_whitespace=False,
    )

    def dump(self) -> dict[str, Any]:
        """The object as it would be written in YAML (aliases, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude_none=True, mode="json")


def notice(info: ValidationInfo, message: str) -> None:
    """Record a one-line notice for the caller (see module docstring)."""
    ctx = info.context
    if isinstance(ctx, dict):
        ctx.setdefault("notices", []).append(message)


# --- scalar checks, reused by the kinds ----------------------------------------------------------

def _duration(value: str) -> str:
    if parse_duration(value) < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return value


Duration = Annotated[str, AfterValidator(_duration)]
"""A Go duration string, kept as written (so ``get -o yaml`` shows what was applied)."""


def check_regex(value: str) -> str:
    """The value if it compiles as a regular expression, else ValueError naming the problem."""
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None
    return value


Regex = Annotated[str, AfterValidator(check_regex)]


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR {value!r}: want an address/prefix such as 10.0.0.0/8") from None
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]


def check_ip(value: str) -> str:
    """The address in its canonical text form (so lookups compare strings), else ValueError."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"invalid IP address {value!r}") from None


IP = Annotated[str, AfterValidator(check_ip)]


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


Port = Annotated[int, AfterValidator(_port)]


def _port_or_name(value: int | str) -> int | str:
    if isinstance(value, int):
        return _port(value)
    if not _DNS_LABEL.match(value) or len(value) > 15:
        raise ValueError(f"port name {value!r} is not a valid port name (a-z, 0-9, '-', at most 15)")
    return value


PortOrName = Annotated[int | str, AfterValidator(_port_or_name)]


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m|k|M|G|Ki|Mi|Gi)?$")
_QUANTITY_SCALE = {None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3}


def parse_quantity(value: int | float | str) -> float:
    """A Kubernetes quantity ("500m", "1", 10) as a number; ValueError when malformed."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid quantity {value!r}: must not be negative")
        return float(value)
    m = _QUANTITY.match(value.strip())
    if m is None:
        raise ValueError(f"invalid quantity {value!r}: want a number, optionally with a suffix such as 500m")
    return float(m.group(1)) * _QUANTITY_SCALE[m.group(2)]


def _quantity(value: int | float | str) -> int | float | str:
    parse_quantity(value)
    return value


Quantity = Annotated[int | float | str, AfterValidator(_quantity)]


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a DNS label (lowercase a-z, 0-9, '-', at most 63)")
    return value


DnsLabel = Annotated[str, AfterValidator(_dns_label)]


def _object_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(f"{value!r} is not a valid name (lowercase a-z, 0-9, '-', '.', at most 253)")
    return value


ObjectName = Annotated[str, AfterValidator(_object_name)]


class ObjectMeta(Strict):
    """The metadata a user writes, plus the fields a server adds (accepted so `get -o yaml` round-trips)."""

    name: ObjectName
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None


class Resource(Strict):
    """A top-level object: apiVersion, kind, metadata. Subclasses set the class variables."""

    GROUP: ClassVar[str]
    KIND: ClassVar[str]
    # apiVersion -> None when served as is, or the notice printed when it is accepted as an alias.
    VERSIONS: ClassVar[dict[str, str | None]]
    NAMESPACED: ClassVar[bool] = True

    api_version: str
    kind: str
    metadata: ObjectMeta
    # Written by servers; accepted and never interpreted.
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or ("default" if self.NAMESPACED else "")

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): unique within a kind."""
        return (self.namespace, self.name)

    def ref(self) -> str:
        return f"{self.KIND} {self.namespace}/{self.name}" if self.NAMESPACED else f"{self.KIND} {self.name}"
