"""gRPC unary side by side: direct, nginx grpc_pass, haproxy (h2) and one tether proxy in front of
fortio's gRPC ping server. Load: `fortio load -grpc -ping`, one stream per connection.

Run by hand: .venv/bin/python bench/grpc_unary.py   (bench/README.md says what each figure means)
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import harness as h

AUTHORITY = "bench.local:80"
PING_PATH = "/fgrpc.PingServer/Ping"
TARGETS = ("direct", "nginx", "haproxy", "tether")
# An empty fgrpc.PingMessage in gRPC's length-prefixed framing: not compressed, length 0.
EMPTY_PING = b"\x00\x00\x00\x00\x00"


def ping_once(sock: socket.socket, deadline: float) -> bool:
    """Speak HTTP/2 on `sock` and make one unary Ping call; True when grpc-status is 0."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PING_PATH),
            (":authority", AUTHORITY),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    conn.send_data(stream, EMPTY_PING, end_stream=True)
    sock.sendall(conn.data_to_send())
    status: str | None = None
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            return False
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                for name, value in event.headers:
                    if name == b"grpc-status":
                        status = value.decode("ascii", "replace")
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                sock.sendall(conn.data_to_send())
                return status == "0"
        sock.sendall(conn.data_to_send())
    return False


@contextlib.contextmanager
def hold_grpc(port: int, n: int, timeout: float = 60.0) -> Iterator[int]:
    """Open n HTTP/2 connections, make one Ping call on each, keep them open; yields how many work."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(s)
                if not ping_once(s, deadline):
                    break
            except OSError:
                break
        yield h.still_open(socks)
    finally:
        for s in socks:
            s.close()


def start_backend(fortio: Path, workdir: Path, port: int) -> h.Proc:
    return h.start_fortio_server(fortio, workdir, "disabled", port)


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    port = h.free_port()
    proc: h.Proc | None = None
    if name == "direct":
        port = backend_port
    elif name == "nginx":
        proc = h.start_nginx(
            workdir,
            port,
            f"""    upstream grpc_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://grpc_backend;
        }}
    }}""",
            workers,
        )
    elif name == "haproxy":
        proc = h.start_haproxy(
            workdir, port, f"127.0.0.1:{port} proto h2", f"127.0.0.1:{backend_port} proto h2", workers
        )
    else:
        reason = h.tether_unavailable_reason()
        if reason is not None:
            raise h.Skip(reason)
        proc = h.start_tether(workdir, port, h.free_port(), AUTHORITY, backend_port)

    # fortio turns a `host` metadata entry into the :authority of its calls.
    target = ["-grpc", "-ping", "-s", "1", "-H", f"host: {AUTHORITY}", f"127.0.0.1:{port}"]

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        return h.fortio_load(fortio, target, qps, connections, seconds, workdir, ok_codes=("SERVING",))

    def hold(n: int) -> contextlib.AbstractContextManager[int]:
        return hold_grpc(port, n)

    return h.Target(name, proc, load, hold)


def targets_check(results: Sequence[h.TargetResult]) -> str:
    """Issue 16's gRPC target: tether's CPU per call at most 1.5x haproxy's."""
    by = {r.name: r for r in results if r.skipped is None}
    t, ha = by.get("tether"), by.get("haproxy")
    if t is None or ha is None:
        return ""
    t_cpu, ha_cpu = h.median(t.cpu_us_per_request), h.median(ha.cpu_us_per_request)
    if not t_cpu or not ha_cpu:
        return ""
    ratio = t_cpu / ha_cpu
    return (f"\ntargets (issue 16):\n  CPU per call <= 1.5x haproxy: {t_cpu:.1f} vs {ha_cpu:.1f} us, {ratio:.2f}x"
            f" {'ok' if ratio <= 1.5 else 'MISSED'}")


SUITE = h.Suite(
    kind="grpc",
    script="bench/grpc_unary.py",
    title=f"gRPC unary {PING_PATH}",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=start_backend,
    start_target=start_target,
    summary=targets_check,
)

if __name__ == "__main__":
    sys.exit(h.main(SUITE))
