"""tether's own TLS transport over real loopback sockets: against itself and against the event loop's
TLS transport (uvloop's), with mutual TLS 1.3 contexts as the proxy builds them."""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop
from cryptography.hazmat.primitives import serialization

from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import IssuerCredentials
from tether.core.identity.csr import build_csr, generate_key, validate_csr
from tether.core.identity.issuance import issue_leaf
from tether.core.identity.names import parse_identity_name
from tether.proxy import tlsctl
from tether.proxy.tlspeer import peer_identity
from tether.proxy.tlstransport import TlsTransport, on_handshake_burst_end, tls_accept, tls_connect

WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
DB = "db.shop.serviceaccount.identity.linkerd.cluster.local"
ALPN = ["transport.l5d.io/v1", "h2"]
DEADLINE = 10.0


def _contexts() -> dict[str, tuple[ssl.SSLContext, ssl.SSLContext]]:
    """name -> (server context, client context), both presenting name's leaf, as IdentityClient builds them."""
    now = dt.datetime.now(dt.UTC)
    anchor, akey = create_anchor("root", now)
    issuer, ikey = create_issuer("identity", anchor, akey, now)
    pem = serialization.Encoding.PEM
    anchors = anchor.public_bytes(pem).decode()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name in (WEB, DB):
            key = generate_key()
            ident = parse_identity_name(name)
            leaf = issue_leaf(IssuerCredentials(issuer, ikey), validate_csr(build_csr(key, ident), ident), ident, now)
            path = Path(d) / f"{name}.pem"
            path.write_bytes(ssl.DER_cert_to_PEM_cert(leaf.leaf_der).encode()
                             + b"".join(ssl.DER_cert_to_PEM_cert(i).encode() for i in leaf.intermediates_der)
                             + key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
            pair = []
            for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
                ctx = ssl.SSLContext(purpose)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cadata=anchors)
                ctx.load_cert_chain(str(path))
                ctx.set_alpn_protocols(ALPN)
                pair.append(ctx)
            out[name] = (pair[0], pair[1])
    return out


CTX = _contexts()


class Recorder(asyncio.Protocol):
    """Keeps what arrives; echoes it back when asked; notes flow control and the end."""

    def __init__(self, echo: bool = False, paused: bool = False) -> None:
        self.echo = echo
        self.start_paused = paused
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.paused = 0
        self.resumed = 0
        loop = asyncio.get_running_loop()
        self.made: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.start_paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo and self.transport is not None:
            self.transport.write(data)
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)
        self.changed.set()

    async def wait_for(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE):
            while not cond():
                self.changed.clear()
                await self.changed.wait()


class Servers(list[Recorder]):
    """The server ends of accepted connections, in order; ``first`` waits for the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    def add(self, r: Recorder) -> Recorder:
        self.append(r)
        self.arrived.set()
        return r

    async def first(self) -> Recorder:
        async with asyncio.timeout(DEADLINE):
            await self.arrived.wait()
        return self[0]


async def _own_server(protocols: Servers, echo: bool = False, ctx: ssl.SSLContext | None = None,
                      paused: bool = False) -> tuple[int, asyncio.Task[None], socket.socket]:
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)

    def factory() -> Recorder:
        return protocols.add(Recorder(echo, paused))

    async def accept() -> None:
        while True:
            conn, _ = await loop.sock_accept(lsock)
            try:
                await tls_accept(factory, conn, ctx or CTX[DB][0], DEADLINE)
            except (OSError, ssl.SSLError):
                pass

    return lsock.getsockname()[1], loop.create_task(accept()), lsock


def run(coro: Callable[[], object]) -> None:
    uvloop.run(coro())  # type: ignore[arg-type]


@pytest.fixture(autouse=True, params=["c-helper", "ssl-module"])
def record_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both of the transport's record paths: the C helper (tether.proxy._tlsio,
    built by scripts/build-native like the compiled modules) and the ssl module's methods."""
    if request.param == "ssl-module":
        monkeypatch.setattr(tlsctl, "_io", None)
    else:
        from tether import native

        assert native.state == "compiled", f"the C helper is built with the compiled modules: {native.state}"
        assert tlsctl.record_io() is not None
    return str(request.param)


