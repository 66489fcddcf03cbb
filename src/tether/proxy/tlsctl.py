"""OpenSSL calls the ssl module does not offer, made through ctypes on the objects it built.

Two serve TLS session resumption between tether proxies (``tlssessions``), and each saves a
decode of a certificate (~1.6M instructions with OpenSSL 3.0, whose decoders look providers up for
every public key; callgrind):

* :func:`keep_server_sessions`: the server keeps resumable sessions in its context's own cache
  (a session id context, a bounded cache, a lifetime) and issues *stateful* tickets (a session id).
  Without it a TLS 1.3 ticket carries the whole session, client certificate included, encrypted
  under the context's ticket key, and every resumption decodes it again (``d2i_SSL_SESSION``). The
  lifetime is also a bound the server enforces itself: a session older than it is not resumed.
* :func:`offer_session`: a client offers a cached session without the ssl module's defensive copy
  (``_ssl_session_dup``: a DER round trip, for an OpenSSL 1.1.0 bug with sessions shared between
  connections; resumed TLS 1.3 client handshakes do not modify the session, and the proxy's loop
  is one thread).

One serves the transport's reads: :func:`read_ahead` has OpenSSL read a record in one read(2)
instead of two, and gives the transport SSL_has_pending to ask what its buffer still holds.

One more gives the transport its record I/O (:func:`record_io`): the C helper ``_tlsio`` bound to
this libssl's SSL_read_ex, SSL_write_ex and SSL_has_pending.

Two make full handshakes cheaper (the C helper ``_tlsverify`` says exactly how):
:func:`cache_verified_chains` has a context remember the peer chains it verified, and
:func:`legacy_ec_keys` has OpenSSL 3.0 use its built-in EC key code instead of its providers.

And one serves memory: :func:`release_buffers` frees a connection's record buffers when they hold
nothing (``SSL_free_buffers``). With SSL_MODE_RELEASE_BUFFERS (the ssl module sets it) OpenSSL frees
its 16 KiB read buffer after returning application data, but keeps it after a read that found only
post-handshake messages: a client connection that read its session tickets and waits for an answer
would hold it (~16 KiB per held mTLS connection, measured in the client proxy).

The pointers are read from CPython 3.11's object layouts and checked against what the objects
report through the ssl module before anything is changed; on another interpreter, another
OpenSSL major version, or any mismatch, the functions return False and callers keep the portable
path (stateless tickets, ``session=``).
"""

from __future__ import annotations

import ctypes
import importlib
import ssl
import sys
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

__all__ = ["available", "cache_verified_chains", "free_buffers", "has_ticket", "keep_server_sessions",
           "legacy_ec_keys", "offer_alpn", "offer_session", "prefer_suites", "read_ahead", "record_io",
           "release_buffers", "ssl_pointer", "verified_chain_cache_available"]

_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_SERVER = 0x0002
_OBJECT_HEAD = object.__basicsize__  # PyObject_HEAD: the first field of each object follows it


_vp, _u64, _long, _int, _uint = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_long, ctypes.c_int, ctypes.c_uint
# libssl's functions used here: name, result and argument types, and whether it is called per
# connection or per read (those also go through the PyDLL below).
_FUNCTIONS: tuple[tuple[str, Any, list[Any], bool], ...] = (
    ("SSL_CTX_get_options", _u64, [_vp], False),
    ("SSL_CTX_set_session_id_context", _int, [_vp, ctypes.c_char_p, _uint], False),
    ("SSL_CTX_ctrl", _long, [_vp, _int, _long, _vp], False),
    ("SSL_CTX_set_timeout", _long, [_vp, _long], False),
    ("SSL_get_SSL_CTX", _vp, [_vp], True),
    ("SSL_set_session", _int, [_vp, _vp], True),
    ("SSL_SESSION_get_time", _long, [_vp], True),
    ("SSL_SESSION_get_timeout", _long, [_vp], True),
    ("SSL_SESSION_get_protocol_version", _int, [_vp], True),
    ("SSL_free_buffers", _int, [_vp], True),
    ("SSL_get_session", _vp, [_vp], True),
    ("SSL_SESSION_has_ticket", _int, [_vp], True),
    ("SSL_set_read_ahead", None, [_vp, _int], True),
    ("SSL_has_pending", _int, [_vp], True),
    ("SSL_CTX_set_ciphersuites", _int, [_vp, ctypes.c_char_p], False),
    ("SSL_shutdown", _int, [_vp], True),
    ("SSL_set_alpn_protos", _int, [_vp, ctypes.c_char_p, _uint], True),
    ("ERR_clear_error", None, [], True),  # (libcrypto's, found through libssl's dependencies)
)
# Handed to the C helper by address (record_io), never called through ctypes. ERR_* are libcrypto's,
# found through libssl's dependencies.
_IO_FUNCTIONS = ("SSL_read_ex", "SSL_write_ex", "SSL_get_error", "SSL_has_pending", "ERR_get_error",
                 "ERR_clear_error", "ERR_error_string_n")


