"""Workload identity names and SPIFFE ids, validated by the rules both have to follow.

An identity is the pair (service account, namespace) inside a control-plane namespace and trust
domain. It has two spellings, both carried on every leaf certificate:

* the DNS-like name ``<sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>`` (Linkerd's; used as
  TLS SNI and checked as the server hostname), and
* the SPIFFE id ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>`` (the X.509-SVID URI SAN).

Because the DNS-like name must be a valid hostname, names here are stricter than either standard
alone: the service account, namespace and control-plane namespace are RFC 1123 labels, and the trust
domain is a dotted sequence of such labels (so no ``_``, which SPIFFE allows but hostnames do not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The defaults every command uses (install, identity, controller, demo): Linkerd's, so that
# the seeds' Prometheus scrape configs (which match the control-plane namespace "linkerd") and
# identity names work unchanged.
DEFAULT_CONTROL_PLANE_NS = "linkerd"
DEFAULT_TRUST_DOMAIN = "cluster.local"

SPIFFE_SCHEME = "spiffe://"
MAX_TRUST_DOMAIN_BYTES = 255
MAX_SPIFFE_ID_BYTES = 2048
MAX_DNS_NAME_BYTES = 253
# X.509 limits a CN to 64 characters (ub-common-name); longer identities go in the SAN only.
MAX_COMMON_NAME = 64

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SPIFFE_TD = re.compile(r"^[a-z0-9._-]+$")
_SPIFFE_SEGMENT = re.compile(r"^[a-zA-Z0-9._-]+$")


class IdentityNameError(ValueError):
    """A name or SPIFFE id broke a rule; the message says which rule and quotes the input."""


def check_label(value: str, what: str) -> str:
    """Check an RFC 1123 label (lowercase letters, digits, '-', 1-63 chars, alphanumeric ends)."""
    if not _LABEL.match(value):
        raise IdentityNameError(
            f"{what} {value!r} is not a DNS label: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_trust_domain(value: str) -> str:
    """Check a trust domain usable both in a SPIFFE id and in the DNS-like name."""
    if not value:
        raise IdentityNameError("trust domain is empty")
    if len(value.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityNameError(f"trust domain {value!r} is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _SPIFFE_TD.match(value):
        raise IdentityNameError(
            f"trust domain {value!r} has characters SPIFFE forbids: use lowercase letters, digits, '.', '-'"
        )
    for label in value.split("."):
        check_label(label, f"trust domain {value!r} label")
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE id: trust domain plus path segments."""

    trust_domain: str
    segments: tuple[str, ...]

    def __str__(self) -> str:
        path = "".join("/" + s for s in self.segments)
        return f"{SPIFFE_SCHEME}{self.trust_domain}{path}"


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate a SPIFFE id per the SPIFFE ID spec (section 2)."""
    if len(text.encode()) > MAX_SPIFFE_ID_BYTES:
        raise IdentityNameError(f"SPIFFE id is longer than {MAX_SPIFFE_ID_BYTES} bytes")
    if not text.startswith(SPIFFE_SCHEME):
        # The scheme is case-insensitive in URIs but SPIFFE requires it lowercase.
        raise IdentityNameError(f"SPIFFE id {text!r} must start with 'spiffe://'")
    rest = text[len(SPIFFE_SCHEME) :]
    for bad, what in (("?", "a query"), ("#", "a fragment"), ("@", "user info"), (":", "a port")):
        if bad in rest:
            raise IdentityNameError(f"SPIFFE id {text!r} must not contain {what}")
    td, slash, path = rest.partition("/")
    if not td:
        raise IdentityNameError(f"SPIFFE id {text!r} has an empty trust domain")
    if len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityNameError(f"SPIFFE id {text!r}: trust domain over {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _SPIFFE_TD.match(td):
        raise IdentityNameError(
            f"SPIFFE id {text!r}: trust domain {td!r} may only hold lowercase letters, digits, '.', '-', '_'"
        )
    segments: tuple[str, ...] = ()
    if slash:
        if not path or path.endswith("/"):
            raise IdentityNameError(f"SPIFFE id {text!r} must not end with '/'")
        parts = path.split("/")
        for seg in parts:
            if seg == "":
                raise IdentityNameError(f"SPIFFE id {text!r} has an empty path segment")
            if seg in (".", ".."):
                raise IdentityNameError(f"SPIFFE id {text!r} has a relative path segment {seg!r}")
            if not _SPIFFE_SEGMENT.match(seg):
                raise IdentityNameError(
                    f"SPIFFE id {text!r}: path segment {seg!r} may only hold letters, digits, '.', '-', '_'"
                )
        segments = tuple(parts)
    return SpiffeId(td, segments)


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A workload's identity: service account and namespace, under a control plane and trust domain."""

    service_account: str
    namespace: str
    control_plane_ns: str
    trust_domain: str

    def __post_init__(self) -> None:
        check_label(self.service_account, "service account")
        check_label(self.namespace, "namespace")
        check_label(self.control_plane_ns, "control-plane namespace")
        check_trust_domain(self.trust_domain)
        if len(self.dns_name.encode()) > MAX_DNS_NAME_BYTES:
            raise IdentityNameError(f"identity name {self.dns_name!r} is longer than {MAX_DNS_NAME_BYTES} bytes")

    @property
    def dns_name(self) -> str:
        """The DNS-like name Linkerd uses: ``<sa>.<ns>.serviceaccount.identity.<cp-ns>.<td>``."""
        return (
            f"{self.service_account}.{self.namespace}.serviceaccount.identity."
            f"{self.control_plane_ns}.{self.trust_domain}"
        )

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE id ``spiffe://<td>/ns/<ns>/sa/<sa>``."""
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.dns_name


def parse_identity_name(name: str) -> WorkloadIdentity:
    """Parse a DNS-like identity name into its parts (the trust domain is everything after cp-ns)."""
    parts = name.split(".")
    if len(parts) < 6 or parts[2] != "serviceaccount" or parts[3] != "identity":
        raise IdentityNameError(
            f"identity {name!r} is not of the form <sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>"
        )
    return WorkloadIdentity(parts[0], parts[1], parts[4], ".".join(parts[5:]))


def identity_from_spiffe_id(spiffe: str, control_plane_ns: str) -> WorkloadIdentity:
    """Map ``spiffe://<td>/ns/<ns>/sa/<sa>`` back to a workload identity."""
    sid = parse_spiffe_id(spiffe)
    if len(sid.segments) != 4 or sid.segments[0] != "ns" or sid.segments[2] != "sa":
        raise IdentityNameError(f"SPIFFE id {spiffe!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
    return WorkloadIdentity(sid.segments[3], sid.segments[1], control_plane_ns, sid.trust_domain)
