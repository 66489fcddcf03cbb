"""Mesh TLS as tether's own transport: a non-blocking TLS socket driven by the event loop.

Why not the loop's TLS transport: uvloop (and asyncio) run TLS over ``ssl.SSLObject`` and two
memory BIOs per connection, and OpenSSL's memory BIOs keep their largest size for the life of the
connection; uvloop adds a read buffer of its own. Measured on idle mTLS pairs (both ends, after one
exchange; docs/notes/issue-16.md): uvloop 72.6 KiB per pair after 200-byte messages and 179 KiB
after 16 KB ones; an ``SSLSocket`` 48.2 KiB either way. With a socket BIO OpenSSL reads and writes
the socket itself, and Python's ssl sets SSL_MODE_RELEASE_BUFFERS, so an idle connection holds no
record buffer at all: what is left is OpenSSL's per-session floor (~24 KiB per end).

The transport follows asyncio's ``Transport`` contract as the proxy's protocols use it: one
``data_received`` per readable event (every record the socket has, up to a bound), writes sent at
once and queued only when the socket is full (with the usual high/low water marks), ``close`` sends
close_notify after the queue drains, ``abort`` does not, and ``connection_lost`` is called once.
TLS has no half-close, so ``can_write_eof`` is False and a peer's EOF closes the transport (as the
loop's TLS transports do).

The TLS socket is the ssl module's C object (``SSLContext._wrap_socket`` on the plain socket, what
``SSLSocket`` wraps): ``SSLContext.wrap_socket`` builds an ``SSLSocket`` in Python around it, which
detaches the plain socket, asks its type, name and peer and sets its timeout again: ~15 us and four
system calls per connection at each end, for methods the transport never calls. The C object has
every method the proxy uses (``do_handshake``, ``read``, ``write``, ``shutdown``, ``getpeercert``,
``session``, ``session_reused``, ``context``, ``cipher``, ``version``); the plain socket keeps the
file descriptor, and the C object reads and writes it as non-blocking (its timeout is 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from tether.proxy.tlssessions import SessionCache, SessionKey, resumed_peer_problem

__all__ = ["TlsTransport", "on_handshake_burst_end", "tls_accept", "tls_connect"]

P = TypeVar("P", bound=asyncio.BaseProtocol)

# (Final: compiled, a constant is inlined; a plain module global is a dict look-up at each use.)
_FULL_RECORD: Final = 16 * 1024  # TLS's largest plaintext record, and the most one SSL_read returns
# Bytes read per readable event before the transport lets other connections run.
_READ_PER_EVENT: Final = 256 * 1024
_HIGH_WATER: Final = 64 * 1024
_LOW_WATER: Final = 16 * 1024


# What _tlsio.read says besides plain bytes (see _tlsio.c).
_ST_MORE: Final = 1
_ST_WANT_WRITE: Final = 2
_ST_EOF: Final = 3
_ST_ERROR: Final = 4


def _io_error(detail: tuple[int, str]) -> BaseException:
    """The exception for a failure _tlsio reported as (errno, message): errno 0 is OpenSSL's."""
    code, message = detail
    return OSError(code, message) if code else ssl.SSLError(1, message)


_tlsctl: Any = None  # tether.proxy.tlsctl once needed (it loads ctypes: a plaintext proxy never does)


def _ctl() -> Any:
    """tether.proxy.tlsctl, imported the first time it is needed."""
    global _tlsctl
    if _tlsctl is None:
        from tether.proxy import tlsctl

        _tlsctl = tlsctl
    return _tlsctl


def _ssl_pointer(sslobj: Any) -> int:
    """The OpenSSL SSL of the TLS socket ``sslobj`` for SSL_free_buffers (tlsctl), or 0 where it is out
    of reach."""
    return _ctl().ssl_pointer(sslobj) or 0


