"""Route a request to its logical destination's stack, by authority.

The authority is ``l5d-dst-override`` when present (removed before forwarding), else the request's
own. Discovery decides whether it is a known destination (balanced over its endpoints) or not
(forwarded to the original destination in transparent mode, to the address the authority names in
explicit mode). The decision for an authority is remembered until discovery changes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Final

from tether.core.discovery.endpoints import Addr
from tether.core.http.authority import normalize_authority
from tether.proxy.cache import CacheEntry, IdleCache, Stack
from tether.proxy.discovery import Discovery, Generation
from tether.proxy.errors import ProxyError, UnavailableError
from tether.proxy.http.message import Request, Response
from tether.proxy.targets import Logical

# Decisions remembered per (authority, original destination); cleared past this many (the
# authorities a client sends are its own choice: never let them grow memory without bound).
_MAX_DECISIONS: Final = 4096


def split_authority(authority: bytes, default_port: int = 80) -> tuple[str, int]:
    """``host[:port]`` to (host, port); raises UnavailableError when it can't be a target."""
    text = authority.decode("latin-1").strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not host:
        raise UnavailableError(f"no host in authority {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise UnavailableError(f"invalid port in authority {text!r}") from None
    return host, port


def is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


class Router:
    """Service: pick the logical destination of a request and call its (cached) stack."""

    def __init__(self, discovery: Discovery | None, stacks: IdleCache[Logical, Stack],
                 own_addrs: set[Addr], generation: Generation | None = None,
                 tunnel: Callable[[Request], Awaitable[Response]] | None = None) -> None:
        self.discovery = discovery
        self.tunnel = tunnel  # CONNECT host:port (an application using the proxy as HTTP_PROXY)
        self.stacks = stacks
        self.own_addrs = own_addrs
        self._own_ports = {a[1] for a in own_addrs}
        self._generation = generation if generation is not None else Generation()
        self._seen_generation = self._generation.value
        # The destination decided for an authority, and its cache entry (kept while live).
        self._decided: dict[tuple[bytes, Addr | None], tuple[Logical, CacheEntry[Stack]]] = {}
        # The last decision looked up, and for which destination: a client's requests on a
        # connection mostly go to one authority.
        self._last_authority = b""
        self._last_dst: Addr | None = None
        self._last_hit: tuple[Logical, CacheEntry[Stack]] | None = None

    def __call__(self, req: Request) -> Awaitable[Response]:
        # Synchronous when the destination was decided before: no coroutine frame of its own.
        if req.upgrade and req.method == b"CONNECT":
            return self._connect(req)
        override = req.header(b"l5d-dst-override")
        if override is not None:
            req.remove_header(b"l5d-dst-override")
        conn = req.conn
        orig_dst = conn.orig_dst if conn is not None else None
        authority = override or req.authority
        gen = self._generation.value
        if gen != self._seen_generation:
            self._seen_generation = gen
            self._decided.clear()  # discovery changed: unknown authorities may be known now
            self._last_hit = None
        hit = self._last_hit
        if hit is None or authority != self._last_authority or orig_dst != self._last_dst:
            # Not the previous request's destination: look the decision up (a key tuple to
            # build and hash, a fresh authority's hash: about 700 instructions).
            hit = self._decided.get((authority, orig_dst))
            if hit is None:
                return self._decide_and_call(req, (authority, orig_dst))
            self._last_authority, self._last_dst, self._last_hit = authority, orig_dst, hit
        logical, entry = hit
        if not entry.live:  # the cache dropped that stack while idle: build it again
            entry = self.stacks.entry(logical)
            hit = self._decided[(authority, orig_dst)] = (logical, entry)
            self._last_hit = hit  # still for this authority and orig_dst (set or matched above)
        return self.stacks.use(entry).service(req)

    async def _connect(self, req: Request) -> Response:
        if self.tunnel is None:
            raise ProxyError("CONNECT is not served here", 405)
        return await self.tunnel(req)

    async def _decide_and_call(self, req: Request, key: tuple[bytes, Addr | None]) -> Response:
        logical = await self._decide(key[0], key[1])
        if len(self._decided) >= _MAX_DECISIONS:
            self._decided.clear()
        # Marked used now (not use() as well: that would count it used again at the next sweep).
        entry = self.stacks.entry(logical)
        self._decided[key] = (logical, entry)
        stack = entry.value
        assert stack is not None, "an entry just taken from the cache is live"
        return await stack.service(req)

    async def _decide(self, authority: bytes, orig_dst: Addr | None) -> Logical:
        try:
            name = normalize_authority(authority, 80)
        except ValueError:
            name = None
        if name is not None and self.discovery is not None:
            resolved = await self.discovery.resolve(name)
            if resolved is not None:
                # Both streams opened at once: the first request waits for the slower answer only.
                profile = asyncio.ensure_future(self.discovery.profile(resolved.authority))
                policy = await self.discovery.policy(resolved.authority)
                return Logical(resolved.authority, watch=resolved.endpoints, profile=await profile, policy=policy)
        target = orig_dst if orig_dst is not None else self._named_addr(authority)
        policy = None
        if self.discovery is not None and is_ip(target[0]):
            policy = await self.discovery.policy_for_addr(target)  # an EgressNetwork's routes, if any
        return Logical(name or authority.decode("latin-1"), fallback=target, policy=policy)

    def _named_addr(self, authority: bytes) -> Addr:
        host, port = split_authority(authority)
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
            target = (str(infos[0][4][0]), port)
        except socket.gaierror:
            target = (host, port)  # a name: resolved at connect time
        if target in self.own_addrs or (
                target[1] in self._own_ports and target[0] in ("127.0.0.1", "localhost", "0.0.0.0")):
            raise ProxyError(f"request for {authority.decode('latin-1')} would loop back into the proxy", 502)
        return target
