"""Asking running processes over HTTP: a proxy's or a controller's admin server (bounded in time)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

_BUILD_INFO = re.compile(r'^proxy_build_info\{([^}]*)\}', re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ProbeError(Exception):
    """The address could not be reached or answered badly; the message says which and why."""


def get(addr: str, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET http://addr/path``: (status, body up to 4 MiB); ProbeError when nothing answers."""
    url = f"http://{addr}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read(4 << 20)
    except urllib.error.HTTPError as e:
        return int(e.code), e.read(4 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ProbeError(f"{url}: {getattr(e, 'reason', e)}") from None


def proxy_version(admin_addr: str, timeout: float) -> str:
    """The version label of the proxy's ``proxy_build_info`` metric."""
    status, body = get(admin_addr, "/metrics", timeout)
    if status != 200:
        raise ProbeError(f"http://{admin_addr}/metrics: HTTP {status}")
    m = _BUILD_INFO.search(body.decode(errors="replace"))
    if m is None:
        raise ProbeError(f"http://{admin_addr}/metrics has no proxy_build_info")
    labels = dict(_LABEL.findall(m.group(1)))
    if not labels.get("version"):
        raise ProbeError(f"http://{admin_addr}/metrics: proxy_build_info has no version")
    return labels["version"]
