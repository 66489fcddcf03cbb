"""Where an inbound port's policy comes from, as the inbound stack sees it: :class:`PolicySource`,
and :class:`StaticPolicy`, one default policy for every port when there is no control plane.

The control plane's source, :class:`tether.proxy.inbound.policy_watch.PolicyWatch`, lives in its own
module with the gRPC client it needs: a proxy without ``--policy-addrs`` never loads that client
(and the HTTP/2 codec under it) just to know the type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from tether.proxy.inbound.policy import PortPolicy, default_port_policy


class PolicySource(Protocol):
    """The policy of an inbound port."""

    def current(self, port: int) -> PortPolicy | None: ...

    async def get(self, port: int) -> PortPolicy | None: ...

    def metrics_lines(self) -> list[str]: ...

    def on_change(self, callback: Callable[[int, PortPolicy], None]) -> None:
        """Call ``callback(port, policy)`` whenever a port's policy in force changes."""

    async def run(self) -> None: ...

    async def aclose(self) -> None: ...


class StaticPolicy:
    """No control plane: every port gets the same default policy."""

    def __init__(self, name: str, cluster_networks: Sequence[str], permit_localhost: bool) -> None:
        self.policy = default_port_policy(name, cluster_networks, permit_localhost)

    def current(self, port: int) -> PortPolicy | None:
        return self.policy

    async def get(self, port: int) -> PortPolicy | None:
        return self.policy

    def metrics_lines(self) -> list[str]:
        return []

    def on_change(self, callback: Callable[[int, PortPolicy], None]) -> None:
        return None  # never changes

    async def run(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
