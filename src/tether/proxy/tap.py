"""Tap: live request events for authorized observers (linkerd2-proxy-api's io.linkerd.proxy.tap).

:class:`TapHub` is what the stacks' tap layers see: ``hub.observers``, a tuple that is empty while
nobody taps, so a request pays one attribute check (:mod:`tether.proxy.layers.tap`). Each running
tap is an :class:`Observer`: its match, its request limit and rate, and a bounded queue of events
read by the gRPC stream that serves it. A request never waits for an observer: when the queue is
full the event is dropped and counted (``tether_tap_events_dropped_total``).

Events are queued as plain tuples and encoded as ``TapEvent`` messages by the stream's reader,
so a tapped request costs the proxy a few tuple appends, not protobuf work.

:class:`TapServer` serves ``Tap/Observe`` over HTTP/2 with mesh mTLS on ``--tap-addr``; only the
client identities in ``--tap-authorized-identities`` get events, anyone else PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from tether.core.discovery.endpoints import Addr
from tether.core.http.detect import Detected
from tether.proxy.http.body import Body, BodyError, read_all
from tether.proxy.http.message import Connection, Request, Response

if TYPE_CHECKING:
    from tether.proxy.config import ProxyConfig
    from tether.proxy.identity import IdentityClient
    from tether.proxy.server import Connections

log = logging.getLogger(__name__)

INBOUND: Final = 1  # TapEvent.ProxyDirection
OUTBOUND: Final = 2
OBSERVE_PATH: Final = b"/io.linkerd.proxy.tap.Tap/Observe"
MAX_REQUEST_BYTES: Final = 64 * 1024  # an ObserveRequest is a few hundred bytes
DEFAULT_TAP_SA: Final = "tap.linkerd-viz"  # Linkerd's viz tap: service account tap, namespace linkerd-viz


class Facts:
    """What a tap match can look at: one request as a tap layer saw it."""

    __slots__ = ("authority", "direction", "dst", "dst_tls", "method", "path", "scheme", "src", "src_tls", "wire")

    def __init__(self, direction: int, src: Addr, dst: Addr, src_tls: str, dst_tls: str, req: Request) -> None:
        self.direction = direction
        self.src = src
        self.dst = dst
        self.src_tls = src_tls  # the "tls" label of the source (inbound: how the client reached us)
        self.dst_tls = dst_tls  # of the destination (outbound: whether the endpoint is meshed)
        self.method = req.method
        self.scheme = req.scheme
        self.authority = req.authority
        self.path = req.path
        self.wire: bytes | None = None  # the encoded fields every event of this request shares (tap_wire)


Match = Callable[[Facts], bool]

# Queued events (encoded by the reader, tap_wire.encode):
#   ("req", stream, facts, headers)
#   ("rsp", stream, facts, since_request_ns, status, headers)
#   ("end", stream, facts, since_request_ns, since_response_ns, response_bytes, grpc_status, reset_code, trailers)
Event = tuple[Any, ...]


class Observer:
    """One running tap: which requests it wants, and the events waiting for its client."""

    __slots__ = ("_waiter", "buffer", "closed", "dropped", "extract_headers", "hub", "inflight", "interval",
                 "match", "next_at", "remaining", "status")

    def __init__(self, hub: TapHub, match: Match, limit: int, max_rps: float, buffer: int,
                 extract_headers: bool) -> None:
        self.hub = hub
        self.match = match
        self.remaining = limit if limit > 0 else -1  # requests still to report (-1: no limit)
        self.interval = 1.0 / max_rps if max_rps > 0 else 0.0
        self.next_at = 0.0
        self.buffer: deque[Event] = deque()
        self.extract_headers = extract_headers
        self.inflight = 0
        self.dropped = 0
        self.closed = False
        self.status = 0  # grpc-status the stream ends with
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, facts: Facts, now: float) -> bool:
        """True when this tap reports the request (its limit and rate are spent on it)."""
        if self.closed or self.remaining == 0 or now < self.next_at or not self.match(facts):
            return False
        if self.remaining > 0:
            self.remaining -= 1
        if self.interval:
            self.next_at = now + self.interval
        self.inflight += 1
        return True

    def offer(self, event: Event) -> None:
        """Queue an event for the client, or drop it when the queue is full (never wait)."""
        if self.closed:
            return
        if len(self.buffer) >= self.hub.max_buffered:
            self.dropped += 1
            self.hub.dropped_total += 1
        else:
            self.buffer.append(event)
            self._wake()

    def request_done(self) -> None:
        self.inflight -= 1
        if self.remaining == 0 and self.inflight <= 0:
            self.finish(0)  # the limit is reached and every reported request has ended

    def finish(self, status: int) -> None:
        """No more events: the stream ends (once the queue is read) with ``status``."""
        if not self.closed:
            self.closed = True
            self.status = status
            self.hub.remove(self)
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_events(self) -> list[Event]:
        """The events queued now (waiting for one), or [] once finished and drained."""
        while not self.buffer:
            if self.closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = list(self.buffer)
        self.buffer.clear()
        return out


class TapHub:
    """The running taps of one proxy, shared by every tap layer."""

    __slots__ = ("base", "dropped_total", "max_buffered", "max_observers", "observers", "running", "stream",
                 "tapped_total")

    def __init__(self, max_observers: int = 16, max_buffered: int = 1000) -> None:
        self.observers: tuple[Observer, ...] = ()  # empty: nobody taps, the layers do nothing
        # The same observers in a list changed in place: the layers keep it and test it per
        # request (a native truth test, not an attribute read of this interpreted object).
        self.running: list[Observer] = []
        self.max_observers = max_observers
        self.max_buffered = max_buffered
        # StreamId.base: random, fixed for this process (os.urandom: the secrets module would load
        # hashlib and OpenSSL's digests, ~1 MiB of RSS, for four bytes).
        self.base = int.from_bytes(os.urandom(4), "big")
        self.stream = 0
        self.dropped_total = 0
        self.tapped_total = 0

    def next_stream(self) -> int:
        self.stream += 1
        self.tapped_total += 1
        return self.stream

    def add(self, obs: Observer) -> bool:
        if len(self.observers) >= self.max_observers:
            return False
        self.observers = (*self.observers, obs)
        self.running[:] = self.observers
        return True

    def remove(self, obs: Observer) -> None:
        self.observers = tuple(o for o in self.observers if o is not obs)
        self.running[:] = self.observers

    def close_all(self, status: int) -> None:
        for obs in self.observers:
            obs.finish(status)

    def lines(self) -> list[str]:
        """Scrape-time series: taps running, requests reported, events dropped."""
        return [
            "# HELP tether_tap_observers Taps running now.",
            "# TYPE tether_tap_observers gauge",
            f"tether_tap_observers {len(self.observers)}",
            "# HELP tether_tap_requests_total Requests reported to at least one tap.",
            "# TYPE tether_tap_requests_total counter",
            f"tether_tap_requests_total {self.tapped_total}",
            "# HELP tether_tap_events_dropped_total Tap events dropped because a tap client read too slowly.",
            "# TYPE tether_tap_events_dropped_total counter",
            f"tether_tap_events_dropped_total {self.dropped_total}",
        ]


def now_ns() -> int:
    return time.perf_counter_ns()


# -- the gRPC stream of one tap ----------------------------------------------------------------------------


class TapStreamBody(Body):
    """The response body of one Observe call: gRPC-framed TapEvents as they come, then the status."""

    def __init__(self, obs: Observer, base: int) -> None:
        self.obs = obs
        self.base = base
        self.length = None
        self._trailers = None

    async def read(self) -> bytes:
        from tether.proxy import tap_wire

        events = await self.obs.next_events()
        if not events:
            self._trailers = [(b"grpc-status", str(self.obs.status).encode())]
            return b""
        return b"".join(tap_wire.frame(tap_wire.encode(self.base, e)) for e in events)

    def is_end_known(self) -> bool:
        return False

    def discard(self) -> None:
        # The client went away (or the stream was reset): stop collecting for it.
        self.obs.finish(1)


def grpc_error(code: int, message: str) -> Response:
    """A trailers-only gRPC response."""
    from urllib.parse import quote

    return Response(200, [(b"content-type", b"application/grpc"), (b"grpc-status", str(code).encode()),
                          (b"grpc-message", quote(message, safe=" :/.,=@-_'()").encode())])


class TapService:
    """The tap server's HTTP service: authorize the client, parse its ObserveRequest, stream events."""

    def __init__(self, hub: TapHub, authorized: frozenset[str]) -> None:
        self.hub = hub
        self.authorized = authorized

    async def __call__(self, req: Request) -> Response:
        from tether.proxy import tap_wire

        if req.path != OBSERVE_PATH:
            return grpc_error(12, f"unknown method {req.path.decode('latin-1')}")  # UNIMPLEMENTED
        conn = req.conn
        client = conn.client_id if conn is not None and conn.tls else None
        if client is None:
            return grpc_error(16, "tap needs a mesh mTLS client identity")  # UNAUTHENTICATED
        if client not in self.authorized:
            log.info("tap refused for %s (authorized: %s)", client, ", ".join(sorted(self.authorized)))
            return grpc_error(7, f"identity {client} is not authorized to tap")  # PERMISSION_DENIED
        try:
            raw = await read_all(req.body, MAX_REQUEST_BYTES)
            spec = tap_wire.parse_observe(raw)
        except (BodyError, tap_wire.TapRequestError) as e:
            return grpc_error(3, f"bad ObserveRequest: {e}")  # INVALID_ARGUMENT
        obs = Observer(self.hub, spec.match, spec.limit, spec.max_rps, self.hub.max_buffered, spec.extract_headers)
        if not self.hub.add(obs):
            return grpc_error(8, f"{self.hub.max_observers} taps are running already")  # RESOURCE_EXHAUSTED
        log.info("tap started by %s (limit %d, max rps %g)", client, spec.limit, spec.max_rps)
        return Response(200, [(b"content-type", b"application/grpc")], TapStreamBody(obs, self.hub.base))


