"""A blocking facade over :class:`KubeClient`, for commands that ask a few questions in order (``check``).

It owns a private event loop and runs each request to completion on it, so one HTTPS client (one
connection) serves every call of a command.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
from collections.abc import Mapping
from typing import Any

from tether.platform.kubernetes.client import KubeClient


class BlockingKube:
    def __init__(self, kubeconfig: str | None = None, context: str | None = None, timeout: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        # Raises KubeConfigError when no usable context exists.
        self.client = KubeClient.connect(kubeconfig, context, timeout)

    @property
    def server(self) -> str:
        return self.client.server

    @property
    def context_name(self) -> str:
        return self.client.context_name

    def get(self, path: str, **params: str) -> Any:
        return self._loop.run_until_complete(self.client.get(path, **params))

    def create(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._loop.run_until_complete(self.client.create(path, body))

    def server_time(self) -> dt.datetime | None:
        """The API server's clock (its Date header), or None when it sent none."""
        date = self._loop.run_until_complete(self.client.date())
        return email.utils.parsedate_to_datetime(date) if date else None

    def close(self) -> None:
        self._loop.run_until_complete(self.client.aclose())
        self._loop.close()
