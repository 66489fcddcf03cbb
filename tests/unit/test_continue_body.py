"""The body of a request that asked for ``100 Continue``: nothing is taken before the interim answer."""

from __future__ import annotations

import asyncio

from tether.proxy.http.h1server import _ContinueBody


def test_take_waits_for_the_first_read_which_sends_100_continue() -> None:
    sent: list[str] = []
    body = _ContinueBody(5, lambda: None, lambda: None, 1 << 16, lambda: sent.append("100"))
    body.feed(b"hello")
    body.finish()
    assert body.take() is None  # wholly buffered, but the client has not been told to send it
    assert sent == []

    async def first_read() -> bytes:
        return await body.read()

    assert asyncio.run(first_read()) == b"hello"
    assert sent == ["100"]
    assert body.take() == b""  # after the interim answer it behaves as any other body
