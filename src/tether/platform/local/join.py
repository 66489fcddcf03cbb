"""Joining hosts into one local mesh: the first host's join API and the other hosts' client of it.

The host that ran `tether up` serves a small HTTP/1.0 JSON API on its gateway address, guarded by a
bearer token (``STATE_DIR/join.token``, mode 0600). A host that runs `tether join` learns the
control plane's addresses and trust anchors from it, registers its pods' workloads through it (the
registry stays on the first host, where the control plane reads it), and reads the Services' virtual
IPs from it. On a join the first host routes the new host's pod network via the address it came
from, so pods on either host reach each other.

    POST   /join                       {"podCIDR", "nodeAddr"} -> the mesh's addresses and anchors
    PUT    /workloads/<ns>/<name>      a workload (register, or update keeping its token) -> {"token"?}
    DELETE /workloads/<ns>/<name>
    GET    /services                   [{"namespace", "name", "clusterIP"}]
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tether.platform.local.workloads import Workload, WorkloadError, WorkloadRegistry

log = logging.getLogger("tether.join")

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0


class JoinError(OSError):
    """The join API refused or could not be reached; the message says which and why."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


class JoinServer:
    """The first host's side: asyncio, one request per connection."""

    def __init__(self, token: str, registry: WorkloadRegistry, mesh_info: Callable[[], dict[str, Any]],
                 services: Callable[[], list[dict[str, str]]], add_route: Callable[[str, str], None]) -> None:
        self.token = token
        self.registry = registry
        self.mesh_info = mesh_info
        self.services = services
        self.add_route = add_route
        self.joined: dict[str, str] = {}  # pod CIDR -> node address

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, body = await self._handle(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, OSError) as e:
            status, body = 400, {"error": f"bad request: {e}"}
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 500: "Error"}.get(status, "")
        writer.write(f"HTTP/1.0 {status} {reason}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(data)}\r\n\r\n".encode() + data)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY:
            return 400, {"error": f"body larger than {MAX_BODY} bytes"}
        raw = await reader.readexactly(length) if length else b""
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(auth[7:].encode(), self.token.encode()):
            return 401, {"error": "missing or wrong join token"}
        doc = json.loads(raw) if raw else {}
        return await asyncio.to_thread(self._route, method, path, doc)

    def _route(self, method: str, path: str, doc: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        try:
            if method == "POST" and parts == ["join"]:
                cidr = str(ipaddress.ip_network(str(doc["podCIDR"]), strict=False))
                node = str(ipaddress.ip_address(str(doc["nodeAddr"])))
                self.add_route(cidr, node)
                self.joined[cidr] = node
                log.info("host %s joined with pods in %s", node, cidr)
                return 200, self.mesh_info()
            if method == "GET" and parts == ["services"]:
                return 200, self.services()
            if len(parts) == 3 and parts[0] == "workloads":
                ns, name = parts[1], parts[2]
                if method == "DELETE":
                    self.registry.remove(ns, name)
                    return 200, {}
                if method == "PUT":
                    w = Workload.from_dict({**doc, "namespace": ns, "name": name}, f"PUT {path}")
                    if self.registry.exists(ns, name):
                        self.registry.update(w)
                        return 200, {}
                    return 200, {"token": self.registry.register(w)}
        except (KeyError, TypeError, ValueError, WorkloadError) as e:
            return 400, {"error": str(e)}
        except OSError as e:
            return 500, {"error": str(e)}
        return 404, {"error": f"no {method} {path}"}


def call(addr: str, token: str, method: str, path: str, doc: Any = None) -> Any:
    """One request to a join API; JoinError names the address and the refusal."""
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method,
                                 headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read()).get("error", "")
        except ValueError:
            why = ""
        raise JoinError(f"{addr}: {method} {path}: HTTP {e.code} {why}".strip()) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise JoinError(f"{addr}: {method} {path}: {getattr(e, 'reason', e)}") from None


class RemoteRegistry:
    """The workload registry of the first host, through its join API (the same calls the supervisor
    makes on a local registry)."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr, self.token = addr, token

    def register(self, w: Workload) -> str:
        with contextlib.suppress(JoinError):
            self.remove(w.namespace, w.name)  # a fresh token, as a local register gives
        out = call(self.addr, self.token, "PUT", f"/workloads/{w.namespace}/{w.name}", w.to_dict())
        return str(out["token"])

    def update(self, w: Workload) -> None:
        call(self.addr, self.token, "PUT", f"/workloads/{w.namespace}/{w.name}", w.to_dict())

    def remove(self, namespace: str, name: str) -> None:
        call(self.addr, self.token, "DELETE", f"/workloads/{namespace}/{name}")


def read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise JoinError(f"--token {path}: cannot read: {e.strerror}") from None
    if not token:
        raise JoinError(f"--token {path}: empty")
    return token
