"""TokenValidator over the local workload registry's bootstrap tokens."""

from __future__ import annotations

from tether.control.identity.service import TokenSubject, Unauthenticated
from tether.platform.local.workloads import InvalidToken, WorkloadError, WorkloadRegistry

MAX_TOKEN_BYTES = 4096


class LocalTokenValidator:
    def __init__(self, registry: WorkloadRegistry) -> None:
        self.registry = registry

    async def validate(self, token: bytes) -> TokenSubject:
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated(f"token is longer than {MAX_TOKEN_BYTES} bytes")
        try:
            # One small file read: cheap enough to do on the event loop.
            w = self.registry.validate_token(token)
        except InvalidToken as e:
            raise Unauthenticated(f"invalid token: {e}") from None
        except WorkloadError as e:
            raise Unauthenticated(f"token's workload cannot be read: {e}") from None
        return TokenSubject(w.namespace, w.service_account, f"local workload {w.key}")
