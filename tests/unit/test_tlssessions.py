"""TLS 1.3 session resumption between two proxies' identities, over real loopback sockets: the
contexts IdentityClient builds, the inbound mesh listener (which decides who gets a ticket) and
the client transport with its session cache. Then the cache's bounds alone, with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from test_proxy_identity import CA, DB, WEB, make

from tether.core.http.detect import client_hello_extensions
from tether.proxy import tlsctl
from tether.proxy.config import DetectSettings
from tether.proxy.identity import IdentityClient
from tether.proxy.meshtls import MeshTlsListener
from tether.proxy.tlspeer import peer_identity
from tether.proxy.tlssessions import SessionCache, cert_time_to_seconds, resumed_peer_problem
from tether.proxy.tlstransport import tls_accept, tls_connect

DEADLINE = 10.0
ALPN = ("transport.l5d.io/v1", "h2")
DETECT = DetectSettings(opaque_ports=frozenset(), detect_timeout=DEADLINE, detect_peek_bytes=1024,
                        header_read_timeout=DEADLINE, linger_timeout=1.0, inbound_app_port=None)


class Echo(asyncio.Protocol):
    """Server end: echoes, and records the peer identity its TLS session proved."""

    seen: list[tuple[str | None, bool]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        sslobj = transport.get_extra_info("ssl_object")
        self.seen.append((peer_identity(sslobj), bool(sslobj and sslobj.session_reused)))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.got = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.got.set()

    async def echoed(self, data: bytes) -> None:
        async with asyncio.timeout(DEADLINE):
            while bytes(self.data) != data:
                self.got.clear()
                await self.got.wait()


def identities(tmp_path: Path, **kw: Any) -> tuple[IdentityClient, IdentityClient, CA]:
    ca = CA(tmp_path)
    web, db = (make(tmp_path, ca, name, alpn_protocols=ALPN, **kw) for name in (WEB, DB))
    for c in (web, db):
        c.install(c._verify(ca.answer(c), "ca"))
    return web, db, ca


class Mesh:
    """``db``'s inbound mesh listener on loopback, and round trips from ``web`` through its cache."""

    def __init__(self, web: IdentityClient, db: IdentityClient) -> None:
        self.web, self.db = web, db
        self.seen: list[tuple[str | None, bool]] = []

        def factory() -> Echo:
            p = Echo()
            p.seen = self.seen
            return p

        self.listener = MeshTlsListener(DETECT, DEADLINE, db, ("127.0.0.1", 0), factory)
        self.port = self.listener.start()[1]

    async def round_trip(self, expect: str = DB, sessions: SessionCache | None = None) -> bool:
        """One new connection, one echoed message, closed; True if the client resumed a session.

        ``sessions``: default the client identity's own cache."""
        cache = self.web.client_sessions() if sessions is None else sessions
        transport, client = await tls_connect(Client, "127.0.0.1", self.port, self.web.client_ssl_context(), expect,
                                              DEADLINE, cache)
        reused = bool(transport.get_extra_info("ssl_object").session_reused)
        self.web.count_handshake("outbound", reused)
        transport.write(b"ping")
        await client.echoed(b"ping")
        transport.close()
        return reused


def run(coro: Callable[[], Any]) -> None:
    uvloop.run(coro())


