"""Compiled hot-path modules (mypyc) and the guard that keeps them honest.

The proxy's per-request code (HTTP/1 codec, layers, balancer, metrics) is plain typed Python. For
speed, ``scripts/build-native`` compiles the modules listed in :data:`NATIVE_MODULES` with mypyc
into extension modules placed next to their sources, and writes a stamp with the digest of the
sources it compiled. The same source runs either way; compiled, it costs less CPU per request.

An extension module wins over its ``.py`` at import, so an edited source would silently run the old
compiled code. :func:`install_guard` (called by ``tether/__init__.py``) prevents that: when the
stamp is missing, or any listed source no longer matches it, or ``TETHER_PURE_PYTHON=1`` is set,
every listed module is imported from its source instead (all of them: compiled modules call each
other directly, so a mix of old and new code is not coherent).
"""

from __future__ import annotations

import binascii
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

# The hot path, in dependency order. Adding a module here makes the build compile it.
NATIVE_MODULES: tuple[str, ...] = (
    "tether.core.http.h1",
    "tether.core.http.authority",
    "tether.core.http.classify",
    "tether.core.http.hpack",
    "tether.core.http.h2frames",
    "tether.core.http.h2headers",
    "tether.core.http.h2proto",
    "tether.core.http.reset_budget",
    "tether.core.routing.ewma",
    "tether.core.routing.failure_accrual",
    "tether.core.routing.p2c",
    "tether.proxy.counters",
    "tether.core.tracecontext",
    "tether.proxy.http.body",
    "tether.proxy.http.message",
    "tether.proxy.http.h1client",
    "tether.proxy.http.h1server",
    "tether.proxy.tlstransport",
    "tether.proxy.http.h2codec",
    "tether.proxy.http.h2conn",
    "tether.proxy.http.h2server",
    "tether.proxy.http.h2client",
    "tether.proxy.layers.rescue",
    "tether.proxy.layers.connect_retry",
    "tether.proxy.layers.timeout",
    "tether.proxy.layers.metrics",
    "tether.proxy.layers.tap",
    "tether.proxy.layers.trace",
    "tether.proxy.balancer",
    "tether.proxy.endpoint",
    "tether.proxy.cache",
    "tether.proxy.outbound.router",
    "tether.proxy.layers.routes",
    "tether.proxy.layers.policy_routes",
    "tether.core.routing.profile",
)

# Hand-written C extensions built beside them (module: source under src/). They have no Python
# source to fall back on: their users import them only when :data:`state` is ``compiled`` (the
# digest covers their sources too) and keep a portable path otherwise.
C_EXTENSIONS: dict[str, str] = {
    "tether.core.http._h1scan": "tether/core/http/_h1scan.c",
    "tether.proxy._tlsio": "tether/proxy/_tlsio.c",
    "tether.proxy._tlsverify": "tether/proxy/_tlsverify.c",
}

PURE_ENV = "TETHER_PURE_PYTHON"
# The directory holding the tether package. os.path, not pathlib: pathlib brings fnmatch, ntpath,
# urllib.parse and ipaddress (~0.4 MiB traced) into every proxy for these few paths.
SRC_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_STAMP_NAME = ".native.json"

# How this process imported the listed modules: "compiled", or "pure: <why>".
state = "pure: not built"


def __getattr__(name: str) -> Path:
    if name == "STAMP":  # the build's stamp file, for the build script
        from pathlib import Path

        return Path(SRC_ROOT, "tether", _STAMP_NAME)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _source_file(module: str, root: str | os.PathLike[str]) -> str:
    return os.path.join(root, *module.split(".")) + ".py"


def source_path(module: str, root: str | os.PathLike[str] = SRC_ROOT) -> Path:
    from pathlib import Path

    return Path(_source_file(module, root))


