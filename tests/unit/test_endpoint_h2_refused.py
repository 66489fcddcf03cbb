"""A request an HTTP/2 upstream refused (RST_STREAM REFUSED_STREAM: it did no work on it) is sent once
more with its whole body, over a real socket to a real HTTP/2 server (the h2 library)."""

from __future__ import annotations

import asyncio
import socket
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events

from tether.proxy.config import ProxyConfig, client_settings
from tether.proxy.endpoint import HttpEndpoint
from tether.proxy.errors import UpstreamError
from tether.proxy.http.body import PipeBody, read_all
from tether.proxy.http.message import Request


class RefusingServer:
    """Refuses the first ``refuse`` streams after reading their whole request; answers the rest with
    the request body echoed. ``bodies`` records each stream's request body as received."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.bodies: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        bodies: dict[int, bytearray] = {}
        while data := conn.recv(65536):
            for ev in h2c.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    bodies[ev.stream_id] = bytearray()
                elif isinstance(ev, h2.events.DataReceived):
                    bodies[ev.stream_id] += ev.data
                    h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    body = bytes(bodies.pop(ev.stream_id))
                    self.bodies.append(body)
                    if len(self.bodies) <= self.refuse:
                        h2c.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                    else:
                        h2c.send_headers(ev.stream_id, [(b":status", b"200")])
                        h2c.send_data(ev.stream_id, body, end_stream=True)
            conn.sendall(h2c.data_to_send())
        conn.close()

    def close(self) -> None:
        self.sock.close()


def request(body: PipeBody) -> Request:
    return Request(b"POST", b"/echo", b"upstream", headers=[(b"content-type", b"application/grpc")],
                   body=body, version="2")


def send(server: RefusingServer, body: bytes, finish: bool) -> tuple[int, bytes] | UpstreamError:
    async def main() -> tuple[int, bytes] | UpstreamError:
        ep = HttpEndpoint(("127.0.0.1", server.port), client_settings(ProxyConfig(), 5.0))
        pipe = PipeBody(None)
        pipe.feed(body)
        if finish:
            pipe.finish()
        else:
            asyncio.get_running_loop().call_later(0.2, pipe.finish)  # the body is still arriving
        try:
            resp = await ep(request(pipe))
        except UpstreamError as e:
            return e
        return resp.status, await read_all(resp.body, 1 << 20)

    return asyncio.run(main())


def test_a_refused_request_is_sent_again_with_its_whole_body() -> None:
    server = RefusingServer(refuse=1)
    try:
        assert send(server, b"hello, twice", finish=True) == (200, b"hello, twice")
        assert server.bodies == [b"hello, twice", b"hello, twice"]
    finally:
        server.close()


def test_refused_twice_is_an_upstream_error() -> None:
    server = RefusingServer(refuse=2)
    try:
        err = send(server, b"x", finish=True)
        assert isinstance(err, UpstreamError) and "refused" in str(err).lower()
        assert server.bodies == [b"x", b"x"]
    finally:
        server.close()


def test_a_body_still_arriving_is_not_sent_twice() -> None:
    # Its first bytes were already sent: a second try could only send the rest.
    server = RefusingServer(refuse=1)
    try:
        err = send(server, b"partial", finish=False)
        assert isinstance(err, UpstreamError) and "REFUSED_STREAM" in str(err)
        assert server.bodies == [b"partial"]
    finally:
        server.close()
