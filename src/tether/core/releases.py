"""tether releases as a pod's ``linkerd.io/proxy-version`` names them, and the release that first
did what older proxies cannot (pure).

The injector writes the proxy's version into that annotation. tether's versions are ``X.Y.Z`` (a
leading ``v`` and a ``-suffix``/``+build`` are allowed); Linkerd's proxies carry their product's
version (``stable-2.14.10``, ``edge-24.11.8``), which is no tether release: they are never "before"
anything here, since every Linkerd proxy does what these releases added.
"""

from __future__ import annotations

import re

# HTTP/1 carried between proxies over HTTP/2 with l5d-orig-proto: a receiving proxy of an older
# release passes the HTTP/2 on to an HTTP/1 application.
FIRST_DOWNGRADING_H2 = (0, 2, 0)
# TLS to the control plane (identity, destination, policy): an older proxy speaks plaintext gRPC to it.
FIRST_CONTROL_PLANE_TLS = (0, 2, 0)
# Linkerd's transport header (protobuf, with a session protocol): an older proxy reads JSON, and only
# opaque streams after it.
FIRST_PROTOBUF_TRANSPORT_HEADER = (0, 2, 0)

_RELEASE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:[-+].*)?")


def tether_release(version: str) -> tuple[int, int, int] | None:
    """The release a proxy version names, or None for anything else (a Linkerd version, a digest)."""
    m = _RELEASE.fullmatch(version.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def before(version: str, first: tuple[int, int, int]) -> bool:
    """Whether ``version`` names a tether release older than ``first``."""
    release = tether_release(version)
    return release is not None and release < first