def _free_buffers(ssl_ptr: int) -> None:
    """Free the SSL's record buffers if they hold no data. OpenSSL (SSL_MODE_RELEASE_BUFFERS) frees
    its 16 KiB read buffer after returning application data only: a handshake waiting for its peer,
    and a connection whose last read found only post-handshake messages (a TLS 1.3 server's session
    tickets) or nothing, would hold it. 1,000 mTLS connections opened at once: ~16 MiB."""
    if ssl_ptr:
        _tlsctl.free_buffers(ssl_ptr)


# Handshakes in progress in this process (both directions), and the most since there were none.
_handshaking = 0
_burst_peak = 0
_burst_size = 32
_on_burst_end: Callable[[], object] | None = None


def on_handshake_burst_end(fn: Callable[[], object] | None, size: int = 32) -> None:
    """Call ``fn`` (from the loop, once) when a burst of at least ``size`` concurrent TLS handshakes
    is over (none left in progress). The proxy gives the C heap's free pages back then: each pending
    handshake holds OpenSSL's transient state (key share, messages, the peer's chain being decoded
    and verified) among long-lived allocations, and glibc returns only the heap's top by itself.
    1,000 mTLS connections opened at once left 3-12 MiB free in the heap (malloc_trim: ~1-4 ms)."""
    global _on_burst_end, _burst_size
    _on_burst_end = fn
    _burst_size = size


def _handshake_started() -> None:
    global _handshaking, _burst_peak
    _handshaking += 1
    if _handshaking > _burst_peak:
        _burst_peak = _handshaking


def _handshake_ended(loop: asyncio.AbstractEventLoop) -> None:
    global _handshaking, _burst_peak
    _handshaking -= 1
    if _handshaking == 0:
        burst, _burst_peak = _burst_peak >= _burst_size, 0
        if burst and _on_burst_end is not None:
            loop.call_soon(_on_burst_end)


# Full handshakes under way whose session will be kept, one per (session cache, key): a connection
# to the same key waits for that session and resumes it instead of doing a full handshake of its
# own. A burst of N new connections to a peer then costs one full handshake and N - 1 resumed ones,
# and neither proxy keeps a decoded certificate chain per connection (~8 KiB of OpenSSL's heap per
# end, measured with 100 held connections). The wait ends when the session is kept (the ticket is
# read), when that handshake fails or its connection closes, or _TICKET_WAIT after it completed
# (a server that sends no ticket); an entry stays registered until its first read or its end, and
# while it does no other connection waits or fetches for the key.
_fetches: dict[tuple[SessionCache, SessionKey], asyncio.Future[None]] = {}
_TICKET_WAIT = 0.5

_GONE = asyncio.Protocol()  # the protocol of a transport whose connection_lost has been called