def _load() -> Any:
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11) or ssl.OPENSSL_VERSION_INFO[0] != 3:
        return None
    path = None
    try:
        with open("/proc/self/maps") as maps:  # the libssl the ssl module is linked with, already loaded
            for line in maps:
                if "/libssl.so" in line:
                    path = line.split()[-1]
                    break
    except OSError:
        return None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for name, restype, argtypes, _ in _FUNCTIONS:
        fn = getattr(lib, name, None)
        if fn is None:
            return None
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_lib = _load()


def _load_fast(lib: Any) -> Any:
    """The same library through a PyDLL, for the calls made per connection or per read: a CDLL
    function releases the GIL and takes it back around every call (~500 of the ~2,100 instructions
    of a call, callgrind); these return at once and never block."""
    if lib is None:
        return None
    fast = ctypes.PyDLL(lib._name)
    for name, restype, argtypes, per_connection in _FUNCTIONS:
        if not per_connection:
            continue
        fn = getattr(fast, name)
        fn.restype, fn.argtypes = restype, argtypes
    return fast


_fast = _load_fast(_lib)


def available() -> bool:
    """True if this interpreter and OpenSSL are the ones whose layouts this module knows."""
    return _lib is not None


def _field(obj: object, index: int = 0) -> int | None:
    """The pointer-sized field ``index`` after the object header (CPython's C layout)."""
    value = ctypes.c_void_p.from_address(id(obj) + _OBJECT_HEAD + index * ctypes.sizeof(ctypes.c_void_p)).value
    return value or None


# id(context) -> (a weak reference to it, its SSL_CTX): checked once per context, as a context's
# SSL_CTX is fixed for its life (reading ``ctx.options`` builds an enum member: ~5k instructions).
_ctx_ptrs: dict[int, tuple[weakref.ref[ssl.SSLContext], int]] = {}


