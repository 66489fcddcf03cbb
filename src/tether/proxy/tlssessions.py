"""TLS 1.3 session resumption between tether proxies: the client proxy's cache of sessions.

A full mesh handshake costs each side ~9M instructions (OpenSSL 3.0: decoding and verifying the
peer's certificate chain, three ECDSA verifies, the key share); a resumed one skips the certificate
work and keeps the (EC)DHE key share (``psk_dhe_ke``: forward secrecy holds). Linkerd's proxy turns
resumption off; tether turns it on between its own proxies, within these bounds:

* A session is cached under what its full handshake verified: the expected server identity and the
  address dialled. A session for identity A is never offered to a connection expecting B, and a
  resumed connection's peer is checked against the expected identity again
  (:func:`resumed_peer_problem`), since OpenSSL does not re-verify a resumed peer.
* One cache per client context. A new context (certificate renewal, trust-anchor rotation) comes
  with an empty cache, so no session verified under the old certificate or anchors is offered. The
  server side matches: ticket keys belong to the server context, which is rebuilt on the same events.
* A session is offered only while younger than ``max_age`` and never past the peer's or this
  proxy's certificate notAfter; OpenSSL itself also refuses a ticket past the server's lifetime hint.
* Bounded: at most ``max_entries`` keys, least recently used evicted first.

Time is a parameter (``clock``: monotonic seconds, ``wall``: seconds since the epoch).
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.proxy.tlspeer import peer_certificate

__all__ = ["SessionCache", "SessionKey", "peer_not_after", "resumed_peer_problem"]

# (expected server identity, dialled host, dialled port)
SessionKey = tuple[str, str, int]


@dataclass(slots=True)
class _Entry:
    session: ssl.SSLSession | None  # None: the peer sent no ticket; not asked again until it expires
    expires: float  # on ``clock``


def peer_not_after(sock: ssl.SSLSocket | ssl.SSLObject) -> float | None:
    """The verified peer certificate's notAfter (seconds since the epoch), or None without one."""
    return _not_after(sock.getpeercert())


# notAfter text -> seconds: every resumed connection asks for one of a few peers' dates.
_seconds: dict[str, float | None] = {}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def cert_time_to_seconds(text: str) -> float | None:
    """OpenSSL's text for a certificate time ("Dec  6 12:10:21 2026 GMT") as seconds since the epoch,
    what ``ssl.cert_time_to_seconds`` gives, None where it raises. Not through it: it calls
    ``time.strptime``, whose first use imports ``_strptime`` and ``calendar`` (~0.15 MiB of every
    client proxy's RSS from its first resumed connection on) for this one fixed format."""
    parts = text.split()
    if len(parts) != 5 or parts[4] != "GMT" or parts[0] not in _MONTHS:
        return None
    day, clock, year = parts[1], parts[2].split(":"), parts[3]
    if len(clock) != 3 or not all(f.isdigit() and len(f) == 2 for f in clock) or not day.isdigit() \
            or len(day) > 2 or not year.isdigit() or len(year) != 4:
        return None
    try:
        return dt.datetime(int(year), _MONTHS.index(parts[0]) + 1, int(day), int(clock[0]), int(clock[1]),
                           int(clock[2]), tzinfo=dt.UTC).timestamp()
    except ValueError:  # a day or time out of range
        return None


def _not_after(cert: Any) -> float | None:
    text = cert.get("notAfter") if cert else None
    if not isinstance(text, str):
        return None
    try:
        return _seconds[text]
    except KeyError:
        pass
    seconds = cert_time_to_seconds(text)
    if len(_seconds) >= 64:
        _seconds.clear()
    _seconds[text] = seconds
    return seconds


def resumed_peer_problem(sock: ssl.SSLSocket | ssl.SSLObject, expected_dns: str | None, now: float) -> str | None:
    """Why a resumed connection's peer must be refused, or None.

    A resumed handshake restores the peer certificate from the session without verifying it again:
    what a full handshake would refuse since (an expired certificate, another name) is checked here.
    """
    cert = peer_certificate(sock)
    if not cert:
        return "the resumed session carries no verified peer certificate"
    not_after = _not_after(cert)
    if not_after is None or not_after <= now:
        return f"the resumed session's peer certificate expired ({cert.get('notAfter')})"
    if expected_dns is not None:
        names = [str(san[1]) for san in cert.get("subjectAltName", ()) if san[0] == "DNS"]
        if expected_dns not in names:
            return f"the resumed session's peer is {names}, not {expected_dns}"
    return None


class SessionCache:
    """Sessions a client context may offer again; see the module docstring for the bounds."""

    __slots__ = ("_entries", "clock", "context", "max_age", "max_entries", "not_after", "wall")

    def __init__(self, context: ssl.SSLContext, max_entries: int, max_age: float, not_after: float | None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.context = context
        self.max_entries = max_entries
        self.max_age = max_age
        self.not_after = not_after  # this proxy's own leaf: its peers stop accepting it then
        self.clock = clock
        self.wall = wall
        self._entries: OrderedDict[SessionKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _live(self, key: SessionKey) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def offer(self, key: SessionKey) -> ssl.SSLSession | None:
        """The session to offer a new connection for ``key``, or None (a full handshake)."""
        entry = self._live(key)
        return entry.session if entry is not None else None

    def wants(self, key: SessionKey) -> bool:
        """True if a full handshake's session for ``key`` should be kept (nothing live is cached)."""
        return self._live(key) is None

    def discard(self, key: SessionKey) -> None:
        """Forget ``key`` (the server refused its session: it will not take it later either)."""
        self._entries.pop(key, None)

    def store(self, key: SessionKey, sock: ssl.SSLSocket | ssl.SSLObject) -> bool:
        """Keep the session of ``sock`` (a full handshake whose ticket has arrived); True if kept.

        Reading ``sock.session`` copies it through DER (the ssl module's workaround for an OpenSSL
        1.1.0 bug), ~1.5M instructions: call this once per full handshake, not per connection.
        """
        now, wall = self.clock(), self.wall()
        expires = now + self.max_age
        for not_after in (peer_not_after(sock), self.not_after):
            if not_after is not None:
                expires = min(expires, now + (not_after - wall))
        if expires <= now:
            return False
        session = sock.session
        if session is None or not session.has_ticket:
            # A peer that issues no ticket (Linkerd's proxy, or a tether proxy with resumption
            # off): remember that, so its full handshakes do not each pay for the copy above.
            session = None
        elif session.ticket_lifetime_hint > 0:
            expires = min(expires, now + session.ticket_lifetime_hint)  # the server's own bound
        self._entries[key] = _Entry(session, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return session is not None