def test_mutual_tls_round_trip_with_alpn_and_the_peers_identity() -> None:
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers, echo=True)
        transport, client = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
        assert isinstance(transport, TlsTransport)
        transport.write(b"hello ")
        transport.writelines([b"mesh", b"!"])
        await client.wait_for(lambda: bytes(client.data) == b"hello mesh!")
        await servers.first()
        server_tr = servers[0].transport
        assert server_tr is not None
        assert peer_identity(server_tr.get_extra_info("ssl_object")) == WEB
        assert peer_identity(transport.get_extra_info("ssl_object")) == DB
        assert transport.get_extra_info("ssl_object").selected_alpn_protocol() == "transport.l5d.io/v1"
        assert transport.get_extra_info("peername")[1] == port
        assert not transport.can_write_eof()
        transport.close()
        assert await asyncio.wait_for(client.lost, DEADLINE) is None
        # close_notify: the server saw an orderly end, not a reset.
        assert await asyncio.wait_for(servers[0].lost, DEADLINE) is None and servers[0].eof
        task.cancel()
        lsock.close()

    run(scenario)


def test_a_megabyte_each_way_with_flow_control() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers, echo=True)
        transport, client = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
        transport.pause_reading()  # the echo backs up into both sockets until the server must queue its writes
        sent = 0
        async with asyncio.timeout(DEADLINE):
            while not (servers and servers[0].paused):
                if transport.get_write_buffer_size() < 4 * len(payload):
                    transport.write(payload)
                    sent += len(payload)
                await asyncio.sleep(0)
        assert not client.data
        transport.resume_reading()
        await client.wait_for(lambda: len(client.data) == sent)
        assert bytes(client.data) == payload * (sent // len(payload))
        assert transport.get_write_buffer_size() == 0 and client.resumed == client.paused
        assert servers[0].resumed == servers[0].paused
        transport.close()
        await asyncio.wait_for(client.lost, DEADLINE)
        task.cancel()
        lsock.close()

    run(scenario)


def test_interoperates_with_the_event_loops_tls_transport() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # The loop's TLS client against our server...
        servers = Servers()
        port, task, lsock = await _own_server(servers, echo=True)
        tr, client = await loop.create_connection(lambda: Recorder(), "127.0.0.1", port, ssl=CTX[WEB][1],
                                                  server_hostname=DB)
        tr.write(b"x" * 100_000)
        await client.wait_for(lambda: len(client.data) == 100_000)
        await servers.first()
        tr.close()
        await servers[0].wait_for(lambda: servers[0].lost.done())
        assert servers[0].eof and servers[0].lost.result() is None
        task.cancel()
        lsock.close()
        # ...and our client against the loop's TLS server, which closes first.
        theirs: list[Recorder] = []

        def factory() -> Recorder:
            theirs.append(Recorder(echo=True))
            return theirs[-1]

        srv = await loop.create_server(factory, "127.0.0.1", 0, ssl=CTX[DB][0])
        port = srv.sockets[0].getsockname()[1]
        transport, ours = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
        transport.write(b"y" * 100_000)
        await ours.wait_for(lambda: len(ours.data) == 100_000)
        assert theirs[0].transport is not None
        theirs[0].transport.close()
        assert await asyncio.wait_for(ours.lost, DEADLINE) is None and ours.eof
        srv.close()

    run(scenario)


def test_refusals_and_timeouts_surface_as_errors() -> None:
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        # The server is db, the client asked for web: the client refuses the server's certificate.
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], WEB, DEADLINE)
        task.cancel()
        lsock.close()
        # A listener that accepts but never answers: the handshake times out.
        silent = socket.create_server(("127.0.0.1", 0))
        try:
            with pytest.raises(ConnectionAbortedError, match=r"TLS handshake is taking longer than 0\.3 seconds"):
                await tls_connect(lambda: Recorder(), "127.0.0.1", silent.getsockname()[1], CTX[WEB][1], DB, 0.3)
        finally:
            silent.close()
        # Nothing listening.
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConnectionRefusedError):
            await tls_connect(lambda: Recorder(), "127.0.0.1", closed_port, CTX[WEB][1], DB, DEADLINE)

    run(scenario)


def test_abort_is_a_reset_not_an_orderly_close() -> None:
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        transport, client = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
        transport.write(b"ping")
        await servers.first()
        await servers[0].wait_for(lambda: bytes(servers[0].data) == b"ping")
        transport.abort()
        assert transport.is_closing()
        assert await asyncio.wait_for(client.lost, DEADLINE) is None
        # The server sees the end of the stream without a close_notify (a ragged EOF): it closes too.
        await asyncio.wait_for(servers[0].lost, DEADLINE)
        transport.write(b"after abort")  # ignored, no error
        task.cancel()
        lsock.close()

    run(scenario)