class TlsTransport(asyncio.Transport):
    """One TLS connection whose handshake is done; see the module docstring."""

    __slots__ = ("_after_first_read", "_closing", "_fd", "_has_pending", "_high", "_io", "_local", "_loop", "_lost",
                 "_low", "_orig_dst", "_paused", "_peer", "_protocol", "_queue", "_queued", "_read_wants_write",
                 "_reading", "_retry", "_sock", "_ssl_ptr", "_sslobj", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, sslobj: Any,
                 protocol: asyncio.BaseProtocol, ssl_ptr: int = 0,
                 has_pending: Callable[[int], int] | None = None) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock  # the plain socket: the file descriptor, its addresses, closed at the end
        # The TLS socket (the ssl module's C object, see the module docstring); None once closed, so
        # that OpenSSL's connection is freed with the socket, not with the last reference to this.
        self._sslobj: Any = sslobj
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._reading = False
        self._closing = False
        self._lost = False
        # SSL_write that could not finish must be retried with the same bytes: this is them.
        self._retry: bytes | None = None
        # (A list, not a deque: a deque allocates a 64-slot block, ~0.7 KiB per connection.)
        self._queue: list[bytes] = []
        self._queued = 0
        self._writing = False  # a writer callback is registered
        self._read_wants_write = False
        self._high = _HIGH_WATER
        self._low = _LOW_WATER
        self._paused = False
        self._ssl_ptr = ssl_ptr  # the SSL, for SSL_free_buffers (tlsctl); 0: out of reach
        # SSL_has_pending (tlsctl) when the SSL reads ahead: whether OpenSSL holds bytes the socket
        # will not signal again. None: no read-ahead, OpenSSL holds at most a decrypted record.
        self._has_pending = has_pending
        # The C helper's record I/O on that SSL (tlsctl.record_io), or None: the ssl module's methods.
        self._io: Any = _tlsctl.record_io() if ssl_ptr and has_pending is not None else None
        # Called once, after the first read that returned data or the end, or that found the
        # session's ticket (tlsctl): by then OpenSSL has processed a TLS 1.3 session ticket the
        # server sent after its handshake (the client keeps it). Not on a read that found nothing:
        # the ticket may still be on its way. With None if the transport closes first.
        self._after_first_read: Callable[[Any], None] | None = None
        # The addresses, asked of the socket when first wanted (a system call each).
        self._peer: Any = _UNKNOWN
        self._local: Any = _UNKNOWN
        self._orig_dst: Any = _UNKNOWN  # the destination before a redirect, if the acceptor said

    def _start(self) -> None:
        # Reading is on before connection_made, so a protocol may pause it there (as with asyncio's).
        self.resume_reading()
        self._protocol.connection_made(self)
        # A record read during the handshake may hold application data the socket won't signal.
        self._loop.call_soon(self._on_readable)

    # -- reading -----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._reading or self._lost:
            return
        if self._read_wants_write or self._retry is not None:
            self._flush()
        io = self._io
        if io is None:
            self._read_portable()
            return
        # Every record the socket offers, up to the bound, in one call (see _tlsio.c).
        got = io.read(self._ssl_ptr, _READ_PER_EVENT)
        if type(got) is bytes:  # stopped because the socket has nothing more
            if self._after_first_read is not None and (got or _tlsctl.has_ticket(self._ssl_ptr)):
                self._first_read_done()
            if got:
                self._protocol.data_received(got)
            else:
                _free_buffers(self._ssl_ptr)  # only post-handshake messages, or nothing: see _free_buffers
            return
        data, status, detail = got
        eof = status == _ST_EOF
        error: BaseException | None = None
        if status == _ST_MORE:
            self._loop.call_soon(self._on_readable)  # records OpenSSL holds would not wake the loop
        elif status == _ST_WANT_WRITE:
            self._read_wants_write = True
            self._want_writable()
        elif status == _ST_ERROR:
            error = _io_error(detail)
        self._after_read(data, eof, error)

    def _read_portable(self) -> None:
        """The ssl module's read, where the C helper is not available."""
        sslobj = self._sslobj
        held = self._has_pending
        chunks: list[bytes] = []
        total = 0
        eof = False
        error: BaseException | None = None
        try:
            while total < _READ_PER_EVENT:
                # (One record at most: read into a new bytes, which is what is passed on, rather than
                # into a shared buffer and copied out of it.)
                chunk: bytes = sslobj.read(_FULL_RECORD)
                n = len(chunk)
                if n == 0:
                    eof = True
                    break
                chunks.append(chunk)
                total += n
                if n < _FULL_RECORD and (held is None or not held(self._ssl_ptr)):
                    # A short record usually ends what the peer sent. If OpenSSL holds nothing more
                    # (read-ahead may have taken further records from the socket, which would not
                    # signal them again), anything more is still in the socket and the loop will say
                    # so: not asking saves a read(2) that would only say EAGAIN.
                    break
            else:
                # Stopped by the bound: records OpenSSL already holds would not wake the loop.
                self._loop.call_soon(self._on_readable)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:
            # OpenSSL must send before it can read on: retry the read once the socket is writable.
            self._read_wants_write = True
            self._want_writable()
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            eof = True  # close_notify, or a peer that closed its socket without one
        except (OSError, ssl.SSLError) as e:
            error = e
        if not chunks and not eof and error is None and self._after_first_read is not None and self._ssl_ptr \
                and _tlsctl.has_ticket(self._ssl_ptr):
            self._first_read_done()
        self._after_read((chunks[0] if len(chunks) == 1 else b"".join(chunks)) if chunks else None, eof, error)

    def _after_read(self, data: bytes | None, eof: bool, error: BaseException | None) -> None:
        if (data or eof) and self._after_first_read is not None:
            self._first_read_done()
        if data:
            self._protocol.data_received(data)
        elif not eof and error is None:
            _free_buffers(self._ssl_ptr)  # only post-handshake messages, or nothing: see _free_buffers
        if error is not None:
            self._fatal(error)
        elif eof and not self._lost:
            self.pause_reading()
            with contextlib.suppress(Exception):
                self._protocol.eof_received()
            # TLS has no half-close: whatever eof_received says, the connection is done.
            self.close()

    def _first_read_done(self) -> None:
        hook = self._after_first_read
        if hook is not None:
            self._after_first_read = None
            try:
                hook(self._sslobj)
            except Exception as e:  # a cache's bookkeeping never costs the connection
                self._loop.call_exception_handler({"message": "TLS after-first-read hook failed",
                                                   "exception": e, "transport": self})

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._lost:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
            io = self._io
            held = self._has_pending
            if (io.has_pending(self._ssl_ptr) if io is not None
                    else held(self._ssl_ptr) if held is not None else self._sslobj.pending()):
                self._loop.call_soon(self._on_readable)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing -----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        if self._retry is None and not self._queue:
            io = self._io
            if io is not None:
                r = io.write(self._ssl_ptr, data)
                if type(r) is not int:
                    self._fatal(_io_error(r))
                    return
                if r == len(data):
                    return
                if r:  # (a partial write, which the ssl module's SSLs do not make: the rest queued)
                    self._queue.append(bytes(memoryview(data)[r:]))
                    self._queued += len(data) - r
                else:  # OpenSSL waits for the socket: the same bytes again
                    self._retry = bytes(data)
                    self._queued += len(data)
                self._want_writable()
                self._maybe_pause_protocol()
                return
            try:
                n = self._sslobj.write(data)
                if n == len(data):
                    return
                data = memoryview(data)[n:]  # (a partial write: a new write for what is left)
                self._queue.append(bytes(data))
                self._queued += len(data)
                self._want_writable()
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                self._retry = bytes(data)
                self._queued += len(data)
                self._want_writable()
            except (OSError, ssl.SSLError) as e:
                self._fatal(e)
                return
        else:
            self._queue.append(bytes(data))
            self._queued += len(data)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _want_writable(self) -> None:
        if not self._writing and not self._lost:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._flush()
        if self._read_wants_write and not self._lost:
            self._read_wants_write = False
            self._on_readable()

    def _flush(self) -> None:
        """Send what is queued: the unfinished write first (same bytes), then the rest as one write."""
        if self._lost:
            return
        try:
            while True:
                if self._retry is None:
                    if not self._queue:
                        break
                    self._retry = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                    self._queue.clear()
                data = self._retry
                io = self._io
                if io is not None:
                    r = io.write(self._ssl_ptr, data)
                    if type(r) is not int:
                        self._fatal(_io_error(r))
                        return
                    if not r:
                        self._want_writable()
                        return
                    n = r
                else:
                    n = self._sslobj.write(data)
                self._retry = None
                self._queued -= n
                if n < len(data):
                    self._queue.insert(0, data[n:])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._want_writable()
            return
        except (OSError, ssl.SSLError) as e:
            self._fatal(e)
            return
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._maybe_resume_protocol()
        if self._closing:
            self._finish_close()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if not self._paused and self._queued > self._high:
            self._paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._paused and self._queued <= self._low:
            self._paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except Exception as e:
            self._loop.call_exception_handler({"message": f"protocol.{name}() failed", "exception": e,
                                               "transport": self, "protocol": self._protocol})

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    # -- closing -----------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Stop reading; once the queue is sent, send close_notify and close the socket."""
        if self._closing or self._lost:
            return
        self._closing = True
        self.pause_reading()
        if self._retry is None and not self._queue:
            self._finish_close()

    def _finish_close(self) -> None:
        # Sends our close_notify; the peer's is not waited for.
        if self._ssl_ptr:
            _tlsctl.close_notify(self._ssl_ptr)
        else:
            with contextlib.suppress(OSError, ValueError, ssl.SSLError):
                self._sslobj.shutdown()  # (the socket is non-blocking: it does not wait either)
        self._teardown(None)

    def abort(self) -> None:
        self._teardown(None)

    def _fatal(self, exc: BaseException) -> None:
        self._teardown(exc)

    def _teardown(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._retry = None
        self._queued = 0
        with contextlib.suppress(OSError):
            self._sock.close()
        self._sslobj = None
        self._ssl_ptr = 0
        hook, self._after_first_read = self._after_first_read, None
        if hook is not None:  # closed before its first read: the hook learns there is nothing to read
            try:
                hook(None)
            except Exception as e:
                self._loop.call_exception_handler({"message": "TLS after-first-read hook failed", "exception": e,
                                                   "transport": self})
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, _GONE
        # Let go of the protocol (which holds this transport): no cycle outlives the connection.
        protocol.connection_lost(exc)

    # -- the rest of the Transport interface ---------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self._sslobj
        if name == "ssl_object":
            return sslobj
        if name == "socket":
            return self._sock
        if name == "peername":
            if self._peer is _UNKNOWN:
                self._peer = _address(self._sock.getpeername)
            return self._peer
        if name == "sockname":
            if self._local is _UNKNOWN:
                self._local = _address(self._sock.getsockname)
            return self._local
        if name == "original_dst":
            return default if self._orig_dst is _UNKNOWN else self._orig_dst
        if sslobj is None:  # closed: OpenSSL's connection is gone
            return default
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<TlsTransport fd={self._fd} {state} peer={self.get_extra_info('peername')}>"


_UNKNOWN: Final = object()


def _address(ask: Callable[[], Any]) -> Any:
    try:
        return ask()
    except OSError:  # (closed, or the peer went away)
        return None


async def _handshake(loop: asyncio.AbstractEventLoop, sslobj: Any, fd: int, timeout: float | None,
                     registered: bool = False, writer: bool = False) -> tuple[int, Callable[[int], int] | None]:
    """Run the handshake; the SSL's pointer for the transport (0: out of reach) and, if it reads
    ahead, SSL_has_pending.

    The socket's reader stays registered with the loop from one wait to the next and, when the
    handshake succeeds, for the transport (which replaces its callback): with uvloop every fresh
    registration is a poll handle of its own (epoll_ctl add, delete and add again, an ioctl) and every
    removal one more epoll_ctl, ~5 system calls per wait. On failure it is removed here.
    ``registered``: the caller registered the reader already (the inbound listener's peek);
    ``writer``: the writer (the outbound connect's wait), whose callback may run once more.
    """
    ssl_ptr = _ssl_pointer(sslobj)
    # Read-ahead from the first record: one read(2) per record instead of two (see tlsctl.read_ahead).
    has_pending = _tlsctl.read_ahead(ssl_ptr) if ssl_ptr else None
    reading, writing, done = registered, writer, False
    step: Callable[[], None] = sslobj.do_handshake
    # The deadline: one timer that fails the wait under way (asyncio.timeout's context manager, a
    # Python class, costs ~10 us per handshake for the same).
    deadline = _Deadline()
    timer = loop.call_later(timeout, deadline.expire) if timeout is not None else None
    _handshake_started()
    try:
        while True:
            try:
                step()
                done = True
                return ssl_ptr, has_pending
            except ssl.SSLWantReadError:
                _free_buffers(ssl_ptr)  # the peer may take a while: hold no read buffer meanwhile
                ready = loop.create_future()
                loop.add_reader(fd, _set_ready, ready)  # (registered: only the callback changes)
                reading = True
                if writing:
                    loop.remove_writer(fd)
                    writing = False
            except ssl.SSLWantWriteError:
                ready = loop.create_future()
                loop.add_writer(fd, _set_ready, ready)
                writing = True
                if reading:
                    loop.remove_reader(fd)
                    reading = False
            if deadline.expired:
                raise TimeoutError
            deadline.waiting = ready
            await ready
    finally:
        if timer is not None:
            timer.cancel()
        if writing:
            loop.remove_writer(fd)
        if reading and not done:
            loop.remove_reader(fd)
        _handshake_ended(loop)


class _Deadline:
    """The end of a handshake's time: fails the future it waits on (and any it would wait on next)."""

    __slots__ = ("expired", "waiting")

    def __init__(self) -> None:
        self.expired = False
        self.waiting: asyncio.Future[None] | None = None

    def expire(self) -> None:
        self.expired = True
        fut = self.waiting
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError())


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wrap(loop: asyncio.AbstractEventLoop, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                server_hostname: str | None, protocol_factory: Callable[[], P],
                handshake_timeout: float | None, session: ssl.SSLSession | None = None,
                tickets: int | None = None,
                after_first_read: Callable[[Any], None] | None = None,
                registered: bool = False, writer: bool = False, addresses: Any = None,
                preface: bytes | None = None, alpn: bytes | None = None) -> tuple[TlsTransport, P]:
    fd = raw.fileno()
    sslobj: Any
    try:
        if tickets is not None and tickets != ctx.num_tickets:
            # OpenSSL copies the ticket count into each connection when it is created (SSL_new) and
            # the ssl module has no per-connection setter: set it on the context around the wrap
            # (one thread: nothing else wraps with this context meanwhile). The ticket keys stay
            # the context's, so what is issued here is accepted by the context's other connections.
            saved = ctx.num_tickets
            ctx.num_tickets = tickets
            try:
                sslobj = ctx._wrap_socket(raw, True)  # type: ignore[attr-defined]
            finally:
                ctx.num_tickets = saved
        else:
            # (What wrap_socket checks first: a client names the server it verifies.)
            if not server_side and not server_hostname and ctx.check_hostname:
                raise ValueError("check_hostname requires server_hostname")
            sslobj = ctx._wrap_socket(raw, server_side, server_hostname)  # type: ignore[attr-defined]
            # (tlsctl only here: a plaintext proxy never loads ctypes, ~0.5 MiB)
            if alpn is not None:
                _ctl().offer_alpn(sslobj, alpn)
            if session is not None and not _ctl().offer_session(sslobj, session):
                with contextlib.suppress(ValueError):  # another context's session: a full handshake
                    sslobj.session = session  # (the ssl module copies it: ~1.6M instructions)
    except BaseException:
        if registered:
            loop.remove_reader(fd)
        if writer:
            loop.remove_writer(fd)
        raw.close()
        raise
    try:
        ssl_ptr, has_pending = await _handshake(loop, sslobj, fd, handshake_timeout, registered, writer)
    except TimeoutError:
        raw.close()
        raise ConnectionAbortedError(
            f"TLS handshake is taking longer than {handshake_timeout} seconds: aborting the connection") from None
    except BaseException:
        raw.close()
        raise
    # From here the socket's reader may still be registered (see _handshake): the transport takes
    # it over, and every other way out removes it before the socket closes.
    try:
        if sslobj.session_reused:
            problem = resumed_peer_problem(sslobj, None if server_side else server_hostname, time.time())
            if problem is not None:
                raise ConnectionAbortedError(f"refused a resumed TLS session: {problem}")
        protocol = protocol_factory()
    except BaseException:
        loop.remove_reader(fd)
        raw.close()
        raise
    transport = TlsTransport(loop, raw, sslobj, protocol, ssl_ptr, has_pending)
    transport._after_first_read = after_first_read
    if addresses is not None:
        transport._local, transport._orig_dst = addresses
    try:
        if preface:
            transport.write(preface)  # before anything the protocol writes in connection_made
        transport._start()
    except BaseException:
        transport.abort()
        raise
    return transport, protocol


