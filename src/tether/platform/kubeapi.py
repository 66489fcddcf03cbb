"""Namespaces' annotations read from the API server's REST API with the standard library.

The injector needs one thing from Kubernetes: the annotations of the namespace a pod is created in
(``linkerd.io/inject`` and ``config.linkerd.io/*`` are usually set there). This reads
``GET /api/v1/namespaces/NAME`` with the pod's service-account credentials in a cluster, or a
kubeconfig's current context outside; no Kubernetes client library. When the Kubernetes store
(platform/kubernetes) lands, the injector can read its watched Namespaces instead.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

IN_CLUSTER = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(ValueError):
    """The kubeconfig cannot be used; the message names the file and the field."""


def _data_or_file(entry: Mapping[str, Any], key: str, source: str) -> bytes | None:
    if entry.get(f"{key}-data"):
        return base64.b64decode(entry[f"{key}-data"])
    if entry.get(key):
        try:
            return Path(entry[key]).read_bytes()
        except OSError as e:
            raise KubeConfigError(f"{source}: {key} {entry[key]}: {e.strerror}") from None
    return None


class NamespaceReader:
    """``reader(name)`` -> the namespace's annotations (LookupError when it cannot be read)."""

    def __init__(self, server: str, context: ssl.SSLContext, token: str | None, timeout: float = 2.0) -> None:
        self.server = server.rstrip("/")
        self.context = context
        self.token = token
        self.timeout = timeout
        url = urllib.parse.urlsplit(self.server)
        self._host, self._port = url.hostname or "localhost", url.port or 443
        # One kept-alive connection (a TLS handshake per admission would be most of its latency);
        # lookups take turns on it.
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> NamespaceReader:
        """In a pod: its service account; else ``kubeconfig`` (or $KUBECONFIG, ~/.kube/config)."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if kubeconfig is None and host and port and (IN_CLUSTER / "token").exists():
            context = ssl.create_default_context(cafile=str(IN_CLUSTER / "ca.crt"))
            token = (IN_CLUSTER / "token").read_text().strip()
            return cls(f"https://{host}:{port}", context, token)
        path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        return cls.from_kubeconfig(path)

    @classmethod
    def from_kubeconfig(cls, path: str) -> NamespaceReader:
        try:
            config = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise KubeConfigError(f"kubeconfig {path}: {e.strerror}") from None
        except yaml.YAMLError:
            raise KubeConfigError(f"kubeconfig {path}: invalid YAML") from None

        def named(kind: str, name: str) -> Mapping[str, Any]:
            for item in config.get(kind) or ():
                if item.get("name") == name:
                    return item.get(kind[:-1]) or {}
            raise KubeConfigError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")

        current = config.get("current-context")
        if not current:
            raise KubeConfigError(f"kubeconfig {path}: current-context is not set")
        ctx = named("contexts", current)
        cluster = named("clusters", str(ctx.get("cluster")))
        user = named("users", str(ctx.get("user")))
        ca = _data_or_file(cluster, "certificate-authority", path)
        context = ssl.create_default_context(cadata=ca.decode() if ca else None)
        cert, key = _data_or_file(user, "client-certificate", path), _data_or_file(user, "client-key", path)
        if cert and key:
            # load_cert_chain reads files: write them to a private directory for the call only.
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "c").write_bytes(cert)
                (Path(d) / "k").write_bytes(key)
                os.chmod(Path(d) / "k", 0o600)
                context.load_cert_chain(str(Path(d) / "c"), str(Path(d) / "k"))
        return cls(str(cluster.get("server")), context, user.get("token"))

    def _get(self, path: str) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                     context=self.context)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._conn.request("GET", path, headers=headers)
        response = self._conn.getresponse()
        return response.status, response.read(1 << 20)

    def __call__(self, name: str) -> Mapping[str, str]:
        path = f"/api/v1/namespaces/{urllib.parse.quote(name)}"
        with self._lock:
            for attempt in (1, 2):
                try:
                    status, raw = self._get(path)
                    break
                except (OSError, http.client.HTTPException) as e:
                    # A kept-alive connection the server closed: one fresh try, then give up.
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise LookupError(f"GET namespace: {e}") from None
        if status != 200:
            raise LookupError(f"GET namespace: HTTP {status}")
        try:
            body = json.loads(raw)
        except ValueError:
            raise LookupError("GET namespace: the answer is not JSON") from None
        annotations = (body.get("metadata") or {}).get("annotations") or {}
        return {str(k): str(v) for k, v in annotations.items()}