def test_a_closed_connection_is_freed_without_the_cyclic_collector() -> None:
    # A protocol holds its transport; were the transport to keep its protocol after connection_lost,
    # every closed mesh connection would be a reference cycle, freed only by a full collection.
    import gc

    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers, echo=True)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(20):
                transport, client = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB,
                                                      DEADLINE)
                transport.write(b"ping")
                await client.wait_for(lambda c=client: bytes(c.data) == b"ping")  # type: ignore[misc]
                transport.close()
                await asyncio.wait_for(client.lost, DEADLINE)
                await asyncio.wait_for(servers[i].lost, DEADLINE)
                assert transport.get_protocol() is not client
            servers.clear()
            gc.collect()
            left = sum(isinstance(o, TlsTransport) for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == 0, f"{left} closed TLS transports were left to the cyclic collector"
        task.cancel()
        lsock.close()

    run(scenario)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes the C allocator has handed out and not had back (glibc's mallinfo2)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().uordblks)


def test_a_connection_that_read_no_application_data_holds_no_record_buffer() -> None:
    # OpenSSL releases its 16 KiB read buffer after application data (SSL_MODE_RELEASE_BUFFERS),
    # but not after a read that found only a post-handshake message, such as the session tickets a
    # TLS 1.3 server sends: a pooled or held client connection would keep 16 KiB until its answer.
    n = 40

    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        assert CTX[DB][0].num_tickets > 0  # the server sends tickets after each handshake
        conns = [await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
                 for _ in range(n)]
        socks = [tr.get_extra_info("ssl_object") for tr, _ in conns]
        def settled() -> bool:  # each client has read its tickets (and nothing else); every server end is up
            return len(servers) == n and all(s.session is not None and s.session.has_ticket for s in socks)

        async with asyncio.timeout(DEADLINE):
            while not settled():  # noqa: ASYNC110 - OpenSSL's state, no event to wait on
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # (each transport's first read, scheduled at its start, has run)
        assert not any(r.data for r in servers) and not any(c.data for _, c in conns)
        # Freeing both ends' buffers now gives nothing back if the transport already did.
        before = _malloc_in_use()
        for s in socks + [r.transport.get_extra_info("ssl_object") for r in servers if r.transport]:
            assert tlsctl.release_buffers(s)
        held = (before - _malloc_in_use()) / (2 * n)
        assert held < 1024, f"{held:.0f} bytes of record buffers held per idle connection end"
        for tr, _ in conns:
            tr.close()
        task.cancel()
        lsock.close()

    run(scenario)


def test_buffers_are_freed_only_with_an_openssl_whose_ssl_free_buffers_is_safe() -> None:
    # CVE-2024-4741: SSL_free_buffers could free a buffer still in use before 3.0.14/3.1.6/3.2.2/3.3.1.
    safe = tlsctl._free_buffers_is_safe
    assert [safe((3, 0, 0, p, 0)) for p in (13, 14, 19)] == [False, True, True]
    assert [safe((3, 1, 0, 5, 0)), safe((3, 1, 0, 6, 0)), safe((3, 2, 0, 1, 0)), safe((3, 2, 0, 2, 0))] == [
        False, True, False, True]
    assert safe((3, 3, 0, 1, 0)) and not safe((3, 3, 0, 0, 0)) and safe((3, 4, 0, 0, 0))
    assert not safe((1, 1, 1, 23, 15))
    assert safe(tuple(ssl.OPENSSL_VERSION_INFO)) == tlsctl._FREE_BUFFERS


def test_the_end_of_a_burst_of_handshakes_is_reported_once() -> None:
    # The proxy trims the C heap then (app.py): a burst's transient handshake state leaves free pages.
    calls: list[int] = []

    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        on_handshake_burst_end(lambda: calls.append(len(servers)), size=8)
        try:
            burst = await asyncio.gather(*(tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB,
                                                       DEADLINE) for _ in range(12)))
            async with asyncio.timeout(DEADLINE):
                while not calls:  # noqa: ASYNC110 - the hook runs from the loop once the last handshake ends
                    await asyncio.sleep(0.01)
            assert calls == [12]  # once, after both ends of every handshake
            for _ in range(3):  # one at a time: no burst
                tr, _ = await tls_connect(lambda: Recorder(), "127.0.0.1", port, CTX[WEB][1], DB, DEADLINE)
                tr.close()
            await asyncio.sleep(0)
            assert calls == [12]
        finally:
            on_handshake_burst_end(None)
        for tr, _ in burst:
            tr.close()
        task.cancel()
        lsock.close()

    run(scenario)


class _BioClient:
    """A TLS client over memory BIOs: it decides what goes into each send(), so records it writes
    one after another reach the server in one TCP segment (one read(2) with read-ahead)."""

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = CTX[WEB][1].wrap_bio(self.incoming, self.outgoing, server_hostname=DB)

    @classmethod
    async def handshake(cls, port: int) -> _BioClient:
        """Up to the client's last flight (its certificate and Finished), which stays unsent."""
        loop = asyncio.get_running_loop()
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setblocking(False)
        c = cls(raw)
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    c.tls.do_handshake()
                    return c
                except ssl.SSLWantReadError:
                    if c.outgoing.pending:
                        await loop.sock_sendall(raw, c.outgoing.read())
                    data = await loop.sock_recv(raw, 65536)
                    assert data, "the server closed during the handshake"
                    c.incoming.write(data)

    async def send_records(self, *messages: bytes) -> None:
        """One record per message, and whatever else is pending, in a single send()."""
        for m in messages:
            self.tls.write(m)
        out = self.outgoing.read()
        assert self.raw.send(out) == len(out)  # (a few KiB: the socket takes it whole)

    def close(self) -> None:
        self.raw.close()


def test_records_arriving_together_are_all_delivered() -> None:
    # With read-ahead one read(2) takes every record the socket holds; the ones after the first are
    # then in OpenSSL's buffer, and the socket will not say so again: the transport must read on.
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        client = await _BioClient.handshake(port)
        # The client's Finished and two records in one segment: the server's handshake reads all three.
        await client.send_records(b"first ", b"second ")
        server = await servers.first()
        await server.wait_for(lambda: bytes(server.data) == b"first second ")
        # And on an established connection.
        await client.send_records(b"third ", b"fourth ", b"fifth")
        await server.wait_for(lambda: bytes(server.data) == b"first second third fourth fifth")
        client.close()
        await asyncio.wait_for(server.lost, DEADLINE)
        task.cancel()
        lsock.close()

    run(scenario)


def test_resume_reading_delivers_records_openssl_already_holds() -> None:
    # The server's protocol pauses reading as the connection is made; by then its handshake has read
    # the two records that came with the client's Finished. Resuming must deliver them although
    # the socket is empty and will not wake the loop.
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers, paused=True)
        client = await _BioClient.handshake(port)
        await client.send_records(b"held ", b"by openssl")
        server = await servers.first()
        for _ in range(5):  # (the transport's first read, scheduled at its start, has run: paused, it read nothing)
            await asyncio.sleep(0)
        assert not server.data and server.transport is not None and not server.transport.is_reading()
        server.transport.resume_reading()
        await server.wait_for(lambda: bytes(server.data) == b"held by openssl")
        # Paused and resumed again with nothing held: nothing more arrives, the connection still works.
        server.transport.pause_reading()
        server.transport.resume_reading()
        await client.send_records(b"!")
        await server.wait_for(lambda: bytes(server.data) == b"held by openssl!")
        client.close()
        await asyncio.wait_for(server.lost, DEADLINE)
        task.cancel()
        lsock.close()

    run(scenario)


def test_a_corrupted_record_ends_the_connection_with_a_tls_error() -> None:
    # A record whose authentication tag does not verify (a byte flipped on the wire) after a good
    # one: the good one is delivered, then the connection ends with OpenSSL's error, not as an EOF.
    async def scenario() -> None:
        servers = Servers()
        port, task, lsock = await _own_server(servers)
        client = await _BioClient.handshake(port)
        await client.send_records(b"good")
        server = await servers.first()
        await server.wait_for(lambda: bytes(server.data) == b"good")
        client.tls.write(b"tampered")
        record = bytearray(client.outgoing.read())
        record[-1] ^= 0x01
        assert client.raw.send(bytes(record)) == len(record)
        err = await asyncio.wait_for(server.lost, DEADLINE)
        assert isinstance(err, ssl.SSLError) and "bad record mac" in str(err).lower(), err
        assert bytes(server.data) == b"good" and not server.eof
        client.close()
        task.cancel()
        lsock.close()

    run(scenario)
