"""The C heap: glibc's malloc tuned for the proxy, and its free pages given back after bursts.

Only glibc is touched (through ctypes); with another C library every function here does nothing and
returns False.
"""

from __future__ import annotations

from typing import Any

# glibc's mallopt parameters (malloc.h) and the values the proxy sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 20
_TRIM_THRESHOLD = 2 << 20


def _glibc() -> Any:
    """The C library through ctypes when it is glibc (mallopt, malloc_trim), else None."""
    global _libc
    if _libc is None:
        import os

        # os.confstr, not platform.libc_ver(): the platform module costs memory for this one answer.
        try:
            glibc = os.confstr("CS_GNU_LIBC_VERSION")
        except (ValueError, OSError):
            glibc = None
        if not glibc:
            _libc = False
            return None
        import ctypes

        try:
            _libc = ctypes.CDLL(None)
        except OSError:
            _libc = False
    return _libc or None


_libc: Any = None  # None: not looked up yet; False: not glibc


def trim_malloc() -> bool:
    """Return the heap's free pages to the kernel (glibc's malloc_trim); True when it released any."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


def tune_malloc() -> bool:
    """Keep glibc from mapping and unmapping memory for every TLS record read.

    uvloop's TLS transport reads with a 256 KiB buffer that is shrunk right after: above glibc's
    mmap threshold (128 KiB until a large block is freed) that costs an mmap, an mremap and a
    munmap per read, and with a heap allocation the heap's top is trimmed (brk) instead. strace on
    an inbound mTLS proxy showed one of each per request; with a 1 MiB mmap threshold and a 2 MiB
    trim threshold there are none. True when set (glibc only; elsewhere nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except AttributeError:
        return False
