"""Peers for tests/integration/test_gc_cycles.py, run as separate processes.

They run apart from the proxy under test so that the only Python objects in the test's process
are the proxy's (and the test's). Plain sockets and threads; h2 for the HTTP/2 peers.

``serve``: upstreams on loopback; prints their ports as one JSON line, runs until stdin closes:
  ``h1`` keep-alive HTTP/1.1 (200 "ok"), ``h1close`` answers with ``Connection: close`` and closes,
  ``h2`` HTTP/2 with prior knowledge (200 "ok"), ``tcp`` echoes bytes, ``upgrade`` answers
  ``101 Switching Protocols`` and then echoes bytes.
``drive KIND PORT AUTHORITY COUNT``: COUNT client connections of KIND, one after the other.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

TIMEOUT = 10.0


def _read_head(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole head")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def _read_response(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """One response (Content-Length framed): its head and the bytes read after it."""
    head, rest = _read_head(s, buf)
    need = _content_length(head)
    while len(rest) < need:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        rest += data
    return head, rest[need:]


# -- upstreams ----------------------------------------------------------------------------------------

def _h1(conn: socket.socket, close: bool) -> None:
    buf = b""
    while True:
        try:
            head, buf = _read_head(conn, buf)
        except ConnectionError:
            return
        buf = buf[_content_length(head):]
        extra = b"Connection: close\r\n" if close else b""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + extra + b"\r\nok")
        if close:
            return


def _h2(conn: socket.socket) -> None:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    conn.sendall(c.data_to_send())
    while True:
        data = conn.recv(65536)
        if not data:
            return
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                c.send_headers(ev.stream_id, [(":status", "200"), ("content-length", "2")])
                c.send_data(ev.stream_id, b"ok", end_stream=True)
        conn.sendall(c.data_to_send())


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _upgrade(conn: socket.socket) -> None:
    _head, rest = _read_head(conn)
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n" + rest)
    _echo(conn)


def _listen(handler: Callable[[socket.socket], None]) -> int:
    srv = socket.create_server(("127.0.0.1", 0), backlog=512)

    def accept() -> None:
        while True:
            conn, _ = srv.accept()

            def run(c: socket.socket = conn) -> None:
                with c:
                    try:
                        handler(c)
                    except OSError:
                        pass

            threading.Thread(target=run, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(srv.getsockname()[1])


def serve() -> None:
    ports = {
        "h1": _listen(lambda c: _h1(c, False)),
        "h1close": _listen(lambda c: _h1(c, True)),
        "h2": _listen(_h2),
        "tcp": _listen(_echo),
        "upgrade": _listen(_upgrade),
    }
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the test closes our stdin


# -- clients ------------------------------------------------------------------------------------------

def _get(s: socket.socket, authority: str, buf: bytes = b"", status: bytes = b"200") -> bytes:
    s.sendall(f"GET /x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head, buf = _read_response(s, buf)
    if not head.startswith(b"HTTP/1.1 " + status):
        raise RuntimeError(f"unexpected response: {head!r}")
    return buf


def _h2_get(s: socket.socket, authority: str) -> int:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", authority)],
                   end_stream=True)
    s.sendall(c.data_to_send())
    status = 0
    while True:
        data = s.recv(65536)
        if not data:
            return status
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
            if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                return status
        s.sendall(c.data_to_send())


def drive(kind: str, port: int, authority: str, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            if kind == "h1":  # three requests, then the client closes
                buf = b""
                for _ in range(3):
                    buf = _get(s, authority, buf)
            elif kind == "h1-until-closed":  # one request, then wait for the proxy to close
                _get(s, authority)
                if s.recv(1):
                    raise RuntimeError("bytes after the response")
            elif kind == "h1-refused":  # the upstream refuses connections: 502
                _get(s, authority, status=b"502")
            elif kind == "h1-bad":  # a malformed request line: 400, then the proxy closes
                s.sendall(b"GET  /x HTTP/1.1\r\nHost: a\r\n\r\n")
                head, _ = _read_response(s)
                if not head.startswith(b"HTTP/1.1 400"):
                    raise RuntimeError(f"unexpected response: {head!r}")
            elif kind == "upgrade":
                s.sendall(f"GET /x HTTP/1.1\r\nHost: {authority}\r\nConnection: upgrade\r\n"
                          "Upgrade: echo\r\n\r\n".encode())
                head, rest = _read_head(s)
                if not head.startswith(b"HTTP/1.1 101"):
                    raise RuntimeError(f"unexpected response: {head!r}")
                s.sendall(b"ping")
                while len(rest) < 4:
                    rest += s.recv(16)
            elif kind == "h2":
                status = _h2_get(s, authority)
                if status != 200:
                    raise RuntimeError(f"HTTP/2 status {status}")
            elif kind == "h2-failing":  # the upstream does not speak HTTP/2: 502
                status = _h2_get(s, authority)
                if status != 502:
                    raise RuntimeError(f"HTTP/2 status {status}, expected 502")
            elif kind == "tcp":
                s.sendall(b"\x00\x01 not http")
                got = b""
                while len(got) < 11:
                    got += s.recv(64)
            else:
                raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        drive(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