async def tls_accept(protocol_factory: Callable[[], P], sock: socket.socket,
                     ctx: ssl.SSLContext, handshake_timeout: float | None,
                     tickets: int | None = None, registered: bool = False,
                     prepared: bool = False, addresses: Any = None) -> tuple[TlsTransport, P]:
    """Terminate TLS on an accepted socket (its handshake, then the protocol); it owns ``sock`` from here.

    ``tickets``: TLS 1.3 session tickets to issue on this connection (default: the context's count).
    ``registered``: the socket's reader is registered with the loop (any callback): it is taken over.
    ``prepared``: the caller made the socket non-blocking and set TCP_NODELAY (two system calls
    not made again). A resumed session's peer is checked as a full handshake would (see tlssessions).
    ``addresses``: (local address, original destination or None) if the caller asked the socket
    already: the transport's ``sockname`` and ``original_dst`` extra info, not asked again.
    """
    loop = asyncio.get_running_loop()
    if not prepared:
        sock.setblocking(False)
        # OpenSSL sends each record with its own send(): without this the last, short one of a write
        # waits for the peer's delayed ACK (40 ms) under Nagle's algorithm.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return await _wrap(loop, sock, ctx, True, None, protocol_factory, handshake_timeout, tickets=tickets,
                       registered=registered, addresses=addresses)


