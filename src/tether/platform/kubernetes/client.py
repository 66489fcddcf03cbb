"""A small async JSON client of the Kubernetes API server, configured by lightkube from a kubeconfig.

lightkube reads the kubeconfig (contexts, client certificates, tokens, exec plugins, in-cluster
service-account configuration) and builds the HTTPS client; the requests themselves are plain JSON
over paths, because the store needs what lightkube's typed watch hides: the list's resourceVersion,
BOOKMARK events and the 410 Gone that says a re-list is due.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import yaml
from lightkube.config.client_adapter import AsyncClient as make_async_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError

DEFAULT_TIMEOUT = 10.0


class KubeError(Exception):
    """The API server refused a request (``status`` is the HTTP status, 0 when it could not be reached)."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class KubeConfigError(Exception):
    """No usable kubeconfig or context; the message names which and why."""


@dataclass(frozen=True, slots=True)
class ApiResource:
    """One listable kind of the API: ``group``/``version``/``plural`` (group "" for the core API)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return base + (f"/{name}" if name else "")

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


def load_config(kubeconfig: str | None = None, context: str | None = None) -> SingleConfig:
    """The kubeconfig context to use, as kubectl picks it (--kubeconfig, $KUBECONFIG, ~/.kube/config,
    in-cluster), or KubeConfigError naming the file and the problem."""
    if kubeconfig:
        where = kubeconfig
    elif os.environ.get("KUBECONFIG"):
        # kubectl merges a list; the first file is the one that names the context here.
        where = os.environ["KUBECONFIG"].split(os.pathsep)[0]
    else:
        where = "~/.kube/config (or the in-cluster service account)"
    try:
        cfg = KubeConfig.from_file(where) if kubeconfig or os.environ.get("KUBECONFIG") else KubeConfig.from_env()
        single = cfg.get(context_name=context)
    except ConfigError as e:
        raise KubeConfigError(f"kubeconfig {where}: {e}") from None
    except FileNotFoundError as e:
        raise KubeConfigError(f"kubeconfig {e.filename or where}: no such file") from None
    except OSError as e:
        raise KubeConfigError(f"kubeconfig {where}: {e.strerror or e}") from None
    except KeyError as e:
        raise KubeConfigError(f"kubeconfig {where}: not a kubeconfig: {e} is missing") from None
    except (ValueError, TypeError, AttributeError, yaml.YAMLError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise KubeConfigError(f"kubeconfig {where}: not a valid kubeconfig: {why}") from None
    if single is None:
        raise KubeConfigError(f"kubeconfig {where}: no current context (pass --context)")
    if single.user is None:
        raise KubeConfigError(f"kubeconfig {where}: context {single.context_name!r} names no user")
    return single


def _error(method: str, path: str, resp: httpx2.Response, body: bytes) -> KubeError:
    reason, message = "", body[:300].decode("utf-8", "replace").strip()
    try:
        status = json.loads(body)
        if isinstance(status, dict):
            reason = str(status.get("reason") or "")
            message = str(status.get("message") or message)
    except ValueError:
        pass
    return KubeError(f"{method} {path}: HTTP {resp.status_code}: {message}", resp.status_code, reason)


class KubeClient:
    """JSON requests to one API server. Use as ``async with KubeClient.connect(...) as client``."""

    def __init__(self, config: SingleConfig, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.config = config
        self.timeout = timeout
        params = ConnectionParams(timeout=httpx2.Timeout(timeout), trust_env=False)
        try:
            self._http: httpx2.AsyncClient = make_async_client(config, params)
        except (OSError, ValueError, TypeError, AssertionError, ssl.SSLError) as e:
            # Unreadable or invalid certificate files, a malformed server URL.
            why = " ".join(str(e).split()) or type(e).__name__
            raise KubeConfigError(f"kubeconfig context {config.context_name!r}: {why}") from None

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> KubeClient:
        return cls(load_config(kubeconfig, context), timeout)

    @property
    def server(self) -> str:
        return str(self.config.cluster.server)

    @property
    def context_name(self) -> str:
        return str(self.config.context_name)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                      params: Mapping[str, str] | None = None, content_type: str = "application/json") -> Any:
        """One request; the decoded JSON answer, or KubeError with the server's message."""
        try:
            resp = await self._http.request(
                method, path, params=dict(params or {}),
                content=json.dumps(body).encode() if body is not None else None,
                headers={"Content-Type": content_type} if body is not None else None,
            )
        except httpx2.HTTPError as e:
            why = str(e) or type(e).__name__
            raise KubeError(f"{method} {path}: cannot reach the API server {self.server}: {why}") from None
        if resp.status_code >= 400:
            raise _error(method, path, resp, resp.content)
        return resp.json() if resp.content else None

    async def date(self) -> str | None:
        """The Date header of an answer from the server (its clock, to the second)."""
        try:
            resp = await self._http.request("GET", "/version")
        except httpx2.HTTPError as e:
            why = str(e) or type(e).__name__
            raise KubeError(f"GET /version: cannot reach the API server {self.server}: {why}") from None
        return resp.headers.get("date")

    async def get(self, path: str, **params: str) -> Any:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.request("POST", path, body)

    async def lines(self, path: str, params: Mapping[str, str]) -> AsyncIterator[bytes]:
        """A streamed answer (a watch) line by line; KubeError for an error status or a broken stream.

        Only the connect and each write are bounded by the client timeout: a watch is quiet for as
        long as nothing changes, so the server's ``timeoutSeconds`` ends it instead.
        """
        timeout = httpx2.Timeout(self.timeout, read=None)
        try:
            async with self._http.stream("GET", path, params=dict(params), timeout=timeout) as resp:
                if resp.status_code >= 400:
                    raise _error("GET", path, resp, await resp.aread())
                async for line in resp.aiter_lines():
                    if line:
                        yield line.encode()
        except httpx2.HTTPError as e:
            raise KubeError(f"watch {path}: {e or type(e).__name__}") from None
