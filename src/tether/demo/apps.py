"""The demo application: a web front end calling an HTTP service and a gRPC service, and a traffic
generator. Plain applications, unaware of the mesh: they call each other by Service name.

    traffic --HTTP--> web --HTTP--> books    (GET /books fails some of the time)
                          --gRPC--> greeter

Run one with ``python -m tether.demo ROLE [options]``.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GREETER_METHOD = "/demo.Greeter/Hello"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is too much for a demo
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default of 5 refuses a burst of concurrent connections


def _serve(port: int, handler: type[BaseHTTPRequestHandler]) -> None:
    server = _Server(("0.0.0.0", port), handler)
    print(f"listening on :{port}", flush=True)
    server.serve_forever()


# --- books: an HTTP service, one route failing some of the time ---------------------------------

BOOKS = [{"title": "The Left Hand of Darkness", "author": "Ursula K. Le Guin"},
         {"title": "Kindred", "author": "Octavia E. Butler"},
         {"title": "Dune", "author": "Frank Herbert"}]


def books(port: int, failure_rate: float) -> None:
    class Books(_Handler):
        def do_GET(self) -> None:
            if self.path.startswith("/books"):
                if random.random() < failure_rate:
                    self.reply(500, {"error": "books: the shelf fell over (a failure the demo injects)"})
                else:
                    self.reply(200, {"books": BOOKS})
            elif self.path.startswith("/authors"):
                self.reply(200, {"authors": sorted({b["author"] for b in BOOKS})})
            else:
                self.reply(404, {"error": f"no route {self.path}"})

    _serve(port, Books)


# --- greeter: a gRPC service (raw bytes, no generated code) -------------------------------------


def greeter(port: int) -> None:
    import grpc

    def hello(request: bytes, context: Any) -> bytes:
        return b"hello, " + (request or b"stranger")

    handler = grpc.method_handlers_generic_handler(
        "demo.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)})
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print(f"gRPC listening on :{port}", flush=True)
    server.wait_for_termination()


# --- web: the front end ---------------------------------------------------------------------------


def web(port: int, books_url: str, greeter_target: str) -> None:
    import grpc

    channel = grpc.insecure_channel(greeter_target)
    hello = channel.unary_unary(GREETER_METHOD)

    class Web(_Handler):
        def do_GET(self) -> None:
            path = "/authors" if self.path.startswith("/authors") else "/books"
            try:
                with urllib.request.urlopen(books_url + path, timeout=5) as r:
                    listing = json.loads(r.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.reply(502, {"error": f"books {path}: {e}"})
                return
            try:
                greeting = hello(b"reader", timeout=5).decode()
            except grpc.RpcError as e:
                self.reply(502, {"error": f"greeter: {e.code().name}"})
                return
            self.reply(200, {"greeting": greeting, **listing})

    _serve(port, Web)


# --- traffic: a steady request rate against the front end ----------------------------------------


def traffic(target: str, rps: float, workers: int) -> None:
    interval = workers / rps
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def loop(offset: float) -> None:
        nxt = time.monotonic() + offset
        while True:
            time.sleep(max(0.0, nxt - time.monotonic()))
            nxt += interval
            path = "/authors" if random.random() < 0.2 else "/"
            try:
                with urllib.request.urlopen(target.rstrip("/") + path, timeout=10) as r:
                    r.read()
                ok = True
            except (urllib.error.URLError, OSError):
                ok = False
            with lock:
                counts["ok" if ok else "failed"] += 1

    for i in range(workers):
        threading.Thread(target=loop, args=(i * interval / workers,), daemon=True).start()
    while True:
        time.sleep(10)
        with lock:
            print(f"traffic: {counts['ok']} ok, {counts['failed']} failed", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tether.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    b = sub.add_parser("books", help="the HTTP service")
    b.add_argument("--port", type=int, default=8080)
    b.add_argument("--failure-rate", type=float, default=0.25, help="share of GET /books answered 500")
    g = sub.add_parser("greeter", help="the gRPC service")
    g.add_argument("--port", type=int, default=9090)
    w = sub.add_parser("web", help="the front end")
    w.add_argument("--port", type=int, default=8080)
    w.add_argument("--books", default="http://books:8080")
    w.add_argument("--greeter", default="greeter:9090")
    t = sub.add_parser("traffic", help="the traffic generator")
    t.add_argument("--target", default="http://web:8080")
    t.add_argument("--rps", type=float, default=20.0)
    t.add_argument("--workers", type=int, default=4)
    sub.add_parser("run", help="the whole demo on a local mesh (what ./scripts/demo runs)", add_help=False)
    args, rest = p.parse_known_args(argv)
    if args.role == "run":
        from tether.demo.run import main as run_main

        return run_main(rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.role == "books":
        if not 0 <= args.failure_rate <= 1:
            p.error("--failure-rate: must be between 0 and 1")
        books(args.port, args.failure_rate)
    elif args.role == "greeter":
        greeter(args.port)
    elif args.role == "web":
        web(args.port, args.books, args.greeter)
    else:
        if args.rps <= 0 or args.workers < 1:
            p.error("--rps must be more than 0 and --workers at least 1")
        traffic(args.target, args.rps, args.workers)
    return 0