def authorized_identities(cfg: ProxyConfig) -> frozenset[str]:
    """--tap-authorized-identities, else Linkerd's viz tap identity under this proxy's control plane."""
    if cfg.tap_authorized_identities:
        return frozenset(i.strip() for i in cfg.tap_authorized_identities.split(",") if i.strip())
    parts = (cfg.identity_name or "").split(".")
    if len(parts) > 4 and parts[2] == "serviceaccount" and parts[3] == "identity":
        return frozenset({f"{DEFAULT_TAP_SA}.serviceaccount.identity.{'.'.join(parts[4:])}"})
    return frozenset()


class TapServer:
    """The tap listener: mesh mTLS (the client's identity verified), HTTP/2, :class:`TapService`."""

    def __init__(self, cfg: ProxyConfig, hub: TapHub, identity: IdentityClient) -> None:
        from tether.proxy.config import detect_settings, h1_server_settings, h2_settings
        from tether.proxy.server import Connections

        self.addr = cfg.tap_addr
        self.hub = hub
        self.identity = identity
        self.handshake_timeout = cfg.identity_handshake_timeout
        # Tap connections are never redirected and never opaque.
        self.detect = dataclasses.replace(detect_settings(cfg), opaque_ports=frozenset(), inbound_app_port=None)
        self.service = TapService(hub, authorized_identities(cfg))
        self.connections: Connections = Connections("tap", h1_server_settings(cfg), h2_settings(cfg), False)
        self._listener: Any = None

    @property
    def authorized(self) -> frozenset[str]:
        return self.service.authorized

    def start(self) -> tuple[str, int]:
        from tether.proxy.meshtls import MeshTlsListener

        self._listener = MeshTlsListener(self.detect, self.handshake_timeout, self.identity, self.addr, self._accept)
        return self._listener.start()

    def _accept(self) -> asyncio.Protocol:
        from tether.proxy.detect import DetectProtocol

        return DetectProtocol("tap", self.detect, self._on_detected)

    def _on_detected(self, what: Detected, transport: asyncio.Transport, conn: Connection, buf: bytes,
                     eof: bool) -> None:
        if what is not Detected.H2:
            log.info("tap connection from %s:%d is not HTTP/2 (gRPC); closing", *conn.peer)
            transport.close()
            return
        from tether.proxy.metrics import TcpMetrics

        self.connections.serve_h2(self.service, transport, conn, buf, TcpMetrics(""))

    async def aclose(self) -> None:
        self.hub.close_all(14)  # UNAVAILABLE: the proxy is shutting down
        if self._listener is not None:
            self._listener.close()
        await asyncio.gather(*self.connections.drains(1.0), return_exceptions=True)
        self.connections.cancel_tasks()
