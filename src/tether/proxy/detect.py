"""Per-connection protocol detection, then hand-off to the protocol's own codec.

A :class:`DetectProtocol` is the first protocol of every accepted connection. It reads up to
``detect_peek_bytes``, asks :func:`tether.core.http.detect.detect` what they are, and passes the
transport and the bytes read so far to ``on_detected``. Ports in the opaque-ports list skip
detection at once (server-speaks-first protocols never wait); so do ports whose policy says opaque
(inbound) and original destinations discovery says are opaque (outbound), the answer awaited first
when it is not known yet (bytes the client sends meanwhile are kept); and a detection timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from tether.core import transport_header
from tether.core.http.detect import Detected, detect, looks_like_http1_prefix
from tether.proxy.config import DetectSettings
from tether.proxy.http.message import Connection
from tether.proxy.tcp import linger_close
from tether.proxy.tlspeer import peer_identity

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80

# (what, transport, connection facts, bytes read so far, whether the client already sent EOF)
OnDetected = Callable[[Detected, asyncio.Transport, Connection, bytes, bool], None]


# get_extra_info's default when a transport was not told a connection's original destination.
UNKNOWN_DST: object = object()


def original_dst(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """The pre-REDIRECT destination of an accepted IPv4 connection, if it was redirected.

    A transport may know it already (``original_dst`` extra info: the inbound mesh listener asked
    the socket before the TLS handshake); otherwise the socket is asked."""
    known = transport.get_extra_info("original_dst", UNKNOWN_DST)
    if known is not UNKNOWN_DST:
        return known
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    return socket_original_dst(sock, transport.get_extra_info("sockname"))


def socket_original_dst(sock: Any, local: Any) -> tuple[str, int] | None:
    """What :func:`original_dst` says, asked of an accepted socket whose local address is ``local``
    (its getsockname(): two items for IPv4, four for IPv6; None if unknown). ``sock``: a socket, or
    what a loop's transport gives for one (uvloop's TransportSocket)."""
    if sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = int.from_bytes(raw[2:4], "big")
    ip = socket.inet_ntoa(raw[4:8])
    if local is not None and (ip, port) == (local[0], local[1]):
        return None  # not redirected: conntrack reports the listener itself
    return ip, port


class DetectProtocol(asyncio.Protocol):
    def __init__(self, direction: str, cfg: DetectSettings, on_detected: OnDetected,
                 tls: bool = False, client_id: str | None = None,
                 opaque: Callable[[int], bool | Awaitable[bool]] | None = None,
                 dst_opaque: Callable[[tuple[str, int]], bool | Awaitable[bool]] | None = None) -> None:
        self.direction = direction
        # Whether to skip detection, known now or after a lookup (awaited, bounded by the lookup):
        self.opaque = opaque  # the port's policy says opaque (inbound: a Server with proxyProtocol opaque)
        self.dst_opaque = dst_opaque  # discovery says the original destination is opaque (outbound)
        self._lookup: asyncio.Task[None] | None = None  # while a lookup's answer is awaited
        self.cfg = cfg
        self.on_detected = on_detected
        self.tls = tls
        self.client_id = client_id
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self._buf = b""
        self._timer: asyncio.TimerHandle | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            # Mesh mTLS was terminated before detection: the client's identity is verified.
            self.tls = True
            self.client_id = peer_identity(ssl_object)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        dst = original_dst(transport)
        self.conn = Connection(
            direction=self.direction,
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
            orig_dst=dst,
            tls=self.tls,
            client_id=self.client_id,
        )
        port = dst[1] if dst is not None else None
        if port is None and self.direction == "inbound":
            port = self.cfg.inbound_app_port
        verdict: bool | Awaitable[bool] = False
        if port is not None:
            if port in self.cfg.opaque_ports:
                verdict = True
            elif self.opaque is not None:
                verdict = self.opaque(port)
        if verdict is False and dst is not None and self.dst_opaque is not None:
            verdict = self.dst_opaque(dst)
        if verdict is True:
            self._decide(Detected.OPAQUE)
            return
        loop = asyncio.get_running_loop()
        if verdict is not False:
            self._lookup = loop.create_task(self._await_verdict(verdict))
        self._timer = loop.call_later(self.cfg.detect_timeout, self._on_timeout)

    async def _await_verdict(self, verdict: Awaitable[bool]) -> None:
        try:
            opaque = await verdict
        except Exception:  # a lookup that failed is no verdict: detect as without one
            log.exception("%s: looking up whether %s is opaque failed", self.direction,
                          self.conn.orig_dst if self.conn else "?")
            opaque = False
        self._lookup = None
        if self._done:
            return
        if opaque:
            self._decide(Detected.OPAQUE)
        elif self._buf:
            self._detect()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if not self._buf and data:
            loop = asyncio.get_running_loop()
            if self.conn is not None:
                self.conn.first_byte_at = loop.time()  # the HTTP/1 head's timeout counts from here
            if self.cfg.header_read_timeout < self.cfg.detect_timeout:
                # A client that starts an HTTP request line must finish its head within the header
                # timeout (slowloris), even while we are still detecting.
                self._header_timer = loop.call_later(self.cfg.header_read_timeout, self._on_header_timeout)
        self._buf += data
        if self._lookup is None:
            self._detect()

    def _detect(self) -> None:
        if self.tls and transport_header.is_prefix(self._buf):
            self._read_transport_header()
            return
        result = detect(self._buf, self.cfg.detect_peek_bytes)
        if result is not Detected.NEED_MORE:
            self._decide(result)

    def _read_transport_header(self) -> None:
        assert self.conn is not None
        try:
            got = transport_header.decode(self._buf)
        except transport_header.TransportHeaderError as e:
            log.info("bad transport header from %s: %s; closing", self.conn.peer, e)
            self._done = True
            self._cancel_timers()
            if self.transport is not None:
                self.transport.close()
            return
        if got is None:
            return  # need more bytes
        header, used = got
        self._buf = self._buf[used:]
        self.conn.target_port = header.port
        # What follows the header: HTTP/1 or HTTP/2 served to the named port (its session protocol),
        # or an opaque stream forwarded as is.
        if header.protocol == transport_header.HTTP2:
            self._decide(Detected.H2)
        elif header.protocol == transport_header.HTTP1:
            self._decide(Detected.HTTP1)
        else:
            self._decide(Detected.OPAQUE)

    def eof_received(self) -> bool:
        if not self._done:
            # The client half-closed before we knew the protocol: whatever it sent is opaque.
            self._decide(Detected.OPAQUE, eof=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timers()
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None

    def _cancel_timers(self) -> None:
        for t in (self._timer, self._header_timer):
            if t is not None:
                t.cancel()
        self._timer = self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._done or not looks_like_http1_prefix(self._buf):
            return
        self._done = True
        self._cancel_timers()
        log.info("request line from %s not complete within %gs; closing",
                 self.conn.peer if self.conn else "?", self.cfg.header_read_timeout)
        if self.transport is not None:
            reason = b"timed out reading request headers"
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nl5d-proxy-error: " + reason
                + b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b\n" % (len(reason) + 1, reason))
            linger_close(self.transport, self.cfg.linger_timeout)

    def _on_timeout(self) -> None:
        self._timer = None
        if not self._done and self._buf and looks_like_http1_prefix(self._buf):
            # A request head arriving slower than detection waits (slowloris): it is HTTP/1 all
            # the same. The HTTP/1 server answers it, and its header timeout, counted from the
            # first byte, closes it; forwarded as TCP it would tie up the application instead.
            self._decide(Detected.HTTP1)
            return
        if not self._done:
            log.info("protocol detection timed out after %gs for %s; treating as opaque TCP",
                     self.cfg.detect_timeout, self.conn.peer if self.conn else "?")
            self._decide(Detected.OPAQUE)

    def _decide(self, what: Detected, eof: bool = False) -> None:
        self._done = True
        self._cancel_timers()
        if self._lookup is not None:  # decided without it (the client's EOF, the detection timeout)
            self._lookup.cancel()
            self._lookup = None
        assert self.transport is not None and self.conn is not None
        if what is Detected.TLS:
            what = Detected.OPAQUE  # TLS from the app itself: forwarded as bytes
        self.conn.protocol = {Detected.HTTP1: "http/1", Detected.H2: "h2"}.get(what, "tcp")
        self.on_detected(what, self.transport, self.conn, self._buf, eof)
