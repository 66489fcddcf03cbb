"""The join API of the local mesh's first host, over a real loopback socket, with a real registry;
only the route it would add is recorded instead of made."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tether.platform.local.join import JoinError, JoinServer, RemoteRegistry, call
from tether.platform.local.workloads import Workload, WorkloadRegistry


def serve_and(tmp_path: Path, body: Any) -> tuple[Any, list[tuple[str, str]], WorkloadRegistry]:
    """Run ``body(addr)`` in a thread while the API serves on loopback; (its result, routes added, registry)."""
    registry = WorkloadRegistry(tmp_path)
    routes: list[tuple[str, str]] = []
    api = JoinServer("s3cret", registry, lambda: {"identityAddrs": ["10.0.0.1:1"]},
                     lambda: [{"namespace": "default", "name": "web", "clusterIP": "10.96.0.1"}],
                     lambda cidr, via: routes.append((cidr, via)))

    async def main() -> Any:
        server = await asyncio.start_server(api.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.to_thread(body, f"127.0.0.1:{port}")
        finally:
            server.close()

    return asyncio.run(main()), routes, registry


def test_join_registers_routes_and_lists_services(tmp_path: Path) -> None:
    def body(addr: str) -> Any:
        info = call(addr, "s3cret", "POST", "/join", {"podCIDR": "10.9.0.7/24", "nodeAddr": "192.0.2.9"})
        remote = RemoteRegistry(addr, "s3cret")
        w = Workload(name="web-0", namespace="default", service_account="web", labels={"app": "web"})
        token = remote.register(w)
        remote.update(Workload(name="web-0", namespace="default", service_account="web", addresses=("10.9.0.2",)))
        return info, token, call(addr, "s3cret", "GET", "/services")

    (info, token, services), routes, registry = serve_and(tmp_path, body)
    assert info == {"identityAddrs": ["10.0.0.1:1"]}
    assert routes == [("10.9.0.0/24", "192.0.2.9")]  # the network, normalized
    assert services == [{"namespace": "default", "name": "web", "clusterIP": "10.96.0.1"}]
    # The token handed out is the registry's: the identity service would accept it, and the update kept it.
    assert registry.validate_token(token).addresses == ("10.9.0.2",)


def test_a_wrong_token_and_bad_requests_are_refused_by_name(tmp_path: Path) -> None:
    def body(addr: str) -> list[str]:
        out = []
        for token, method, path, doc in [
            ("guess", "GET", "/services", None),
            ("s3cret", "POST", "/join", {"podCIDR": "10.9.0.0/33", "nodeAddr": "192.0.2.9"}),
            ("s3cret", "POST", "/join", {"nodeAddr": "192.0.2.9"}),
            ("s3cret", "PUT", "/workloads/default/Web", {"serviceAccount": "web"}),
            ("s3cret", "GET", "/nothing", None),
        ]:
            with pytest.raises(JoinError) as e:
                call(addr, token, method, path, doc)
            out.append(str(e.value))
        RemoteRegistry(addr, "s3cret").remove("default", "ghost")  # removing what is not there is fine
        return out

    errors, routes, _ = serve_and(tmp_path, body)
    assert "GET /services: HTTP 401 missing or wrong join token" in errors[0]
    assert "POST /join: HTTP 400" in errors[1] and "10.9.0.0/33" in errors[1]
    assert "HTTP 400 'podCIDR'" in errors[2]
    assert "HTTP 400" in errors[3] and "'Web' is not a DNS label" in errors[3]
    assert "HTTP 404 no GET /nothing" in errors[4]
    assert routes == []


def test_an_unreachable_api_names_the_address() -> None:
    with pytest.raises(JoinError, match=r"^127\.0\.0\.1:9: GET /services: "):
        call("127.0.0.1:9", "t", "GET", "/services")
