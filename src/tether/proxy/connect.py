"""How the proxy reaches an endpoint, for HTTP and opaque TCP alike.

:func:`reach` is the one decision: an endpoint that discovery says is meshed (it has an identity,
and this proxy has one too) is reached over mTLS at its proxy's inbound port, verifying that
identity; an opaque stream to it carries the application port in a transport header. Anything
else is reached in plaintext at its own address. :func:`connector` and :func:`connect_tcp` then
open what :func:`reach` decided.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from tether.core import transport_header
from tether.core.discovery.endpoints import Endpoint
from tether.proxy.http.h1client import Connector
from tether.proxy.targets import EndpointTarget
from tether.proxy.tcp import Pending
from tether.proxy.tlspeer import IdentityNotReady
from tether.proxy.tlstransport import tls_connect

if TYPE_CHECKING:
    from tether.proxy.identity import IdentityClient


def reach(ep: Endpoint, mtls: bool, opaque: bool = False) -> EndpointTarget:
    """How to reach ``ep``; ``mtls``: this proxy can speak mesh TLS (it has an identity)."""
    meshed = mtls and ep.identity is not None
    if meshed and ep.proxy_port and (opaque or not ep.legacy_transport_header):
        # To the peer's proxy port (the opaque_transport hint: an opaque port there), inside mesh
        # TLS: a transport header names the application's port and, for HTTP, the session protocol,
        # as Linkerd's proxies send it.
        return EndpointTarget(ep.addr, (ep.addr[0], ep.proxy_port), ep.identity, ep.labels,
                              transport_port=ep.addr[1], legacy_transport_header=ep.legacy_transport_header,
                              header_session=ep.protocol_hint != "opaque")
    if not meshed:
        # Plaintext: to the peer proxy's port if discovery names one (no header: only mesh TLS
        # carries it), else to the endpoint itself.
        dial = (ep.addr[0], ep.proxy_port) if ep.proxy_port and not opaque else ep.addr
        return EndpointTarget(ep.addr, dial, None, ep.labels)
    # Mesh TLS to the endpoint's own address: the peer's proxy is there (redirected by iptables, or
    # listening itself for an explicit pod) and knows the port. (HTTP to a peer before 0.2.0, which
    # serves no session protocol after a header, goes this way too: its opaque port forwards it.)
    return EndpointTarget(ep.addr, ep.addr, ep.identity, ep.labels)


def connector(target: EndpointTarget, identity: IdentityClient | None, handshake_timeout: float) -> Connector | None:
    """The connector an HTTP pool uses for ``target`` (None: plain TCP to ``target.dial``)."""
    server_id = target.server_id
    if server_id is None or identity is None:
        return None
    host, port = target.dial
    header_port = target.transport_port
    with_session = target.header_session

    async def connect(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        ctx = _client_context(identity)
        preface = None
        make = factory
        if header_port is not None:
            # To the peer's proxy port: the header says which application port, and which HTTP
            # version follows (the pool's connection, made now: its class says), unless the peer
            # forwards the port's connections as bytes (an opaque hint): then no session protocol.
            protocol = factory()
            session = transport_header.OPAQUE
            if with_session:
                # (Here: a proxy that never speaks HTTP/2 never loads its client.)
                from tether.proxy.http.h2client import H2ClientConnection

                h2 = isinstance(protocol, H2ClientConnection)
                session = transport_header.HTTP2 if h2 else transport_header.HTTP1
            preface = transport_header.encode(transport_header.TransportHeader(header_port, protocol=session))

            def make() -> asyncio.Protocol:
                return protocol
        try:
            transport, proto = await tls_connect(make, host, port, ctx, server_id, handshake_timeout,
                                                 identity.client_sessions(), preface,
                                                 None if preface is None else transport_header.ALPN)
        except ssl.SSLError as e:
            # Name what we expected: the reason reaches the client in l5d-proxy-error.
            raise OSError(f"mTLS handshake expecting identity {server_id} failed: {e.reason or e}") from None
        identity.count_handshake("outbound", transport.get_extra_info("ssl_object").session_reused)
        return transport, proto

    return connect


async def connect_tcp(target: EndpointTarget, identity: IdentityClient | None, timeout: float,
                      handshake_timeout: float) -> tuple[asyncio.Transport, Pending]:
    """Open an opaque stream to ``target``; what the server sends before the splice takes over is
    kept in the returned Pending protocol. Over mTLS, the transport header goes first."""
    loop = asyncio.get_running_loop()
    ctx = _client_context(identity) if target.server_id is not None and identity is not None else None
    transport: asyncio.Transport
    async with asyncio.timeout(timeout):
        if ctx is not None and target.server_id is not None:
            assert identity is not None
            alpn = transport_header.ALPN if target.transport_port is not None else None
            transport, proto = await tls_connect(Pending, target.dial[0], target.dial[1], ctx, target.server_id,
                                                 handshake_timeout, identity.client_sessions(), alpn=alpn)
            identity.count_handshake("outbound", transport.get_extra_info("ssl_object").session_reused)
        else:
            transport, proto = await loop.create_connection(Pending, target.dial[0], target.dial[1])
    if target.transport_port is not None and ctx is not None:
        transport.write(transport_header.encode(transport_header.TransportHeader(target.transport_port),
                                                legacy=target.legacy_transport_header))
    return transport, proto


def _client_context(identity: IdentityClient | None) -> ssl.SSLContext:
    if identity is None:
        raise OSError("no identity: this proxy cannot speak mesh TLS")
    try:
        return identity.client_ssl_context()
    except IdentityNotReady as e:
        raise OSError(f"no certificate yet: {e}") from None
