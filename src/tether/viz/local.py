"""viz on the local mesh: its Prometheus as an add-on child of the mesh's supervisor.

``install`` writes the Prometheus config (file-based discovery of ``scrape/*.json``, which the
supervisor keeps in step with the pods), the alert rules, and ``addons/prometheus.json``; the
supervisor starts Prometheus, restarts it if it exits, and stops it on ``tether down``.
``uninstall`` removes the add-on (the supervisor stops it) and viz's files.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.platform.local.layout import Layout, write_json
from tether.viz import alerts, promconfig
from tether.viz.promapi import Prometheus

ADDON = "prometheus"


class VizError(Exception):
    """viz cannot do what was asked on this mesh; the message names the reason and the fix."""


@dataclass(frozen=True)
class Installed:
    url: str
    config: Path
    data: Path
    pid: int | None


def viz_dir(layout: Layout) -> Path:
    return layout.root / "viz"


def settings_path(layout: Layout) -> Path:
    return viz_dir(layout) / "viz.json"


def read_settings(layout: Layout) -> dict[str, Any] | None:
    try:
        doc = json.loads(settings_path(layout).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _addon_pid(layout: Layout) -> int | None:
    for a in layout.read_status().get("addons", []):
        if a.get("name") == ADDON and a.get("pid"):
            return int(a["pid"])
    return None


def install(layout: Layout, *, port: int = 0, scrape_interval: str = promconfig.DEFAULT_SCRAPE_INTERVAL,
            retention: str = promconfig.RETENTION, binary: str = "prometheus", timeout: float = 60.0,
            controller_namespace: str | None = None) -> Installed:
    """Start (or reconfigure) the mesh's Prometheus and wait until it answers /-/ready."""
    if not layout.settings_path.exists():
        raise VizError(f"no local mesh in {layout.root} (--state-dir): run `tether up` first")
    if layout.supervisor_pid() is None:
        raise VizError(f"the local mesh in {layout.root} is not running (--state-dir): run `tether up`")
    exe = shutil.which(binary)
    if exe is None:
        raise VizError(f"{binary}: not found on PATH (Debian: apt-get install prometheus; or --prometheus-url "
                       "with an external one)")
    settings = layout.read_settings()
    old = read_settings(layout) or {}
    port = port or int(old.get("port") or 0) or free_port()
    vdir = viz_dir(layout)
    data = vdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{port}"
    rules = vdir / "rules.yml"
    rule_doc = alerts.prometheus_rule(controller_namespace or settings.controller_namespace)
    rules.write_text(promconfig.dump({"groups": rule_doc["spec"]["groups"]}))
    config = vdir / "prometheus.yml"
    config.write_text(promconfig.dump(promconfig.local_config(layout.scrape_dir, scrape_interval, [str(rules)],
                                                              self_addr=addr)))
    argv = [exe, f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--storage.tsdb.retention.time={retention}", f"--web.listen-address={addr}",
            "--web.enable-lifecycle", "--log.level=warn"]
    write_json(settings_path(layout), {"port": port, "url": f"http://{addr}", "scrapeInterval": scrape_interval,
                                       "retention": retention})
    running_same = any(a.get("name") == ADDON and a.get("argv") == argv and a.get("pid")
                       for a in layout.read_status().get("addons", []))
    write_json(layout.addons_dir / f"{ADDON}.json", {"argv": argv, "grace": 10})
    prom = Prometheus(f"http://{addr}", timeout=1.0)
    if running_same and not prom.reload():
        raise VizError(f"Prometheus at {addr} did not reload its new configuration (log "
                       f"{layout.logs_dir / 'addons' / f'{ADDON}.log'})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _addon_pid(layout)
        status = layout.read_status()
        same = any(a.get("name") == ADDON and a.get("argv") == argv for a in status.get("addons", []))
        if pid is not None and same and prom.ready():
            return Installed(f"http://{addr}", config, data, pid)
        if layout.supervisor_pid() is None:
            raise VizError(f"the local mesh in {layout.root} stopped while Prometheus was starting")
        time.sleep(0.1)
    log = layout.logs_dir / "addons" / f"{ADDON}.log"
    tail = ""
    try:
        tail = log.read_text().strip().splitlines()[-1]
    except (OSError, IndexError):
        pass
    raise VizError(f"Prometheus did not get ready on {addr} within {timeout:g}s "
                   f"(log {log}{': ' + tail if tail else ''})")


def use_external(layout: Layout, url: str) -> None:
    """Point viz at an external Prometheus: stop the mesh's own if it runs; the viz commands use ``url``."""
    if not layout.settings_path.exists():
        raise VizError(f"no local mesh in {layout.root} (--state-dir): run `tether up` first")
    if (layout.addons_dir / f"{ADDON}.json").exists():
        uninstall(layout)
    write_json(settings_path(layout), {"url": url, "external": True})


def uninstall(layout: Layout, timeout: float = 30.0) -> bool:
    """Stop the mesh's Prometheus and remove viz's files; False when there was nothing to remove."""
    addon = layout.addons_dir / f"{ADDON}.json"
    had = addon.exists() or viz_dir(layout).exists()
    addon.unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while layout.supervisor_pid() is not None and _addon_pid(layout) is not None:
        if time.monotonic() > deadline:
            raise VizError(f"Prometheus (pid {_addon_pid(layout)}) did not stop within {timeout:g}s")
        time.sleep(0.1)
    shutil.rmtree(viz_dir(layout), ignore_errors=True)
    return had


def local_url(layout: Layout) -> str | None:
    doc = read_settings(layout)
    return str(doc["url"]) if doc and doc.get("url") else None


def pod_counts(layout: Layout, rtype: str) -> dict[tuple[str, str], tuple[int, int]] | None:
    """(namespace, name) -> (meshed pods with a ready proxy, running pods), from the supervisor's
    status; None when there is no running local mesh."""
    status = layout.read_status()
    if not status.get("pods") and not status.get("components"):
        return None
    out: dict[tuple[str, str], list[int]] = {}
    for p in status.get("pods", []):
        if p.get("phase") not in ("Running", "WaitingForProxy"):
            continue
        ns = str(p.get("namespace", ""))
        name = {"deployment": p.get("workload"), "pod": p.get("name"), "namespace": ns}.get(rtype)
        if name is None:
            continue
        c = out.setdefault((ns, str(name)), [0, 0])
        c[1] += 1
        if p.get("meshed") and p.get("proxyReady"):
            c[0] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def profiles(layout: Layout) -> list[tuple[str, str, list[str]]]:
    """(service, namespace, route names) of the ServiceProfiles in the mesh's store."""
    from tether.platform.local.store import LocalStore

    if not layout.resources_dir.is_dir():
        return []
    out = []
    for sp in LocalStore(layout.resources_dir).list("ServiceProfile"):
        parts = sp.name.split(".")
        if len(parts) >= 2:
            spec = getattr(sp, "spec", None)
            out.append((parts[0], parts[1], [r.name for r in getattr(spec, "routes", [])]))
    return out
