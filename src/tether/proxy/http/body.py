"""Streamed message bodies with backpressure.

A body is read chunk by chunk with ``await body.read()`` until it returns ``b""``; trailers (HTTP/2,
chunked HTTP/1) are available after the end. A :class:`PipeBody` is fed by a codec's protocol
callbacks and pauses that producer when the reader falls behind, so no body is ever held whole in
memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mypy_extensions import mypyc_attr

Headers = list[tuple[bytes, bytes]]


class BodyError(Exception):
    """The body's producer failed (peer reset, truncated message, ...)."""


@mypyc_attr(allow_interpreted_subclasses=True)  # codecs and tests define their own bodies
class Body:
    """Base: an empty body."""

    length: int | None = 0
    _trailers: Headers | None = None

    @property
    def trailers(self) -> Headers | None:
        """Trailers, once the body has ended (None when there are none)."""
        return self._trailers

    async def read(self) -> bytes:
        """The next chunk, or ``b""`` at the end."""
        return b""

    def is_end_known(self) -> bool:
        """True when the whole body is already buffered (no wait needed to read it all)."""
        return True

    def take(self) -> bytes | None:
        """All the rest of a body that is wholly here (``b""`` when nothing is left), as :meth:`read`
        until its end would return it, but without a coroutine; None (nothing taken) when a read
        could have to wait, or the body does not know: then :meth:`read` it."""
        return None

    def discard(self) -> None:
        """The reader will not read further: release the producer."""


class EmptyBody(Body):
    def take(self) -> bytes | None:
        return b""


class BytesBody(Body):
    """A body held in memory (small, proxy-generated, or a retry buffer)."""

    def __init__(self, data: bytes, trailers: Headers | None = None) -> None:
        self._data: bytes | None = data
        self.length = len(data)
        self._trailers = trailers

    async def read(self) -> bytes:
        data, self._data = self._data, None
        return data or b""

    def take(self) -> bytes:
        """The whole body at once, without awaiting (as ``read``: later reads return ``b""``)."""
        data, self._data = self._data, None
        return data or b""


@mypyc_attr(allow_interpreted_subclasses=True)
class PipeBody(Body):
    """A body fed by a producer; the producer is paused above ``high`` buffered bytes."""

    __slots__ = (
        "_buf",
        "_buffered",
        "_done",
        "_error",
        "_high",
        "_low",
        "_pause",
        "_paused",
        "_resume",
        "_waiter",
    )

    def __init__(
        self,
        length: int | None,
        pause: Callable[[], None] | None = None,
        resume: Callable[[], None] | None = None,
        high: int = 256 * 1024,
    ) -> None:
        self.length = length
        self._trailers = None
        self._buf: list[bytes] = []  # (a list: a deque's methods are generic calls when compiled)
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._high = high
        self._low = high // 4

    # -- producer side ------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered > self._high and not self._paused and self._pause is not None:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self, trailers: Headers | None = None) -> None:
        if self._done:
            return
        self._trailers = trailers
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._done:
            return
        self._error = exc
        self._done = True
        self._wake()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._buffered

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- reader side --------------------------------------------------------------------------
    def is_end_known(self) -> bool:
        return self._done and self._error is None

    async def read(self) -> bytes:
        while not self._buf:
            if self._done:
                if self._error is not None:
                    err = BodyError(str(self._error))
                    err.__cause__ = self._error  # set by hand: mypyc drops ``raise ... from`` causes
                    raise err
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pop()

    def take(self) -> bytes | None:
        if not self.is_end_known():
            return None
        if not self._buf:
            return b""
        return self._pop()

    def _pop(self) -> bytes:
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        self._buf = []
        self._buffered = 0
        if self._paused and self._resume is not None:
            self._paused = False
            self._resume()
        return data

    def discard(self) -> None:
        if self._buf:
            self._buf = []
        self._buffered = 0
        if self._paused and self._resume is not None:
            self._paused = False
            self._resume()


async def read_all(body: Body, limit: int) -> bytes:
    """Read a whole body, raising BodyError beyond ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    while chunk := await body.read():
        total += len(chunk)
        if total > limit:
            raise BodyError(f"body larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