async def tls_connect(protocol_factory: Callable[[], P], host: str, port: int,
                      ctx: ssl.SSLContext, server_hostname: str,
                      handshake_timeout: float | None,
                      sessions: SessionCache | None = None,
                      preface: bytes | None = None, alpn: bytes | None = None) -> tuple[TlsTransport, P]:
    """Dial ``host:port`` and do a TLS handshake asking for ``server_hostname``.

    ``preface``: bytes sent first after the handshake, before the protocol's own (a transport header);
    ``alpn``: ALPN offered on this connection (wire form) instead of the context's.

    With ``sessions`` (the cache of ``ctx``), a session cached for this identity and address is
    offered, and a full handshake's session is kept for the next connection; while one is under
    way, the next connections wait for it (bounded: see ``_fetches``).
    """
    loop = asyncio.get_running_loop()
    key: SessionKey = (server_hostname, host, port)
    resuming = sessions is not None and sessions.context is ctx
    finish = None
    if sessions is not None and resuming:
        finish = await _fetch_or_wait(loop, sessions, key, handshake_timeout)
    try:
        infos = _numeric_address(host, port)
        if infos is None:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        error: OSError | None = None
        for family, type_, proto, _, addr in infos:
            # Non-blocking from the start (SOCK_NONBLOCK: no ioctl to make it so).
            raw = socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto)
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer = await _sock_connect(loop, raw, addr)
            except OSError as e:
                raw.close()
                error = e
                continue
            except BaseException:
                raw.close()
                raise
            # (No await from here to the handshake's first step, which takes the writer over.)
            if sessions is None or not resuming:
                return await _wrap(loop, raw, ctx, False, server_hostname, protocol_factory, handshake_timeout,
                                   writer=writer, preface=preface, alpn=alpn)
            return await _connect_resuming(loop, raw, ctx, server_hostname, protocol_factory, handshake_timeout,
                                           sessions, key, finish, writer, preface, alpn)
        raise error or OSError(f"cannot resolve {host}:{port}")
    except BaseException:
        if finish is not None:
            finish(True)
        raise


