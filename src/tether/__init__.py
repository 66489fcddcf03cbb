"""tether: a Linkerd-compatible service mesh in Python."""

from tether import native as _native

__version__ = "0.2.0"

# Compiled hot-path modules load only when they match their sources (see tether.native).
_native.install_guard()
