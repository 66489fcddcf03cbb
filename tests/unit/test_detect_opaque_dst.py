"""Outbound detection asks discovery about the original destination first (Linkerd's order).

DetectProtocol is driven through asyncio's protocol calls with a transport that knows its original
destination (a unit test of this layer; the local mesh test
``test_a_server_speaks_first_port_the_destination_marks_opaque_is_not_detected`` runs it for real),
and the static destinations file's answer is read from a real file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tether.core.http.detect import Detected
from tether.proxy.config import DetectSettings
from tether.proxy.detect import DetectProtocol
from tether.proxy.discovery import StaticDiscovery
from tether.proxy.http.message import Connection

DST = ("10.0.0.9", 5432)
SETTINGS = DetectSettings(frozenset({25}), detect_timeout=30.0, detect_peek_bytes=1024,
                          header_read_timeout=20.0, linger_timeout=1.0, inbound_app_port=None)
HTTP_HEAD = b"GET / HTTP/1.1\r\nhost: db\r\n\r\n"


class Transport(asyncio.Transport):
    def __init__(self, orig_dst: tuple[str, int] | None) -> None:
        super().__init__()
        self.extra = {"original_dst": orig_dst, "peername": ("10.0.0.1", 40000), "sockname": ("127.0.0.1", 4140)}
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def close(self) -> None:
        self.closed = True


class Seen:
    def __init__(self) -> None:
        self.decided: list[tuple[Detected, bytes, tuple[str, int] | None]] = []

    def __call__(self, what: Detected, transport: asyncio.Transport, conn: Connection, buf: bytes,
                 eof: bool) -> None:
        self.decided.append((what, buf, conn.orig_dst))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_destination_known_to_be_opaque_is_forwarded_before_any_byte() -> None:
    async def main() -> None:
        seen = Seen()
        asked: list[tuple[str, int]] = []
        p = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=lambda a: asked.append(a) or True)
        p.connection_made(Transport(DST))
        assert asked == [DST]
        assert seen.decided == [(Detected.OPAQUE, b"", DST)]

    asyncio.run(main())


def test_bytes_sent_while_discovery_answers_wait_for_its_verdict() -> None:
    # HTTP bytes to an opaque destination are still opaque: they wait for the answer, then go as they are.
    async def main() -> None:
        seen = Seen()
        verdict: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        p = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=lambda a: verdict)
        p.connection_made(Transport(DST))
        p.data_received(HTTP_HEAD)
        await settle()
        assert seen.decided == []
        verdict.set_result(True)
        await settle()
        assert seen.decided == [(Detected.OPAQUE, HTTP_HEAD, DST)]

    asyncio.run(main())


def test_a_destination_that_is_not_opaque_is_detected_after_the_answer() -> None:
    async def main() -> None:
        seen = Seen()
        verdict: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        p = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=lambda a: verdict)
        p.connection_made(Transport(DST))
        p.data_received(HTTP_HEAD[:2])
        verdict.set_result(False)
        await settle()
        assert seen.decided == []  # "GE" alone: detection needs more
        p.data_received(HTTP_HEAD[2:])
        assert seen.decided == [(Detected.HTTP1, HTTP_HEAD, DST)]

    asyncio.run(main())


def test_known_not_opaque_detects_at_once_and_an_unredirected_connection_asks_nothing() -> None:
    async def main() -> None:
        seen = Seen()
        asked: list[tuple[str, int]] = []
        p = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=lambda a: asked.append(a) or False)
        p.connection_made(Transport(DST))
        p.data_received(HTTP_HEAD)
        assert seen.decided == [(Detected.HTTP1, HTTP_HEAD, DST)]
        q = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=lambda a: asked.append(a) or True)
        q.connection_made(Transport(None))
        q.data_received(HTTP_HEAD)
        assert asked == [DST] and seen.decided[1] == (Detected.HTTP1, HTTP_HEAD, None)

    asyncio.run(main())


def test_a_connection_closed_while_discovery_answers_stops_waiting() -> None:
    async def main() -> None:
        seen = Seen()
        cancelled = asyncio.Event()

        async def slow(addr: tuple[str, int]) -> bool:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return True

        p = DetectProtocol("outbound", SETTINGS, seen, dst_opaque=slow)
        p.connection_made(Transport(DST))
        await settle()
        p.connection_lost(None)
        async with asyncio.timeout(10):
            await cancelled.wait()
        assert seen.decided == []

    asyncio.run(main())


def test_the_destinations_file_marks_an_endpoint_opaque_by_its_hint(tmp_path: Path) -> None:
    f = tmp_path / "d.yaml"
    f.write_text('destinations:\n  "db.default.svc.cluster.local:5432":\n'
                 '    - {addr: "10.0.0.9:5432", protocol_hint: opaque}\n    - "10.0.0.8:5432"\n')
    version = [1]
    d = StaticDiscovery(str(f), version=lambda p: version[0])
    assert d.opaque_dst(DST) is True
    assert d.opaque_dst(("10.0.0.8", 5432)) is False
    f.write_text('destinations:\n  "db.default.svc.cluster.local:5432":\n    - "10.0.0.9:5432"\n')
    version[0] = 2
    assert d.check()
    assert d.opaque_dst(DST) is False
