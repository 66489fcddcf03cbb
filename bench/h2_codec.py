"""CPU per unary gRPC-shaped exchange through an HTTP/2 client and server pair, in memory.

Compares the ``h2`` library (the old codec's engine) with ``tether.core.http.h2proto``. One exchange
is what a proxied unary call costs the proxy's HTTP/2 engine: the client side sends a request head and
one DATA frame (ending the stream), the server side answers with a response head, one DATA frame and
trailers; each side parses what the other sent and acknowledges the received data. Run with
``PYTHONPATH=src python bench/h2_codec.py [N]``; compiled when tether.native says so.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

REQ = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/helloworld.Greeter/SayHello"),
    (b":authority", b"greeter.default.svc.cluster.local:50051"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
    (b"user-agent", b"grpc-python/1.66.0 grpc-c/43.0.0 (linux; chttp2)"),
]
RESP = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
MSG = b"\x00\x00\x00\x00\x0c\n\nworld-0001"
REPLY = b"\x00\x00\x00\x00\x12\n\x10Hello world-0001"


def bench_h2(n: int) -> float:
    import h2.config
    import h2.connection
    import h2.events

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    return _exchanges(c, s, h2.events.DataReceived, n)


def bench_tether(n: int) -> float:
    from tether.core.http import h2proto

    return _exchanges(h2proto.H2Connection(True), h2proto.H2Connection(False), h2proto.DataReceived, n)


def _exchanges(c: Any, s: Any, data_received: type, n: int) -> float:
    """CPU per unary exchange between client ``c`` and server ``s`` (the two libraries share the
    method names this uses)."""
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())

    def one() -> None:
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, REQ)
        c.send_data(sid, MSG, end_stream=True)
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, data_received):
                s.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        s.send_headers(sid, RESP)
        s.send_data(sid, REPLY)
        s.send_headers(sid, TRAILERS, end_stream=True)
        for ev in c.receive_data(s.data_to_send()):
            if isinstance(ev, data_received):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        s.receive_data(c.data_to_send())

    return _time(one, n)


def _time(one: Callable[[], None], n: int) -> float:
    for _ in range(min(n, 500)):
        one()
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            one()
        best = min(best, (time.process_time() - t0) / n)
    return best


def main() -> None:
    import tether.native

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    old = bench_h2(n)
    new = bench_tether(n)
    print(f"tether.native: {tether.native.state}")
    print(f"h2 (h2+hpack+hyperframe): {old * 1e6:8.1f} us CPU per exchange")
    print(f"tether h2proto:           {new * 1e6:8.1f} us CPU per exchange  ({old / new:.1f}x less)")


if __name__ == "__main__":
    main()
