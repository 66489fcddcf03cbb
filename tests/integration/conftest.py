"""Fixtures for the integration tier: real proxies, real backends, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tether.testing.backend import BackendServer, start_in_thread
from tether.testing.procs import ProxyProc


@pytest.fixture
def backend() -> Iterator[BackendServer]:
    srv = start_in_thread("b1")
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def backend2() -> Iterator[BackendServer]:
    srv = start_in_thread("b2")
    yield srv
    srv.shutdown()
    srv.server_close()


class ProxyFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[ProxyProc] = []

    def destinations(self, mapping: dict[str, list[object]], name: str = "destinations.yaml") -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump({"destinations": mapping}))
        return path

    def __call__(self, name: str = "proxy", ready: bool = True, env: dict[str, str] | None = None,
                 **flags: str | int | float) -> ProxyProc:
        flags.setdefault("log_level", "warn,tether=info")
        p = ProxyProc(self.tmp, name=name, env=env, **flags)
        self.procs.append(p)
        if ready:
            p.wait_ready()
        return p

    def close(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[ProxyFactory]:
    f = ProxyFactory(tmp_path)
    yield f
    f.close()
