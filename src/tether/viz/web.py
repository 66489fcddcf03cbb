"""`tether viz dashboard`: a small web server on loopback for the page in ``viz/web`` and a JSON API
over :class:`tether.viz.stat.MetricsApi` (the same numbers as `tether viz stat -o json`).

API (GET, JSON): ``/api/namespaces``, ``/api/workloads?namespace=NS``,
``/api/routes?namespace=NS&deployment=NAME``, ``/api/edges?namespace=NS``; each takes ``window``
(default 1m). A Prometheus failure is a 502 with ``{"error": ...}``; a bad parameter a 400.

Live tap: ``/api/tap`` says whether it is available; ``/api/tap/stream?resource=deploy/NAME&
namespace=NS[&path=/p][&seconds=30][&max=200]`` is a server-sent event stream of the same JSON
objects `tether viz tap -o json` prints, one per ``data:`` line, ended by an ``end`` event (or an
``error`` event saying why); bounded in time (at most 300 s) and count (at most 1,000 events).
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
# Start a tap: (resource, namespace, path prefix or None, emit, seconds) -> None, calling emit with
# each event's JSON object until it returns False or the time is up; raises TapError.
TapStarter = Callable[[str, str, "str | None", Callable[[dict[str, Any]], bool], float], None]
_RESOURCE = re.compile(r"(deploy|deployment|po|pod|svc|service|ns|namespace)/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
MAX_TAP_SECONDS = 300.0
MAX_TAP_EVENTS = 1000


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

    def __init__(self, metrics: MetricsApi, pod_counts: PodCounts, tap: TapStarter | None = None) -> None:
        self.metrics = metrics
        self.pod_counts = pod_counts
        self.tap = tap

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
            if self.tap is None:
                return {"available": False, "reason": "live tap needs a local mesh (tether up) to reach the proxies"}
            return {"available": True}
        return None

    def tap_params(self, qs: dict[str, list[str]]) -> tuple[str, str, str | None, float, int]:
        """(resource, namespace, path, seconds, max events) of a tap stream; BadRequest naming the parameter."""
        resource = qs.get("resource", [""])[0]
        if not _RESOURCE.match(resource):
            raise BadRequest(f"parameter resource: {resource!r} is not KIND/NAME (deploy, po, svc or ns)")
        ns = _param(qs, "namespace")
        path = qs.get("path", [None])[0]
        if path is not None and (not path.startswith("/") or len(path) > 1024):
            raise BadRequest(f"parameter path: {path[:60]!r} is not a path starting with /")
        try:
            seconds = float(qs.get("seconds", ["30"])[0])
            count = int(qs.get("max", ["200"])[0])
        except ValueError:
            raise BadRequest("parameters seconds and max: numbers") from None
        if not 0 < seconds <= MAX_TAP_SECONDS:
            raise BadRequest(f"parameter seconds: {seconds:g} is not in (0, {MAX_TAP_SECONDS:g}]")
        if not 0 < count <= MAX_TAP_EVENTS:
            raise BadRequest(f"parameter max: {count} is not in 1..{MAX_TAP_EVENTS}")
        return resource, ns, path, seconds, count


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

        def _tap_stream(self, qs: dict[str, list[str]]) -> None:
            from tether.viz.tap import TapError

            if api.tap is None:
                self._json(404, {"error": "live tap needs a local mesh (tether up)"})
                return
            try:
                resource, ns, path, seconds, count = api.tap_params(qs)
            except BadRequest as e:
                self._json(400, {"error": str(e)})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            sent = 0

            def emit(doc: dict[str, Any]) -> bool:
                nonlocal sent
                try:
                    self.wfile.write(b"data: " + json.dumps(doc).encode() + b"\n\n")
                    self.wfile.flush()
                except OSError:
                    return False  # the page went away: stop tapping
                sent += 1
                return sent < count

            try:
                api.tap(resource, ns, path, emit, seconds)
                end = b"event: end\ndata: " + json.dumps({"events": sent}).encode() + b"\n\n"
            except TapError as e:
                end = b"event: error\ndata: " + json.dumps({"error": str(e)}).encode() + b"\n\n"
            try:
                self.wfile.write(end)
                self.wfile.flush()
            except OSError:
                pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/api/tap/stream":
                self._tap_stream(parse_qs(url.query))
                return
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


def make_server(metrics: MetricsApi, address: str, port: int, pod_counts: PodCounts,
                tap: TapStarter | None = None) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer((address, port), handler(Api(metrics, pod_counts, tap)))
    srv.daemon_threads = True
    return srv


def serve(metrics: MetricsApi, address: str, port: int, pod_counts: PodCounts, *, announce: bool = True,
          ready: threading.Event | None = None, tap: TapStarter | None = None) -> None:
    """Serve until interrupted."""
    try:
        srv = make_server(metrics, address, port, pod_counts, tap)
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


def local_tap(state_dir: str) -> TapStarter:
    """Live tap of the local mesh in ``state_dir``, as `tether viz tap` does it (viz's identity)."""

    def start(resource: str, namespace: str, path: str | None, emit: Callable[[dict[str, Any]], bool],
              seconds: float) -> None:
        import asyncio

        from tether.viz import tap

        mesh = tap.Mesh.load(state_dir)
        pods = mesh.select(resource, namespace)
        if not pods:
            raise tap.TapError(f"no running meshed pod of {resource} in namespace {namespace}")
        creds = tap.ClientCredentials(mesh)
        request = tap.observe_request(path=path)

        async def run() -> None:
            stop = asyncio.Event()

            def on_event(_pod: tap.Pod, ev: Any) -> None:
                if not stop.is_set() and not emit(tap.event_json(ev, mesh)):
                    stop.set()

            task = asyncio.ensure_future(tap.tap_pods(pods, creds, request, on_event, seconds))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

        asyncio.run(run())

    return start