def digest(modules: Sequence[str] = NATIVE_MODULES, root: str | os.PathLike[str] = SRC_ROOT,
           c_extensions: Mapping[str, str] = C_EXTENSIONS) -> str:
    """A digest of what the compiled modules were built from: the sources, their list, the Python ABI.

    CRC-32 and length per source: this detects edits, it is not a security boundary (whoever can
    edit a source can edit the extension next to it). hashlib would load OpenSSL (~3 MB of RSS)
    into every tether process just for this."""
    # The interpreter by its ABI, not its full version: extension modules built for CPython 3.11 load
    # in any 3.11.x (CPython keeps the ABI within a minor version). A process may run another 3.11
    # build than the one that compiled them (the proxy as uid 2102 in local mode, where the build's
    # interpreter is out of that user's reach: it then runs the system's).
    parts = [f"{sys.implementation.cache_tag}{sys.abiflags}-{getattr(sys.implementation, '_multiarch', '')}"]
    for module in modules:
        with open(_source_file(module, root), "rb") as f:
            data = f.read()
        parts.append(f"{module}:{len(data)}:{binascii.crc32(data):08x}")
    for module, rel in c_extensions.items():
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        parts.append(f"{module}:{len(data)}:{binascii.crc32(data):08x}")
    text = "\n".join(parts).encode()
    return f"{binascii.crc32(text):08x}{len(text):x}{_adler32(text):08x}"


def _adler32(data: bytes) -> int:
    """zlib's Adler-32, over the few KB of the digest's text: the zlib module (and libz with it)
    would stay loaded in every tether process for this one call (binascii has the CRC-32)."""
    a, b = 1, 0
    for byte in data:
        a = (a + byte) % 65521
        b = (b + a) % 65521
    return (b << 16) | a


def write_stamp(modules: Sequence[str] = NATIVE_MODULES, root: str | os.PathLike[str] = SRC_ROOT,
                c_extensions: Mapping[str, str] = C_EXTENSIONS) -> None:
    """Record that the extensions in ``root`` were built from the sources as they are now."""
    doc = {"digest": digest(modules, root, c_extensions), "modules": list(modules)}
    with open(os.path.join(root, "tether", _STAMP_NAME), "w") as f:
        f.write(json.dumps(doc) + "\n")


def check(modules: Sequence[str] = NATIVE_MODULES, root: str | os.PathLike[str] = SRC_ROOT,
          c_extensions: Mapping[str, str] = C_EXTENSIONS) -> str:
    """``compiled`` when the built extensions match the sources, else ``pure: <why>``."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return f"pure: {PURE_ENV} is set"
    try:
        with open(os.path.join(root, "tether", _STAMP_NAME)) as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return "pure: not built (run scripts/build-native)"
    if not isinstance(doc, dict) or doc.get("modules") != list(modules):
        return "pure: built for another module list (run scripts/build-native)"
    try:
        current = digest(modules, root, c_extensions)
    except OSError as e:
        return f"pure: cannot read sources ({e})"
    if current != doc.get("digest"):
        return "pure: sources changed since the build (run scripts/build-native)"
    return "compiled"


class _SourceFinder:
    """Imports the listed modules from their ``.py`` even when an extension module sits beside it.

    A meta path finder by protocol (``find_spec``), not a subclass of ``importlib.abc.MetaPathFinder``:
    importing ``importlib.abc`` pulls in ``importlib.resources`` and with it tempfile, shutil, bz2
    and lzma, ~1 MiB of RSS in every tether process, the proxy included."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        src = source_path(fullname)
        if not src.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, src)


def install_guard() -> None:
    """Decide once per process whether the compiled modules may load (see the module doc)."""
    global state
    state = check()
    if state != "compiled" and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(NATIVE_MODULES))


def loaded_compiled() -> list[str]:
    """The listed modules this process actually runs compiled (imported so far)."""
    out = []
    for name in NATIVE_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and not str(getattr(mod, "__file__", "")).endswith(".py"):
            out.append(name)
    return out