async def _sock_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: Any) -> bool:
    """Connect the non-blocking ``sock`` to the resolved ``addr``; True if its writer is left registered.

    Not ``loop.sock_connect``: uvloop's resolves the address again in its thread pool, and removes
    the writer the handshake registers again at once (a new poll handle: ~5 system calls). Errors
    are the loop's: ``OSError(errno, "Connect call failed <addr>")``.
    """
    try:
        sock.connect(addr)
        return False
    except (BlockingIOError, InterruptedError):
        pass
    fd = sock.fileno()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_writer(fd, _set_ready, ready)
    try:
        await ready
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            raise OSError(err, f"Connect call failed {addr}")
    except BaseException:
        loop.remove_writer(fd)
        raise
    return True


def _numeric_address(host: str, port: int) -> list[tuple[Any, Any, Any, str, Any]] | None:
    """What getaddrinfo answers for an IP address (an endpoint's usual form), without asking it: the
    loop's getaddrinfo runs in a thread pool (uvloop, asyncio), ~4 futex calls and two thread
    switches per new connection. None for a name or an address it must interpret."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))]
    except OSError:
        return None


async def _fetch_or_wait(loop: asyncio.AbstractEventLoop, sessions: SessionCache, key: SessionKey,
                         timeout: float | None) -> Callable[[bool], None] | None:
    """Wait (bounded) for the session of a full handshake to ``key`` under way, if there is one.

    Then, if this connection's full handshake is to bring the key's session, register it and return
    the call that ends the others' wait (``finish(True)``: and its registration); None otherwise."""
    fetch_key = (sessions, key)  # (the cache itself: no id reused while registered)
    fetch = _fetches.get(fetch_key)
    if fetch is not None and not fetch.done() and sessions.wants(key):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(fetch)
    if not sessions.wants(key) or fetch_key in _fetches:
        return None  # (a fetch whose wait ended without its session: its first read will tell)
    mine: asyncio.Future[None] = loop.create_future()
    _fetches[fetch_key] = mine

    def finish(unregister: bool) -> None:
        if unregister and _fetches.get(fetch_key) is mine:
            del _fetches[fetch_key]
        if not mine.done():
            mine.set_result(None)

    return finish


