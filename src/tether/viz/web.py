"""`tether viz dashboard`: a small web server on loopback for the page in ``viz/web`` and a JSON API
over :class:`tether.viz.stat.MetricsApi` (the same numbers as `tether viz stat -o json`).

API (GET, JSON): ``/api/namespaces``, ``/api/workloads?namespace=NS``,
``/api/routes?namespace=NS&deployment=NAME``, ``/api/edges?namespace=NS``; each takes ``window``
(default 1m). A Prometheus failure is a 502 with ``{"error": ...}``; a bad parameter a 400.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tether.viz.promapi import PrometheusError
from tether.viz.stat import MetricsApi, Resource, StatError, window_seconds

ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/style.css": ("style.css", "text/css")}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
PodCounts = Callable[[str], Any]


class BadRequest(Exception):
    pass


def _param(qs: dict[str, list[str]], name: str, default: str | None = None) -> str:
    v = qs.get(name, [default])[0]
    if v is None:
        raise BadRequest(f"missing parameter {name}")
    if name != "window" and not _NAME.match(v):
        raise BadRequest(f"parameter {name}: {v!r} is not a DNS label")
    return v


class Api:
    """The JSON answers, one method per path."""

    def __init__(self, metrics: MetricsApi, pod_counts: PodCounts) -> None:
        self.metrics = metrics
        self.pod_counts = pod_counts

    def answer(self, path: str, qs: dict[str, list[str]]) -> Any:
        window = _param(qs, "window", "1m")
        try:
            window_seconds(window)
        except StatError as e:
            raise BadRequest(str(e)) from None
        if path == "/api/namespaces":
            return {"window": window, "rows": self.metrics.stat(Resource("namespace", "", ""), window,
                                                                all_namespaces=True,
                                                                pods=self.pod_counts("namespace"))}
        if path == "/api/workloads":
            ns = _param(qs, "namespace")
            return {"window": window, "namespace": ns,
                    "rows": self.metrics.stat(Resource("deployment", "", ns), window,
                                              pods=self.pod_counts("deployment"))}
        if path == "/api/routes":
            ns, name = _param(qs, "namespace"), _param(qs, "deployment")
            return {"window": window, "rows": self.metrics.routes(Resource("deployment", name, ns), window)}
        if path == "/api/edges":
            ns = _param(qs, "namespace")
            return {"window": window, "edges": self.metrics.edges(ns, window)}
        if path == "/api/tap":
            return {"available": False,
                    "reason": "live tap needs the proxies' tap server and `tether viz tap`'s API; not in this build"}
        return None


def handler(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tether-viz"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # Nothing but this origin: the page loads no script, style or font from anywhere else.
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, doc: Any) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ASSETS:
                name, ctype = ASSETS[url.path]
                body = (resources.files("tether.viz") / "web" / name).read_bytes()
                self._send(200, body, ctype)
                return
            if not url.path.startswith("/api/"):
                self._json(404, {"error": f"no such page: {url.path}"})
                return
            try:
                doc = api.answer(url.path, parse_qs(url.query))
            except BadRequest as e:
                self._json(400, {"error": str(e)})
                return
            except (PrometheusError, StatError) as e:
                self._json(502, {"error": str(e)})
                return
            if doc is None:
                self._json(404, {"error": f"no such API: {url.path}"})
            else:
                self._json(200, doc)

    return Handler


def make_server(metrics: MetricsApi, address: str, port: int, pod_counts: PodCounts) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer((address, port), handler(Api(metrics, pod_counts)))
    srv.daemon_threads = True
    return srv


def serve(metrics: MetricsApi, address: str, port: int, pod_counts: PodCounts, *, announce: bool = True,
          ready: threading.Event | None = None) -> None:
    """Serve until interrupted."""
    try:
        srv = make_server(metrics, address, port, pod_counts)
    except OSError as e:
        from tether.viz.local import VizError

        raise VizError(f"cannot listen on {address}:{port} (--address/--port): {e.strerror or e}") from None
    host, bound = str(srv.server_address[0]), int(srv.server_address[1])
    if announce:
        print(f"tether viz dashboard: http://{host}:{bound}/  (Ctrl-C to stop)", flush=True)
    if ready is not None:
        ready.set()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    finally:
        srv.server_close()
