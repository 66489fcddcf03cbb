"""A small real HTTP/1.1 application for tests and the demo (threaded, stdlib only).

Routes:
  GET  /                   "hello from NAME"
  GET  /status/CODE        responds with CODE
  GET  /bytes/N[?chunked=1] N bytes (streamed), Content-Length or chunked
  GET  /delay/MS           responds after MS milliseconds
  GET  /headers            the request headers as JSON
  POST /echo               the request body back (streamed, same framing as the request)
  POST /digest             {"bytes": n, "sha256": ...} of the request body, read in chunks
Run: python -m tether.testing.backend --port 8080 --name web
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without TCP_NODELAY, Nagle + delayed ACK add 40 ms.
    disable_nagle_algorithm = True
    server: BackendServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.name)
        # What reached the application: the request line's version and target as sent.
        self.send_header("X-Request-Version", self.request_version)
        self.send_header("X-Request-Target", self.path)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self):  # type: ignore[no-untyped-def]
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(CHUNK, remaining))
                    if not data:
                        return
                    remaining -= len(data)
                    yield data
                self.rfile.readline(8)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.server.requests += 1
        path, _, query = self.path.partition("?")
        parts = path.strip("/").split("/")
        if path == "/":
            self._send(200, f"hello from {self.server.name}\n".encode())
        elif parts[0] == "status" and len(parts) == 2 and parts[1].isdigit():
            self._send(int(parts[1]), f"status {parts[1]}\n".encode())
        elif parts[0] == "delay" and len(parts) == 2 and parts[1].isdigit():
            time.sleep(int(parts[1]) / 1000)
            self._send(200, b"delayed\n")
        elif parts[0] == "headers":
            self._send(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(),
                       "application/json")
        elif parts[0] == "bytes" and len(parts) == 2 and parts[1].isdigit():
            n = int(parts[1])
            chunked = "chunked=1" in query
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command == "HEAD":
                return
            block = b"x" * CHUNK
            left = n
            while left:
                part = block[: min(CHUNK, left)]
                left -= len(part)
                if chunked:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part))
                else:
                    self.wfile.write(part)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"no such route\n")

    def do_POST(self) -> None:
        self.server.requests += 1
        if self.path == "/echo":
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for data in self._read_body():
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
                self.wfile.write(b"0\r\n\r\n")
            else:
                body = b"".join(self._read_body())
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        elif self.path == "/digest":
            h = hashlib.sha256()
            n = 0
            for data in self._read_body():
                h.update(data)
                n += len(data)
            self._send(200, json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode(), "application/json")
        else:
            for _ in self._read_body():
                pass
            self._send(404, b"no such route\n")

    do_PUT = do_POST


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # socketserver's default backlog of 5 drops SYNs under a burst of connects

    def __init__(self, addr: tuple[str, int], name: str) -> None:
        super().__init__(addr, Handler)
        self.name = name
        self.requests = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        with self._lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: object) -> None:
        with self._lock:
            self._conns.discard(request)
        super().shutdown_request(request)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        # A client (the proxy) that went away mid-response is normal in tests (timeouts, resets).
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def kill(self) -> None:
        """Stop like a crashed process: stop listening and reset every open connection."""
        self.shutdown()
        self.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def start_in_thread(name: str = "backend", host: str = "127.0.0.1", port: int = 0) -> BackendServer:
    """Start a backend on a background thread (tests); ``server.server_address`` has the port."""
    srv = BackendServer((host, port), name)
    threading.Thread(target=srv.serve_forever, daemon=True, name=f"backend-{name}").start()
    return srv


def tcp_server(handle: Callable[[socket.socket], None]) -> tuple[socket.socket, int]:
    """A loopback TCP server handing every accepted connection to ``handle`` on its own thread
    (the connection is closed after it returns); close the returned socket to stop accepting."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve(c: socket.socket) -> None:
        with c:
            try:
                handle(c)
            except OSError:
                pass

    def run() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return srv, srv.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tether test/demo HTTP backend")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--name", default="backend")
    args = ap.parse_args(argv)
    srv = BackendServer((args.host, args.port), args.name)
    print(f"backend {args.name} listening on {args.host}:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    socketserver.TCPServer.allow_reuse_address = True
    sys.exit(main())