def _ssl_ctx(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX of ``ctx`` (PySSLContext: the first field), checked against its options."""
    known = _ctx_ptrs.get(id(ctx))
    if known is not None and known[0]() is ctx:
        return known[1]
    if _lib is None or not isinstance(ctx, ssl.SSLContext):
        return None
    ptr = _field(ctx)
    if ptr is None or _lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        return None
    key = id(ctx)
    _ctx_ptrs[key] = (weakref.ref(ctx, lambda _: _ctx_ptrs.pop(key, None)), ptr)
    return ptr


def keep_server_sessions(ctx: ssl.SSLContext, session_id_context: bytes, max_entries: int, lifetime: float) -> bool:
    """Make a server context keep sessions itself (stateful tickets) for ``lifetime`` seconds, at
    most ``max_entries`` of them (the oldest go first); False if that cannot be done here.

    Call before any connection is made with ``ctx``. Tickets are then issued as the context says
    (``num_tickets``) and OP_NO_TICKET is set: in TLS 1.3 it means stateful tickets, not none.
    """
    ptr = _ssl_ctx(ctx)
    if ptr is None or _lib is None:
        return False
    if _lib.SSL_CTX_set_session_id_context(ptr, session_id_context, len(session_id_context)) != 1:
        return False
    _lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_SERVER, None)
    _lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_SIZE, max_entries, None)
    _lib.SSL_CTX_set_timeout(ptr, max(1, int(lifetime)))
    ctx.options |= ssl.OP_NO_TICKET
    return True


def prefer_suites(ctx: ssl.SSLContext, suites: str) -> bool:
    """Set the TLS 1.3 cipher suites of ``ctx``, in order of preference (``SSL_CTX_set_ciphersuites``,
    which the ssl module does not offer); False if that cannot be done here (OpenSSL's default stays).
    """
    ptr = _ssl_ctx(ctx)
    if ptr is None or _lib is None:
        return False
    return bool(_lib.SSL_CTX_set_ciphersuites(ptr, suites.encode("ascii")) == 1)


# The ssl module's C TLS socket type (what SSLSocket and SSLObject wrap).
_C_TLS_SOCKET: Any = getattr(getattr(ssl, "_ssl", None), "_SSLSocket", None)


def _c_object(sock: Any) -> Any:
    """The ssl module's C TLS object of ``sock`` (an SSLSocket's or SSLObject's ``_sslobj``), or ``sock``
    itself if it is one; None if there is none (not wrapped yet, or closed)."""
    if type(sock) is _C_TLS_SOCKET:
        return sock
    return getattr(sock, "_sslobj", None)


def offer_session(sock: Any, session: ssl.SSLSession) -> bool:
    """Offer ``session`` on ``sock`` (a client TLS socket before its handshake: the ssl module's C
    object, or an SSLSocket) without copying it; False if it could not be done this way (the caller
    sets ``sock.session`` instead)."""
    if _lib is None:
        return False
    sslobj = _c_object(sock)
    ctx_ptr = _ssl_ctx(sock.context)
    if sslobj is None or ctx_ptr is None or type(session) is not ssl.SSLSession:
        return False
    ssl_ptr = _field(sslobj, 1)  # PySSLSocket: a weak reference to the socket, then the SSL
    sess_ptr = _field(session)  # PySSLSession: the SSL_SESSION, then the context that made it
    if _field(session, 1) != id(sock.context):
        return False  # another context's session: the ssl module refuses it, and so do we
    if ssl_ptr is None or sess_ptr is None or _fast.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return False
    fast = _fast
    if (fast.SSL_SESSION_get_time(sess_ptr) != session.time or fast.SSL_SESSION_get_timeout(sess_ptr) != session.timeout
            or fast.SSL_SESSION_get_protocol_version(sess_ptr) != 0x0304):
        return False
    return bool(_fast.SSL_set_session(ssl_ptr, sess_ptr) == 1)


def offer_alpn(sock: Any, wire: bytes) -> bool:
    """Offer ALPN ``wire`` (length-prefixed protocol names) on this client TLS socket before its
    handshake, whatever its context offers (``SSL_set_alpn_protos``: the ssl module sets ALPN per
    context only); False if that cannot be done here."""
    ptr = ssl_pointer(sock)
    return ptr is not None and _fast.SSL_set_alpn_protos(ptr, wire, len(wire)) == 0  # (0 is success here)


def ssl_pointer(sock: Any) -> int | None:
    """The SSL of ``sock`` (an open TLS socket: the ssl module's C object, or an SSLSocket), checked
    against its context; None where this module cannot reach it. Valid until the socket is closed."""
    if _lib is None:
        return None
    sslobj = _c_object(sock)
    ctx_ptr = _ssl_ctx(sock.context)
    if sslobj is None or ctx_ptr is None:
        return None
    ssl_ptr = _field(sslobj, 1)  # PySSLSocket: a weak reference to the socket, then the SSL
    if ssl_ptr is None or _fast.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return None
    return ssl_ptr


def _free_buffers_is_safe(version: tuple[int, ...]) -> bool:
    # CVE-2024-4741: before these releases SSL_free_buffers could free a read buffer holding part of a
    # record still to be processed (a use after free). Fixed in 3.0.14, 3.1.6, 3.2.2 and 3.3.1.
    # (ssl.OPENSSL_VERSION_INFO of OpenSSL 3 is (3, minor, 0, patch, status).)
    major, minor, patch = version[0], version[1], version[3]
    return major == 3 and patch >= {0: 14, 1: 6, 2: 2, 3: 1}.get(minor, 0)


_FREE_BUFFERS = _lib is not None and _free_buffers_is_safe(tuple(ssl.OPENSSL_VERSION_INFO))


def free_buffers(ssl_ptr: int) -> bool:
    """SSL_free_buffers on an SSL from :func:`ssl_pointer`: True if it holds no record buffer now.
    False while part of a record is buffered, and with an OpenSSL whose SSL_free_buffers is unsafe
    (then nothing changes)."""
    if not _FREE_BUFFERS or _lib is None:
        return False
    return bool(_fast.SSL_free_buffers(ssl_ptr) == 1)


def has_ticket(ssl_ptr: int) -> bool:
    """True if the session of an SSL from :func:`ssl_pointer` holds a ticket (a client that has read
    the server's NewSessionTicket), without the copy that reading ``SSLSocket.session`` makes."""
    if _lib is None:
        return False
    sess = _fast.SSL_get_session(ssl_ptr)
    return bool(sess) and _fast.SSL_SESSION_has_ticket(sess) == 1


def close_notify(ssl_ptr: int) -> None:
    """Send close_notify on an SSL from :func:`ssl_pointer`, once, without waiting for the peer's.

    The ssl module's ``shutdown()`` calls SSL_shutdown a second time to read the peer's close_notify:
    on a non-blocking socket a read(2) that finds nothing and an SSLWantReadError, for a connection
    about to be closed. A failure (the peer has gone) leaves nothing on OpenSSL's error queue."""
    if _fast.SSL_shutdown(ssl_ptr) < 0:
        _fast.ERR_clear_error()


def read_ahead(ssl_ptr: int) -> Callable[[int], int] | None:
    """Turn read-ahead on for an SSL from :func:`ssl_pointer` (before its first read) and return
    SSL_has_pending, which its reader must then ask after every record; None if not done here.

    Without read-ahead OpenSSL reads a record in two read(2) calls (its 5-byte header, then its
    body); with it, in one that takes whatever the socket holds, up to its read buffer. So the
    buffer may keep further records, or the start of one, that the socket will not signal again:
    SSL_has_pending (1 if it holds any byte, decrypted or not) says when to read on without waiting.
    (Both through the PyDLL: see ``_load_fast``.)
    """
    if _fast is None:
        return None
    _fast.SSL_set_read_ahead(ssl_ptr, 1)
    has_pending: Callable[[int], int] = _fast.SSL_has_pending
    return has_pending


_io: Any = False  # the bound C helper, None where it cannot be used; False: not looked at yet


def record_io() -> Any:
    """``tether.proxy._tlsio`` bound to this libssl (read, write and has_pending on an SSL from
    :func:`ssl_pointer`), or None: not built, built from other sources (``tether.native``), or no
    libssl this module knows. Callers keep the ssl module's methods then."""
    global _io
    if _io is False:
        _io = _bound_helper("_tlsio", _IO_FUNCTIONS)
    return _io


def _bound_helper(name: str, functions: tuple[str, ...], optional: frozenset[str] = frozenset()) -> Any:
    """The C helper ``tether.proxy.<name>`` bound to ``functions`` (their addresses, in order; one in
    ``optional`` may be missing: 0 then), or None if it or a function that is not optional is missing."""
    helper = _c_helper(name)
    if helper is None:
        return None
    addresses = [_address(f) for f in functions]
    if any(not a and f not in optional for f, a in zip(functions, addresses, strict=True)):
        return None
    helper.bind(*(a or 0 for a in addresses))
    return helper


def _c_helper(name: str) -> Any:
    """The C helper ``tether.proxy.<name>``, unbound, or None: no libssl this module knows, or not
    built with the compiled modules' current sources (``tether.native``): the portable path then."""
    if _lib is None:
        return None
    from tether import native

    if native.state != "compiled":
        return None
    try:
        return importlib.import_module(f"tether.proxy.{name}")
    except ImportError:
        return None


def release_buffers(sock: Any) -> bool:
    """Free the record buffers OpenSSL holds for ``sock`` if they hold no data; True if none is held
    now, False otherwise or where this module cannot reach the SSL object."""
    ptr = ssl_pointer(sock)
    return ptr is not None and free_buffers(ptr)


# tether.proxy._tlsverify's functions, in its bind() order (libcrypto's found through libssl's
# dependencies, as ERR_* above).
_VERIFY_FUNCTIONS = (
    "EVP_PKEY_meth_find", "X509_verify_cert", "X509_STORE_CTX_get0_cert", "X509_STORE_CTX_get0_untrusted",
    "X509_STORE_CTX_get0_chain", "X509_STORE_CTX_get0_param", "X509_STORE_CTX_get_error",
    "X509_STORE_CTX_set_error", "X509_STORE_CTX_get_ex_data", "OPENSSL_sk_num", "OPENSSL_sk_value", "i2d_X509",
    "X509_get0_notBefore", "X509_get0_notAfter", "ASN1_TIME_to_tm", "X509_VERIFY_PARAM_get_flags",
    "X509_VERIFY_PARAM_get_depth", "X509_VERIFY_PARAM_get_auth_level", "X509_VERIFY_PARAM_get_hostflags",
    "X509_VERIFY_PARAM_get0_host", "X509_VERIFY_PARAM_get0_email", "X509_VERIFY_PARAM_get1_ip_asc",
    "CRYPTO_free", "X509_check_host", "SSL_get_ex_data_X509_STORE_CTX_idx", "SSL_is_server",
    "ERR_set_mark", "ERR_pop_to_mark",
)
_verify: Any = False  # the bound C helper, None where it cannot be used; False: not looked at yet


def _function(name: str) -> Any:
    """A function of libssl (or of the libcrypto it links) not kept on the library object, as
    attribute access would keep it (the ones used once stay out of the proxy's memory); None if absent."""
    try:
        return _lib[name] if _lib is not None else None
    except AttributeError:
        return None


def _address(name: str) -> int | None:
    fn = _function(name)
    return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


def _verify_helper() -> Any:
    """``tether.proxy._tlsverify`` bound to this libssl and libcrypto, or None (see :func:`record_io`)."""
    global _verify
    if _verify is False:
        # EVP_PKEY_meth_find may be missing (OpenSSL built without deprecated APIs): only
        # legacy_ec_keys needs it.
        _verify = _bound_helper("_tlsverify", _VERIFY_FUNCTIONS, frozenset({"EVP_PKEY_meth_find"}))
    return _verify


def verified_chain_cache_available() -> bool:
    """True if :func:`cache_verified_chains` can install its cache in this process."""
    return _verify_helper() is not None


def cache_verified_chains(ctx: ssl.SSLContext, entries: int) -> Any:
    """Answer later handshakes of ``ctx`` presenting a chain it has already verified from a cache of
    ``entries`` chains (``tether.proxy._tlsverify`` says exactly what a cached verdict must still
    match); returns the cache (``stats()``: entries, hits, misses), or None where it cannot be
    installed here (every handshake verifies in full then).

    Install before the first handshake with ``ctx``. The cache lives as long as ``ctx`` (it is
    kept on it); one cache is never shared between contexts, so a context with other anchors starts
    empty."""
    installed = getattr(ctx, "_tether_verified_chains", None)
    if installed is not None:
        return installed  # one per context: OpenSSL holds the first one's address
    helper = _verify_helper()
    ptr = _ssl_ctx(ctx)
    if helper is None or ptr is None or _lib is None or entries < 1:
        return None
    fn, get_cb = _function("SSL_CTX_set_cert_verify_callback"), _function("SSL_CTX_get_verify_callback")
    if fn is None or get_cb is None:
        return None
    fn.restype, fn.argtypes = None, [_vp, _vp, _vp]
    get_cb.restype, get_cb.argtypes = _vp, [_vp]
    if get_cb(ptr):
        return None  # a verify callback of the context's own would not be asked for a cached chain
    cache = helper.ChainCache(entries)
    callback, arg = cache.callback()
    ctx._tether_verified_chains = cache  # type: ignore[attr-defined]  # before the callback can use it
    fn(ptr, callback, arg)
    return cache


_legacy_ec: bool | None = None  # None: not tried yet


def legacy_ec_keys() -> bool:
    """Have OpenSSL decode, sign and verify EC keys with its built-in EC_KEY code in this process
    (an engine offering ``EVP_PKEY_meth_find``'s method: ``tether.proxy._tlsverify``); True if that
    is in effect. Done once per process and never undone.

    Only with OpenSSL 3.0, where it was measured (a full mesh handshake for the pair: 16.9M -> 11.8M
    instructions, in-process, callgrind), and never when the default properties ask for FIPS
    (whose provider must then do the work)."""
    global _legacy_ec
    if _legacy_ec is not None:
        return _legacy_ec
    _legacy_ec = False
    if _lib is None or tuple(ssl.OPENSSL_VERSION_INFO[:2]) != (3, 0):
        return False
    helper = _verify_helper()
    if helper is None:
        return False
    signatures: tuple[tuple[str, Any, list[Any]], ...] = (
        ("EVP_default_properties_is_fips_enabled", _int, [_vp]), ("ENGINE_new", _vp, []),
        ("ENGINE_set_id", _int, [_vp, ctypes.c_char_p]), ("ENGINE_set_name", _int, [_vp, ctypes.c_char_p]),
        ("ENGINE_set_pkey_meths", _int, [_vp, _vp]), ("ENGINE_register_pkey_meths", _int, [_vp]),
        ("ENGINE_free", _int, [_vp]),
    )
    lib = SimpleNamespace()
    for name, restype, argtypes in signatures:
        fn = _function(name)
        if fn is None:
            return False
        fn.restype, fn.argtypes = restype, argtypes
        setattr(lib, name, fn)
    callback = helper.ec_engine_callback()
    if not callback or lib.EVP_default_properties_is_fips_enabled(None) != 0:
        return False
    engine = lib.ENGINE_new()
    if not engine:
        return False
    if not (lib.ENGINE_set_id(engine, b"tether-legacy-ec") == 1
            and lib.ENGINE_set_name(engine, b"tether: OpenSSL's built-in EC key method") == 1
            and lib.ENGINE_set_pkey_meths(engine, callback) == 1
            and lib.ENGINE_register_pkey_meths(engine) == 1):
        lib.ENGINE_free(engine)
        _lib.ERR_clear_error()
        return False
    # Kept for the life of the process: OpenSSL's table of registered engines holds no reference
    # of its own (freeing ours would leave it pointing at freed memory).
    _legacy_ec = True
    return True
