"""Request authorities as the mesh names destinations: ``host:port``, lower case, no trailing dot."""

from __future__ import annotations


def normalize_authority(authority: str | bytes, default_port: int | None = None) -> str:
    """``Host:Port`` to ``host:port`` (lower case, no trailing dot); ValueError if malformed."""
    text = authority.decode("ascii", "replace") if isinstance(authority, bytes) else authority
    text = text.strip()
    port: str | None
    if text.startswith("["):  # [v6] or [v6]:port
        end = text.find("]")
        host, rest = text[: end + 1], text[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            raise ValueError(f"{text!r} is not host:port")
        port = rest[1:] or None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, None
        elif not port.isdigit() or ":" in host:
            raise ValueError(f"{text!r} is not host:port")
    if port is None:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (expected host:port)")
        port = str(default_port)
    host = host.lower().rstrip(".")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{text!r} has no valid host")
    p = int(port)
    if not 0 < p <= 65535:
        raise ValueError(f"{text!r}: port {p} is out of range 1-65535")
    return f"{host}:{p}"
