"""The proxy's plain listening sockets (outbound, inbound without identity, admin), bound here.

uvloop's ``create_server(host, port)`` encodes every host name with the ``idna`` codec before it
resolves it, which imports ``encodings.idna``, ``stringprep`` and ``unicodedata`` into every proxy
(~0.25 MiB of RSS) for addresses that are IP literals in every deployment we know of. A literal is
bound directly, as the mesh listener (``meshtls``) already does; a host name still goes to the loop.
"""

from __future__ import annotations

import socket


def listening_socket(addr: tuple[str, int], backlog: int) -> socket.socket | None:
    """A bound, listening, non-blocking socket when ``addr``'s host is an IP literal, else None.

    For None the caller passes host and port to the event loop, which binds every address the name
    resolves to. Bound as the loop binds: SO_REUSEADDR, and IPv6 sockets IPv6-only."""
    host, port = addr
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        return sock
    return None
