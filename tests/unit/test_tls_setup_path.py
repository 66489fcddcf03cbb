"""The set-up of a new mesh connection, over real loopback sockets and the inbound mesh listener:
failed handshakes on either end leave the next connections working (the listener hands each socket's
poll registration to the handshake and the transport, so a registration left behind for a closed
socket would silently starve the next socket given the same descriptor), and the dialler reaches an
IPv4 address, an IPv6 address and a name, with the loop's refusal message."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
from pathlib import Path

import pytest
from test_tlssessions import DB, DEADLINE, DETECT, WEB, Client, Echo, Mesh, identities, run

from tether.proxy import tlsctl
from tether.proxy.meshtls import MeshTlsListener
from tether.proxy.tlspeer import peer_identity
from tether.proxy.tlssessions import SessionCache
from tether.proxy.tlstransport import tls_accept, tls_connect


async def _hello_then_close(port: int, sni: str) -> None:
    """A client that sends a ClientHello for ``sni`` and hangs up before the server's answer is read."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(outgoing.read())
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _no_certificate(port: int) -> None:
    """A TLS 1.3 client that presents no certificate: the listener requires one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=DB)
    # TLS 1.3: the client's handshake ends before the server checks its certificate; the refusal
    # arrives as an alert (or the end of the stream) at the first read.
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        writer.write(b"ping")
        await reader.readexactly(4)
    writer.close()


def test_failed_handshakes_on_either_end_leave_the_next_connections_working(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        mesh = Mesh(web, db)
        # Servers the client fails against: one that presents db's certificate to a client expecting
        # web, one that accepts and never answers, and a port nobody listens on.
        other = socket.create_server(("127.0.0.1", 0))
        other.setblocking(False)
        silent = socket.create_server(("127.0.0.1", 0))
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()

        async def serve_other() -> None:
            while True:
                conn, _ = await loop.sock_accept(other)
                with contextlib.suppress(OSError, ssl.SSLError):
                    await tls_accept(Echo, conn, db.server_ssl_context(), DEADLINE)

        Echo.seen = []
        task = loop.create_task(serve_other())
        try:
            assert not await mesh.round_trip()
            for _ in range(3):
                for _ in range(6):
                    # The listener's end fails: a ClientHello and a hang-up, a client with no certificate.
                    await _hello_then_close(mesh.port, DB)
                    await _no_certificate(mesh.port)
                    # The dialler's end fails: a refused certificate, a handshake timeout, a refused connect.
                    with pytest.raises(ssl.SSLCertVerificationError):
                        await tls_connect(Client, "127.0.0.1", other.getsockname()[1], web.client_ssl_context(),
                                          WEB, DEADLINE)
                    with pytest.raises(ConnectionAbortedError, match="TLS handshake is taking longer"):
                        await tls_connect(Client, "127.0.0.1", silent.getsockname()[1], web.client_ssl_context(),
                                          DB, 0.05)
                    with pytest.raises(ConnectionRefusedError):
                        await tls_connect(Client, "127.0.0.1", closed_port, web.client_ssl_context(), DB, DEADLINE)
                # The descriptors freed above are reused by now, on both ends: each new connection still
                # completes and carries data both ways, resumed or not.
                for _ in range(3):
                    assert await mesh.round_trip()
                    assert not await mesh.round_trip(sessions=SessionCache(web.client_ssl_context(), 1, 60.0, None))
            assert [who for who, _ in mesh.seen] == [WEB] * (1 + 3 * 6)
        finally:
            task.cancel()
            other.close()
            silent.close()
            mesh.listener.close()

    run(scenario)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_dialler_reaches_ipv4_ipv6_and_names_and_reports_a_refusal_as_the_loop_does(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        seen: list[tuple[str | None, bool]] = []

        def factory() -> Echo:
            p = Echo()
            p.seen = seen
            return p

        hosts = [("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1")]
        if _has_ipv6_loopback():
            hosts.append(("::1", "::1"))
        for host, bind in hosts:
            listener = MeshTlsListener(DETECT, DEADLINE, db, (bind, 0), factory)
            port = listener.start()[1]
            try:
                transport, client = await tls_connect(Client, host, port, web.client_ssl_context(), DB, DEADLINE)
                assert transport.get_extra_info("peername")[0] == bind
                transport.write(b"ping")
                await client.echoed(b"ping")
                transport.close()
            finally:
                listener.close()
        assert [who for who, _ in seen] == [WEB] * len(hosts)
        # Nothing listening: the refusal names the address, as the event loop's connect says it (the
        # proxy passes this text on in l5d-proxy-error).
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConnectionRefusedError) as refused:
            await tls_connect(Client, "127.0.0.1", port, web.client_ssl_context(), DB, DEADLINE)
        assert refused.value.strerror == f"Connect call failed ('127.0.0.1', {port})"

    run(scenario)


@pytest.mark.skipif(not tlsctl.available(), reason="TLS 1.3 suites are set through tlsctl")
def test_two_proxies_choose_aes_128_gcm_and_a_peer_with_another_suite_is_still_served(tmp_path: Path) -> None:
    web, db, _ = identities(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        mesh = Mesh(web, db)
        Echo.seen = []
        try:
            transport, client = await tls_connect(Client, "127.0.0.1", mesh.port, web.client_ssl_context(), DB,
                                                  DEADLINE)
            assert transport.get_extra_info("cipher")[:2] == ("TLS_AES_128_GCM_SHA256", "TLSv1.3")
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
            # A client that offers ChaCha20 only (another implementation's choice) is served with it.
            chacha = web._make_contexts()[1]
            assert tlsctl.prefer_suites(chacha, "TLS_CHACHA20_POLY1305_SHA256")
            transport, client = await tls_connect(Client, "127.0.0.1", mesh.port, chacha, DB, DEADLINE)
            assert transport.get_extra_info("cipher")[0] == "TLS_CHACHA20_POLY1305_SHA256"
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
        finally:
            mesh.listener.close()
        # A server that accepts AES-256-GCM only: the proxy's client goes along.
        aes256 = db._make_contexts()[0]
        assert tlsctl.prefer_suites(aes256, "TLS_AES_256_GCM_SHA384")
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)

        async def serve() -> None:
            conn, _ = await loop.sock_accept(lsock)
            await tls_accept(Echo, conn, aes256, DEADLINE)

        task = loop.create_task(serve())
        try:
            transport, client = await tls_connect(Client, "127.0.0.1", lsock.getsockname()[1],
                                                  web.client_ssl_context(), DB, DEADLINE)
            assert transport.get_extra_info("cipher")[0] == "TLS_AES_256_GCM_SHA384"
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
        finally:
            task.cancel()
            lsock.close()
        assert [who for who, _ in mesh.seen + Echo.seen] == [WEB] * 3

    run(scenario)


def test_clients_that_never_speak_are_each_handed_on_as_plaintext_at_their_own_detection_deadline(
        tmp_path: Path) -> None:
    """The listener's one sweep timer: a silent client is served as plaintext once the detection
    timeout has passed since it connected (not before), whether it came alone, while another silent
    one waited, or after the sweep had found nothing left; mesh clients meanwhile are terminated."""
    web, db, _ = identities(tmp_path)
    timeout = 0.3

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str | None, bool]] = []
        # The client's port -> when its socket reached the protocol as plaintext.
        handed: dict[int, asyncio.Future[float]] = {}

        class Recorder(Echo):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                if transport.get_extra_info("ssl_object") is None:
                    port = transport.get_extra_info("peername")[1]
                    handed.setdefault(port, loop.create_future()).set_result(time.monotonic())

        def factory() -> Recorder:
            p = Recorder()
            p.seen = seen
            return p

        cfg = dataclasses.replace(DETECT, detect_timeout=timeout)
        listener = MeshTlsListener(cfg, DEADLINE, db, ("127.0.0.1", 0), factory)
        port = listener.start()[1]
        mesh = Mesh(web, db)
        mesh.listener.close()
        mesh.listener, mesh.port = listener, port

        async def silent() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, float]:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            return reader, writer, writer.get_extra_info("sockname")[1], started

        async def handed_on(client: tuple[asyncio.StreamReader, asyncio.StreamWriter, int, float]) -> None:
            reader, writer, local_port, started = client
            at = await asyncio.wait_for(handed.setdefault(local_port, loop.create_future()), DEADLINE)
            assert at - started >= timeout - 0.002
            # The late speaker is served as plaintext.
            writer.write(b"late")
            assert await reader.readexactly(4) == b"late"
            writer.close()

        try:
            alone = await silent()
            await handed_on(alone)
            first = await silent()
            assert not await mesh.round_trip()  # a mesh client meanwhile: terminated, not waiting
            second = await silent()
            assert await mesh.round_trip()
            await handed_on(first)
            await handed_on(second)
            after = await silent()  # the sweep had nothing left: a new one arms it again
            await handed_on(after)
            assert [identity for identity, _ in seen if identity is not None] == [WEB, WEB]
        finally:
            listener.close()

    run(scenario)


def test_a_mesh_connection_tells_its_addresses_and_tls_facts_and_lets_go_of_tls_when_closed(tmp_path: Path) -> None:
    """What the proxy's protocols ask of a TLS transport: both ends' addresses (the server's local
    address and original destination as the listener read them before the handshake: on loopback
    not redirected, so None, and known), the TLS object's facts, none of them once closed."""
    web, db, _ = identities(tmp_path)
    unknown = ("", -1)
    seen: dict[str, object] = {}

    class Server(Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sslobj = transport.get_extra_info("ssl_object")
            seen.update(sockname=transport.get_extra_info("sockname"),
                        original_dst=transport.get_extra_info("original_dst", unknown),
                        version=sslobj.version(), client_der=sslobj.getpeercert(True))

    async def scenario() -> None:
        listener = MeshTlsListener(DETECT, DEADLINE, db, ("127.0.0.1", 0), lambda: _with(Server()))
        port = listener.start()[1]
        try:
            transport, client = await tls_connect(Client, "127.0.0.1", port, web.client_ssl_context(), DB,
                                                  DEADLINE, web.client_sessions())
            sslobj = transport.get_extra_info("ssl_object")
            assert transport.get_extra_info("peername") == ("127.0.0.1", port)
            assert transport.get_extra_info("sockname")[0] == "127.0.0.1"
            assert sslobj.version() == "TLSv1.3" and transport.get_extra_info("cipher")[1] == "TLSv1.3"
            assert transport.get_extra_info("sslcontext") is web.client_ssl_context()
            assert peer_identity(sslobj) == DB
            transport.write(b"ping")
            await client.echoed(b"ping")
            transport.close()
            await client.got.wait()
            assert transport.get_extra_info("ssl_object") is None and transport.get_extra_info("peercert") is None
            assert transport.get_extra_info("peername") == ("127.0.0.1", port)  # (asked while open)
        finally:
            listener.close()
        assert seen["sockname"] == ("127.0.0.1", port)
        assert seen["original_dst"] is None  # asked by the listener: known, and not redirected
        assert seen["version"] == "TLSv1.3" and isinstance(seen["client_der"], bytes)

    run(scenario)


def _with(p: Echo) -> Echo:
    p.seen = []
    return p