def _reused(transport: TlsTransport) -> bool:
    sslobj = transport._sslobj
    return sslobj is not None and bool(sslobj.session_reused)


async def _connect_resuming(loop: asyncio.AbstractEventLoop, raw: socket.socket, ctx: ssl.SSLContext,
                            server_hostname: str, protocol_factory: Callable[[], P], handshake_timeout: float | None,
                            sessions: SessionCache, key: SessionKey,
                            finish: Callable[[bool], None] | None, writer: bool = False,
                            preface: bytes | None = None, alpn: bytes | None = None) -> tuple[TlsTransport, P]:
    session = sessions.offer(key)
    keep = None
    if finish is not None and (session is not None or not sessions.wants(key)):
        # An earlier connection's first read kept a session (offered here) or learnt that the
        # peer sends none, meanwhile: nothing to fetch.
        finish(True)
        finish = None
    if session is None and sessions.wants(key):
        fetched = finish

        def keep(sslobj: Any) -> None:
            try:
                if sslobj is not None:
                    sessions.store(key, sslobj)
            finally:
                if fetched is not None:
                    fetched(True)
    try:
        transport, protocol = await _wrap(loop, raw, ctx, False, server_hostname, protocol_factory,
                                          handshake_timeout, session=session, after_first_read=keep, writer=writer,
                                          preface=preface, alpn=alpn)
    except BaseException:
        if session is not None:
            sessions.discard(key)  # (refused as a resumed peer, or a handshake that failed with it)
        raise
    if finish is not None:
        # A server that sends no ticket (Linkerd's proxy, resumption off) shows it only at the first
        # read with data, which may be the answer: the others stop waiting after a moment and do
        # full handshakes (no later connection waits for this one again).
        loop.call_later(_TICKET_WAIT, finish, False)
    if session is not None and not _reused(transport):
        # The server refused it (rotated its certificate or anchors, restarted, or it expired
        # there): it will refuse it again. This full handshake got no ticket (the server issues one
        # only to a client offering none), so the next connection asks for one.
        sessions.discard(key)
    return transport, protocol
