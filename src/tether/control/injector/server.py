"""The webhooks over HTTPS (POST /inject, POST /validate) and an admin server (/ready, /ping, /metrics).

A thread per connection (http.server): admission reviews are few, each bounded in size and time. The
decisions are tether.control.injector.admission's; this module only moves bytes and counts.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tether.control.injector.admission import NamespaceAnnotations, Outcome, ReviewError, mutate, validate
from tether.core.inject import InjectValues

log = logging.getLogger("tether.injector")

MAX_BODY = 3 << 20  # the API server sends at most ~3 MiB objects
READ_TIMEOUT = 10.0
# Latency buckets (seconds) of the admission handling histogram.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Metrics:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)
    responses: Counter[tuple[str, str]] = field(default_factory=Counter)
    buckets: Counter[tuple[str, float]] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def observe(self, hook: str, result: str, elapsed: float) -> None:
        with self.lock:
            self.responses[(hook, result)] += 1
            self.seconds[hook] = self.seconds.get(hook, 0.0) + elapsed
            for b in BUCKETS:
                if elapsed <= b:
                    self.buckets[(hook, b)] += 1

    def text(self) -> str:
        with self.lock:
            lines = ["# TYPE proxy_inject_admission_requests_total counter"]
            lines += [f'proxy_inject_admission_requests_total{{webhook="{h}"}} {n}' for h, n in self.requests.items()]
            lines.append("# TYPE proxy_inject_admission_responses_total counter")
            lines += [f'proxy_inject_admission_responses_total{{webhook="{h}",result="{r}"}} {n}'
                      for (h, r), n in self.responses.items()]
            lines.append("# TYPE admission_duration_seconds histogram")
            for hook in self.requests:
                total = sum(n for (h, _), n in self.responses.items() if h == hook)
                for b in BUCKETS:
                    lines.append(f'admission_duration_seconds_bucket{{webhook="{hook}",le="{b}"}} '
                                 f"{self.buckets[(hook, b)]}")
                lines.append(f'admission_duration_seconds_bucket{{webhook="{hook}",le="+Inf"}} {total}')
                lines.append(f'admission_duration_seconds_sum{{webhook="{hook}"}} {self.seconds.get(hook, 0.0):.6f}')
                lines.append(f'admission_duration_seconds_count{{webhook="{hook}"}} {total}')
            return "\n".join(lines) + "\n"


@dataclass
class Injector:
    values: InjectValues
    namespaces: NamespaceAnnotations
    version: str
    metrics: Metrics = field(default_factory=Metrics)

    def handle(self, path: str, body: bytes) -> Outcome:
        if path == "/inject":
            return mutate(body, self.values, self.namespaces, self.version)
        return validate(body)


def _webhook_handler(injector: Injector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # One write for the head and the body (end_headers would flush the head alone).
            self._headers_buffer.append(b"\r\n" + body)  # type: ignore[attr-defined]
            self.flush_headers()

        def do_POST(self) -> None:
            import json

            path = self.path.split("?", 1)[0]
            if path not in ("/inject", "/validate"):
                self._send(404, b'{"error":"not found: POST /inject or /validate"}')
                return
            hook = path[1:]
            with injector.metrics.lock:
                injector.metrics.requests[hook] += 1
            started = time.perf_counter()
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._send(413 if length > MAX_BODY else 411, b'{"error":"Content-Length required, at most 3 MiB"}')
                injector.metrics.observe(hook, "error", time.perf_counter() - started)
                return
            body = self.rfile.read(length)
            try:
                outcome = injector.handle(path, body)
            except ReviewError as e:
                self._send(400, json.dumps({"error": str(e)}).encode())
                injector.metrics.observe(hook, "error", time.perf_counter() - started)
                return
            except Exception:  # a bug must cost one review (the failure policy decides), not the server
                log.exception("%s: unexpected error", hook)
                self._send(500, b'{"error":"internal error: see the injector log"}')
                injector.metrics.observe(hook, "error", time.perf_counter() - started)
                return
            self._send(200, json.dumps(outcome.response).encode())
            elapsed = time.perf_counter() - started
            injector.metrics.observe(hook, outcome.result, elapsed)
            response = outcome.response["response"]
            log.info("%s %s uid=%s result=%s %.1fms%s", hook, path, response["uid"], outcome.result,
                     elapsed * 1000, f" ({response['status']['message']})" if "status" in response else "")

    return Handler


def _admin_handler(injector: Injector, ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/metrics":
                status, body = 200, injector.metrics.text().encode()
            elif self.path == "/ready":
                status, body = (200, b"ready\n") if ready() else (503, b"not ready\n")
            elif self.path in ("/ping", "/live"):
                status, body = 200, b"pong\n"
            else:
                status, body = 404, b"not found\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class ValuesWatcher:
    """Re-reads the values file when it changes (a ConfigMap volume swaps a symlink), every ``interval``.

    A file that no longer loads is logged and the values in use are kept: a bad upgrade of the
    ConfigMap must not stop injection.
    """

    def __init__(self, injector: Injector, path: str, load: Callable[[str], InjectValues],
                 interval: float = 5.0) -> None:
        self.injector, self.path, self.load, self.interval = injector, path, load, interval
        self._stop = threading.Event()
        self._seen = self._stamp()
        self.reloads = 0
        self._thread = threading.Thread(target=self._run, name="values-watch", daemon=True)

    def _stamp(self) -> tuple[int, int, int] | None:
        import os

        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def check(self) -> bool:
        """Reload once if the file changed; True when new values are in use."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            values = self.load(self.path)
        except Exception as e:  # any load failure: keep serving with the values in use
            log.error("values file %s changed but cannot be used, keeping the previous values: %s", self.path, e)
            return False
        self.injector.values = values
        self.reloads += 1
        log.info("values file %s reloaded", self.path)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _TLSServer(ThreadingHTTPServer):
    """TLS per connection, in the connection's own thread (a slow handshake never blocks accepting)."""

    daemon_threads = True
    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        import socket

        request.settimeout(READ_TIMEOUT)
        # Headers and body leave in one write, and small answers must not wait on Nagle and the
        # peer's delayed ACK (40 ms per kept-alive request otherwise).
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.context.wrap_socket(request, server_side=True)
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        log.debug("connection from %s: %s", client_address[0], sys.exc_info()[1])


class Servers:
    """The HTTPS webhook server and the plain admin server, each on its own thread."""

    def __init__(self, injector: Injector, addr: tuple[str, int], admin_addr: tuple[str, int],
                 cert_file: str, key_file: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        self.webhook = _TLSServer(addr, _webhook_handler(injector))
        self.webhook.context = context
        self.admin = ThreadingHTTPServer(admin_addr, _admin_handler(injector, lambda: True))
        self.admin.daemon_threads = True
        self._threads = [threading.Thread(target=s.serve_forever, name=n, daemon=True)
                         for s, n in ((self.webhook, "webhook"), (self.admin, "admin"))]

    @property
    def port(self) -> int:
        return int(self.webhook.server_address[1])

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for s in (self.webhook, self.admin):
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(timeout=5)
