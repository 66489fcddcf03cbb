"""The identity service core, written against two narrow protocols: a TokenValidator and an Issuer.

It knows nothing of gRPC, files or Kubernetes: ``server.py`` adapts it to gRPC, ``credentials.py``
provides an Issuer from files, ``tether.platform.local.tokens`` a TokenValidator over the local registry (the
Kubernetes TokenReview validator plugs into the same protocol).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from tether.control.identity.ratelimit import RateLimiter
from tether.core.identity.csr import CsrError, validate_csr
from tether.core.identity.issuance import IssuedLeaf
from tether.core.identity.names import IdentityNameError, WorkloadIdentity, parse_identity_name


class CertifyError(Exception):
    """A refused Certify call; ``code`` is the gRPC status name the adapter returns."""

    code = "INTERNAL"
    result = "error"


class InvalidArgument(CertifyError):
    code = "INVALID_ARGUMENT"
    result = "invalid_argument"


class Unauthenticated(CertifyError):
    code = "UNAUTHENTICATED"
    result = "unauthenticated"


class PermissionDenied(CertifyError):
    code = "PERMISSION_DENIED"
    result = "permission_denied"


class ResourceExhausted(CertifyError):
    code = "RESOURCE_EXHAUSTED"
    result = "rate_limited"


class Unavailable(CertifyError):
    code = "UNAVAILABLE"
    result = "unavailable"


@dataclass(frozen=True, slots=True)
class TokenSubject:
    """Who a valid token belongs to."""

    namespace: str
    service_account: str
    # Human description for errors and logs, e.g. "local workload default/web".
    description: str


class TokenValidator(Protocol):
    async def validate(self, token: bytes) -> TokenSubject:
        """The token's subject; raises Unauthenticated (with a reason) for any bad token."""
        ...


class Issuer(Protocol):
    def issue(self, csr: x509.CertificateSigningRequest, identity: WorkloadIdentity, now: dt.datetime) -> IssuedLeaf:
        """Sign a leaf; raises Unavailable when no valid issuer is loaded."""
        ...


@dataclass
class CertifyCounters:
    """Plain counters, rendered by the admin server at scrape time."""

    results: dict[str, int] = field(default_factory=dict)

    def inc(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1


class IdentityService:
    """Certify: check rate, identity, token, ownership and CSR, then issue."""

    def __init__(
        self,
        validator: TokenValidator,
        issuer: Issuer,
        trust_domain: str,
        control_plane_ns: str,
        rate_limiter: RateLimiter,
        now: Callable[[], dt.datetime],
    ) -> None:
        self.validator = validator
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.control_plane_ns = control_plane_ns
        self.rate_limiter = rate_limiter
        self.now = now
        self.counters = CertifyCounters()

    async def certify(self, identity_name: str, token: bytes, csr_der: bytes, caller: str) -> IssuedLeaf:
        try:
            leaf = await self._certify(identity_name, token, csr_der, caller)
        except CertifyError as e:
            self.counters.inc(e.result)
            raise
        self.counters.inc("ok")
        return leaf

    async def _certify(self, identity_name: str, token: bytes, csr_der: bytes, caller: str) -> IssuedLeaf:
        # Rate limit first: every later step costs CPU, and a misbehaving proxy must not exhaust the CA.
        if not self.rate_limiter.allow((identity_name[:256], caller)):
            raise ResourceExhausted(f"too many Certify calls from {caller} for {identity_name!r}; retry with backoff")
        try:
            identity = parse_identity_name(identity_name)
        except IdentityNameError as e:
            raise InvalidArgument(str(e)) from None
        if identity.trust_domain != self.trust_domain or identity.control_plane_ns != self.control_plane_ns:
            raise InvalidArgument(
                f"identity {identity_name!r} is not issued here: this identity service issues "
                f"*.serviceaccount.identity.{self.control_plane_ns}.{self.trust_domain}"
            )
        if not token:
            raise Unauthenticated("no token sent")
        subject = await self.validator.validate(token)
        if (subject.namespace, subject.service_account) != (identity.namespace, identity.service_account):
            raise PermissionDenied(
                f"the token belongs to {subject.description} (service account "
                f"{subject.namespace}/{subject.service_account}), which may not request identity "
                f"{identity_name!r}"
            )
        try:
            csr = validate_csr(csr_der, identity)
        except CsrError as e:
            raise InvalidArgument(str(e)) from None
        return self.issuer.issue(csr, identity, self.now())