def test_the_second_connection_resumes_and_both_ends_still_know_their_peer(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        assert [await mesh.round_trip() for _ in range(3)] == [False, True, True]
        # The server end: resumed too, and the client's identity is the one its certificate proved
        # in the full handshake (authorization and the client_id label read it).
        assert mesh.seen == [(WEB, False), (WEB, True), (WEB, True)]
        transport, _ = await tls_connect(Client, "127.0.0.1", mesh.port, web.client_ssl_context(), DB, DEADLINE,
                                         web.client_sessions())
        sock = transport.get_extra_info("ssl_object")
        assert sock.session_reused and peer_identity(sock) == DB and sock.version() == "TLSv1.3"
        transport.close()
        mesh.listener.close()

    run(scenario)
    assert db.metrics.handshakes_total == {("inbound", False): 1, ("inbound", True): 3}
    lines = web.metrics_lines() + db.metrics_lines()
    assert 'tls_handshakes_total{direction="outbound",resumed="true"} 2' in lines
    assert 'tls_handshakes_total{direction="inbound",resumed="false"} 1' in lines
    assert "tls_session_cache_entries 1" in web.metrics_lines()


def test_the_server_keeps_sessions_itself_and_bounds_their_lifetime(tmp_path: Path) -> None:
    """Stateful tickets (tlsctl): resuming looks the session up instead of decoding a ticket that
    carries it, and the lifetime the server gives its tickets is the configured max age."""
    web, db, _ = identities(tmp_path, session_max_age=120.0)
    assert tlsctl.available() and db.stateful_sessions
    server_ctx = db.server_ssl_context()
    assert server_ctx.options & ssl.OP_NO_TICKET  # in TLS 1.3 with tickets issued: stateful ones

    async def scenario() -> None:
        mesh = Mesh(web, db)
        assert [await mesh.round_trip() for _ in range(3)] == [False, True, True]
        mesh.listener.close()

    run(scenario)
    stats = server_ctx.session_stats()
    assert stats["number"] == 1 and stats["hits"] == 2, stats
    cache = web.client_sessions()
    assert cache is not None
    session = cache.offer(next(iter(cache._entries)))
    assert session is not None and session.ticket_lifetime_hint == 120
    # The client offers it without the ssl module's copy, and only on a socket of its own context.
    a, b = socket.socketpair()
    with a, b:
        sock = web.client_ssl_context().wrap_socket(a, server_hostname=DB, do_handshake_on_connect=False)
        assert tlsctl.offer_session(sock, session)
        other = db.client_ssl_context().wrap_socket(b, server_hostname=WEB, do_handshake_on_connect=False)
        assert not tlsctl.offer_session(other, session)


def test_without_tlsctl_sessions_travel_in_tickets_and_still_resume(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable path (another interpreter or OpenSSL): stateless tickets, the ssl module's copy."""
    monkeypatch.setattr(tlsctl, "_lib", None)
    web, db, _ = identities(tmp_path)
    assert not db.stateful_sessions and not db.server_ssl_context().options & ssl.OP_NO_TICKET

    async def scenario() -> None:
        mesh = Mesh(web, db)
        assert [await mesh.round_trip() for _ in range(3)] == [False, True, True]
        assert [seen[1] for seen in mesh.seen] == [False, True, True]
        mesh.listener.close()

    run(scenario)
    assert db.server_ssl_context().session_stats()["number"] == 0  # nothing kept by the server


def _listener() -> tuple[socket.socket, int]:
    """A non-blocking listening socket on a free loopback port, and the port."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    return lsock, lsock.getsockname()[1]


def test_a_session_for_one_identity_is_never_used_for_another(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        # A server that terminates TLS whatever the SNI (the mesh listener would pass a ClientHello
        # for another name through untouched) and issues a ticket on every connection.
        loop = asyncio.get_running_loop()
        lsock, port = _listener()

        async def accept() -> None:
            while True:
                conn, _ = await loop.sock_accept(lsock)
                with contextlib.suppress(OSError, ssl.SSLError):
                    await tls_accept(Echo, conn, db.server_ssl_context(), DEADLINE, tickets=1)

        Echo.seen = []
        task = loop.create_task(accept())
        cache = web.client_sessions()
        assert cache is not None

        async def connect(expect: str) -> bool:
            transport, client = await tls_connect(Client, "127.0.0.1", port, web.client_ssl_context(), expect,
                                                  DEADLINE, cache)
            reused = bool(transport.get_extra_info("ssl_object").session_reused)
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
            return reused

        assert [await connect(DB), await connect(DB)] == [False, True]
        # Same address, another expected identity: nothing is offered, and the full handshake
        # fails on the name, as it does without resumption.
        assert cache.offer((WEB, "127.0.0.1", port)) is None
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(WEB)
        # Even a session filed under the wrong name (a cache bug) is refused: OpenSSL does not
        # re-verify a resumed peer, so the transport checks the name itself.
        cache._entries[(WEB, "127.0.0.1", port)] = cache._entries[(DB, "127.0.0.1", port)]
        with pytest.raises(ConnectionAbortedError, match=f"not {WEB}"):
            await connect(WEB)
        assert cache.offer((WEB, "127.0.0.1", port)) is None  # and it is not offered again
        task.cancel()
        lsock.close()

    run(scenario)


def test_past_the_age_bound_a_full_handshake_follows_and_the_cache_refills(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)
    now = [1000.0]

    async def scenario() -> None:
        mesh = Mesh(web, db)
        cache = SessionCache(web.client_ssl_context(), 16, 300.0, time.time() + 86400, clock=lambda: now[0])
        got = [(await mesh.round_trip(sessions=cache))]
        now[0] += 299.0
        got.append(await mesh.round_trip(sessions=cache))
        now[0] += 2.0  # 301 s after the full handshake
        got.append(await mesh.round_trip(sessions=cache))
        got.append(await mesh.round_trip(sessions=cache))
        assert got == [False, True, False, True]
        mesh.listener.close()

    run(scenario)


def test_after_a_rotation_no_session_of_the_old_contexts_is_offered_or_accepted(tmp_path: Path) -> None:
    web, db, ca = identities(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        await mesh.round_trip()
        old_cache = web.client_sessions()
        assert old_cache is not None and len(old_cache) == 1
        # The client renews: new contexts, a new (empty) cache; the old cache's sessions are not
        # offered (and a cache handed the wrong context is ignored, not an exception).
        web.install(web._verify(ca.answer(web), "ca"))
        assert web.client_sessions() is not old_cache and len(web.client_sessions() or ()) == 0
        assert not (await mesh.round_trip())
        assert not (await mesh.round_trip(sessions=old_cache))
        assert (await mesh.round_trip())
        # The server renews: its new context has new ticket keys and refuses the client's session;
        # the client forgets it, asks for a ticket on the next full handshake, then resumes.
        db.install(db._verify(ca.answer(db), "ca"))
        got = [(await mesh.round_trip()) for _ in range(3)]
        assert got == [False, False, True]
        assert [s[1] for s in mesh.seen[-3:]] == [False, False, True]
        mesh.listener.close()

    run(scenario)


def test_resumption_off_issues_and_accepts_no_tickets(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path, session_max_age=0.0)
    assert web.client_sessions() is None and db.server_ssl_context().options & ssl.OP_NO_TICKET

    async def scenario() -> None:
        mesh = Mesh(web, db)
        assert [(await mesh.round_trip()) for _ in range(2)] == [False, False]
        mesh.listener.close()

    run(scenario)


def _ticketless_server(tmp_path: Path) -> tuple[IdentityClient, IdentityClient]:
    """web, and db issuing no tickets (as Linkerd's proxy does)."""
    web, db, _ = identities(tmp_path)
    db.config.session_max_age = 0.0
    db._build_contexts()
    return web, db


def test_a_server_that_issues_no_ticket_is_not_asked_again(tmp_path: Path) -> None:
    web, db = _ticketless_server(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        for _ in range(3):
            assert not (await mesh.round_trip())
        cache = web.client_sessions()
        assert cache is not None and len(cache) == 1 and cache.offer((DB, "127.0.0.1", mesh.port)) is None
        mesh.listener.close()

    run(scenario)


def test_a_resumed_peer_whose_certificate_has_expired_is_refused(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        await mesh.round_trip()
        transport, _client = await tls_connect(Client, "127.0.0.1", mesh.port, web.client_ssl_context(), DB, DEADLINE,
                                              web.client_sessions())
        sock = transport.get_extra_info("ssl_object")
        assert sock.session_reused
        assert resumed_peer_problem(sock, DB, time.time()) is None
        assert "expired" in (resumed_peer_problem(sock, DB, time.time() + 400 * 86400) or "")
        transport.close()
        mesh.listener.close()

    run(scenario)


# -- the listener's ticket decision reads the ClientHello ------------------------------------------


def _client_hello(ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> bytes:
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=DB, session=session)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _extension(hello: bytes, wanted: int) -> bytes | None:
    hs = hello[5:]
    pos = 4 + 2 + 32
    pos += 1 + hs[pos]
    pos += 2 + int.from_bytes(hs[pos:pos + 2], "big")
    pos += 1 + hs[pos]
    end = pos + 2 + int.from_bytes(hs[pos:pos + 2], "big")
    pos += 2
    while pos < end:
        kind, size = int.from_bytes(hs[pos:pos + 2], "big"), int.from_bytes(hs[pos + 2:pos + 4], "big")
        if kind == wanted:
            return hs[pos + 4:pos + 4 + size]
        pos += 4 + size
    return None


def test_client_hello_says_whether_the_client_wants_a_ticket(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)
    exts = client_hello_extensions(_client_hello(web.client_ssl_context()))
    assert exts is not None and 35 in exts and 41 not in exts  # session_ticket, no pre_shared_key

    async def session() -> None:
        mesh = Mesh(web, db)
        await mesh.round_trip()
        mesh.listener.close()

    run(session)
    cache = web.client_sessions()
    offered = cache.offer(next(iter(cache._entries))) if cache is not None else None
    assert offered is not None
    hello = _client_hello(web.client_ssl_context(), offered)
    exts = client_hello_extensions(hello)
    assert exts is not None and 41 in exts  # a resuming client: no new ticket for it
    # Forward secrecy: the only PSK mode offered is psk_dhe_ke (1): a resumed session still does
    # an (EC)DHE key exchange, never psk_ke (0) alone.
    assert _extension(hello, 45) == b"\x01\x01"
    off, _, _ = identities(tmp_path, session_max_age=0.0)
    exts = client_hello_extensions(_client_hello(off.client_ssl_context()))
    assert exts is not None and 35 not in exts
    assert client_hello_extensions(b"\x16\x03\x01\x00\x05junk") is None
    assert client_hello_extensions(b"GET / HTTP/1.1\r\n") is None


# -- the cache's bounds (a stub socket: the cache reads the peer's notAfter and the session) -------


def _sock(not_after: float, ticket: bool = True, lifetime: int = 300) -> Any:
    text = time.strftime("%b %d %H:%M:%S %Y GMT", time.gmtime(not_after))
    return SimpleNamespace(getpeercert=lambda: {"notAfter": text},
                           session=SimpleNamespace(has_ticket=ticket, ticket_lifetime_hint=lifetime))


def test_the_cache_is_bounded_by_age_both_certificates_and_entries() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    now, wall = [0.0], 1_000_000.0
    own_not_after = wall + 100.0
    cache = SessionCache(ctx, 2, 300.0, own_not_after, clock=lambda: now[0], wall=lambda: wall)
    a, b, c = ("a", "10.0.0.1", 4143), ("b", "10.0.0.2", 4143), ("c", "10.0.0.3", 4143)
    assert cache.store(a, _sock(wall + 50.0))  # the peer's certificate ends first: 50 s
    assert cache.store(b, _sock(wall + 10_000.0))  # ours does: 100 s
    assert cache.offer(a) is not None and cache.offer(b) is not None
    assert cache.store(c, _sock(wall + 10_000.0))  # a third key evicts the least recently used (a)
    assert len(cache) == 2 and cache.offer(a) is None and cache.offer(c) is not None
    now[0] = 99.0
    assert cache.offer(b) is not None
    now[0] = 100.0
    assert cache.offer(b) is None and cache.wants(b)
    assert not cache.store(a, _sock(wall - 1.0))  # an expired peer is never kept
    assert cache.store(c, _sock(wall + 10_000.0, lifetime=30))  # the server's ticket lifetime bounds it too
    now[0] = 129.0
    assert cache.offer(c) is not None
    now[0] = 130.0
    assert cache.offer(c) is None
    assert not cache.store(a, _sock(wall + 50.0, ticket=False)) and not cache.wants(a) and cache.offer(a) is None
    with pytest.raises(ValueError):
        SessionCache(ctx, 0, 300.0, None)


def test_a_burst_of_new_connections_costs_one_full_handshake(tmp_path: Path) -> None:
    """Connections opened while a full handshake to the same peer is under way wait for its session
    and resume it, instead of each doing a full handshake of its own (and each end keeping a decoded
    certificate chain per connection)."""
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        resumed = await asyncio.gather(*(mesh.round_trip() for _ in range(20)))
        assert sorted(resumed) == [False] + [True] * 19
        assert sorted(seen[1] for seen in mesh.seen) == [False] + [True] * 19
        assert {seen[0] for seen in mesh.seen} == {WEB}
        mesh.listener.close()

    run(scenario)
    assert db.metrics.handshakes_total == {("inbound", False): 1, ("inbound", True): 19}


def test_a_burst_to_a_server_that_issues_no_ticket_is_not_held_up(tmp_path: Path) -> None:
    web, db = _ticketless_server(tmp_path)

    async def scenario() -> None:
        mesh = Mesh(web, db)
        async with asyncio.timeout(DEADLINE):
            assert await asyncio.gather(*(mesh.round_trip() for _ in range(10))) == [False] * 10
        cache = web.client_sessions()
        assert cache is not None and not cache.wants((DB, "127.0.0.1", mesh.port))  # remembered: no tickets
        mesh.listener.close()

    run(scenario)


def test_when_the_first_handshake_of_a_burst_fails_the_others_go_on(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        lsock, port = _listener()
        Echo.seen = []

        async def accept() -> None:
            conn, _ = await loop.sock_accept(lsock)
            conn.close()  # the first connection: refused mid-handshake
            while True:
                conn, _ = await loop.sock_accept(lsock)
                with contextlib.suppress(OSError, ssl.SSLError):
                    await tls_accept(Echo, conn, db.server_ssl_context(), DEADLINE, tickets=1)

        task = loop.create_task(accept())

        async def connect() -> bool:
            transport, client = await tls_connect(Client, "127.0.0.1", port, web.client_ssl_context(), DB,
                                                  DEADLINE, web.client_sessions())
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
            return True

        async with asyncio.timeout(DEADLINE / 2):
            outcomes = await asyncio.gather(*(connect() for _ in range(8)), return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], (OSError, ssl.SSLError)), outcomes
        assert outcomes.count(True) == 7
        task.cancel()
        lsock.close()

    run(scenario)


@pytest.mark.parametrize("text", ["Dec  6 12:10:21 2026 GMT", "Jan 01 00:00:00 1970 GMT", "Feb 29 23:59:59 2028 GMT",
                                  "Jun 30 08:05:09 2049 GMT", "Sep  9 01:02:03 9999 GMT"])
def test_certificate_times_read_as_the_ssl_module_reads_them(text: str) -> None:
    assert cert_time_to_seconds(text) == ssl.cert_time_to_seconds(text)


@pytest.mark.parametrize("text", ["", "Dec  6 12:10:21 2026", "Dec  6 12:10:21 2026 UTC", "Foo  6 12:10:21 2026 GMT",
                                  "Dec  6 25:10:21 2026 GMT", "Dec  6 12:10 2026 GMT",
                                  "Dec  6 12:10:21.5 2026 GMT", "Dec x6 12:10:21 2026 GMT"])
def test_certificate_times_the_ssl_module_refuses_are_none(text: str) -> None:
    with pytest.raises(ValueError):
        ssl.cert_time_to_seconds(text)
    assert cert_time_to_seconds(text) is None


def test_a_date_that_does_not_exist_is_none() -> None:
    assert cert_time_to_seconds("Feb 30 12:10:21 2026 GMT") is None  # (strptime rolls it into March)
