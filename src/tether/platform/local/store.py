"""The local store: a directory of YAML resources plus the local workload registry, watched by polling.

Any file under the directory whose name ends in .yaml, .yml or .json is read (multi-document, any
name; names starting with "." are skipped, so editors' and ``apply``'s temporary files never count).
A file is re-read when its size, mtime or inode changes (checked every ``poll_interval``, 0.25 s by
default, so an edit is served within a second). A file with any invalid document is refused whole:
the error is logged, counted in ``store_invalid_loads_total`` and kept for ``source_errors()``, and
the resources that file last had when it was valid stay in force. Deleting a file deletes its objects.

Workloads come from the registry (``<state-dir>/workloads``) as ``Workload`` objects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tether.control.store import KindStates
from tether.core.resources import KINDS, Loaded, Resource, load_text
from tether.core.resources.core import Workload as WorkloadResource
from tether.core.resources.events import Key, KindState, ResourceEvent, SourceError, apply_event, diff
from tether.platform.local.workloads import Workload, WorkloadError, WorkloadRegistry
from tether.runtime.watch import Watched

log = logging.getLogger("tether.store")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_POLL_INTERVAL = 0.25
DEFAULT_QUEUE_LIMIT = 1000


def resource_files(root: Path) -> list[Path]:
    """The files the store reads under ``root``, in a stable order."""
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.endswith(SUFFIXES):
                out.append(Path(dirpath) / name)
    return sorted(out)


def _read_workload(path: Path) -> Workload:
    """One registry file, parsed with libyaml when present (thousands of workloads load in seconds)."""
    doc = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    if not isinstance(doc, dict):
        raise WorkloadError(f"{path}: not a YAML mapping")
    return Workload.from_dict(doc, str(path))


def workload_resource(w: Workload) -> WorkloadResource:
    """A registry entry as the mesh's Workload object."""
    return WorkloadResource.model_validate(
        {
            "apiVersion": "workload.tether.io/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": w.name, "namespace": w.namespace, "labels": dict(w.labels),
                         **({"annotations": dict(w.annotations)} if w.annotations else {})},
            "spec": {
                "serviceAccount": w.service_account,
                "addresses": list(w.addresses),
                "ports": [{"port": p.port, **({"name": p.name} if p.name else {})} for p in w.ports],
            },
        }
    )


@dataclass
class _File:
    signature: tuple[int, int, int]
    good: tuple[Loaded, ...] = ()
    errors: tuple[str, ...] = ()


@dataclass
class StoreMetrics:
    loads_total: int = 0
    invalid_loads_total: int = 0
    conflicts: int = 0
    scans_total: int = 0
    events_total: dict[str, int] = field(default_factory=dict)


class LocalStore(KindStates):
    """A :class:`tether.control.store.Store` over a directory and the workload registry."""

    def __init__(
        self,
        resources_dir: str | os.PathLike[str],
        state_dir: str | os.PathLike[str] | None = None,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
    ) -> None:
        self.root = Path(resources_dir)
        self.registry = WorkloadRegistry(state_dir) if state_dir is not None else None
        self.poll_interval = poll_interval
        self.metrics = StoreMetrics()
        self._files: dict[Path, _File] = {}
        self._registry_errors: dict[str, tuple[str, ...]] = {}
        # namespace directory -> file name -> (signature, the workload or None when invalid)
        self._workload_cache: dict[str, dict[str, tuple[tuple[int, int, int], Resource | None]]] = {}
        self._registry_changed = True
        self._ns_dirs: dict[str, int] = {}
        self._conflicts: dict[str, tuple[str, ...]] = {}
        self._kinds: dict[str, Watched[KindState, ResourceEvent]] = {
            kind: Watched({}, apply_event, queue_limit=queue_limit) for kind in KINDS
        }
        self.notices: list[str] = []
        self.scan()

    # --- the Store interface (list, get, watch, version: KindStates) ------------------------------

    def source_errors(self) -> Sequence[SourceError]:
        out = [SourceError(str(p), f.errors) for p, f in sorted(self._files.items()) if f.errors]
        out += [SourceError(s, e) for s, e in sorted(self._conflicts.items())]
        out += [SourceError(s, e) for s, e in sorted(self._registry_errors.items())]
        return out

    # --- reading ---------------------------------------------------------------------------------

    def _read_files(self) -> bool:
        changed = False
        seen: set[Path] = set()
        for path in resource_files(self.root) if self.root.exists() else []:
            seen.add(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
            entry = self._files.get(path)
            if entry is not None and entry.signature == sig:
                continue
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                errors: tuple[str, ...] = (f"{path}: cannot read: {e}",)
                result = None
            else:
                result = load_text(text, str(path))
                errors = tuple(str(e) for e in result.errors)
            self.metrics.loads_total += 1
            if entry is None:
                entry = self._files[path] = _File(sig)
            entry.signature = sig
            if errors:
                self.metrics.invalid_loads_total += 1
                kept = len(entry.good)
                for line in errors:
                    log.error("%s (keeping the file's last good version: %d objects)", line, kept)
                entry.errors = errors
            else:
                assert result is not None
                entry.good = result.loaded
                entry.errors = ()
                for item in result.loaded:
                    for n in item.notices:
                        log.warning("notice: %s", n)
                        self.notices.append(n)
            changed = True
        for gone in set(self._files) - seen:
            del self._files[gone]
            changed = True
        return changed

    def _read_registry(self) -> dict[Key, Resource]:
        """Every registered workload, re-reading only namespaces whose directory changed.

        The registry writes atomically (a rename into ``workloads/<ns>/``), which changes the namespace
        directory's mtime; an unchanged directory is not listed again, so an idle store with thousands
        of workloads costs one stat per namespace per poll. A file is parsed again only when its
        signature (size, mtime, inode) changed.
        """
        reg = self.registry
        if reg is None or not reg.workloads_dir.is_dir():
            self._registry_changed = bool(self._workload_cache)
            self._workload_cache.clear()
            self._ns_dirs.clear()
            self._registry_errors = {}
            return {}
        present: set[str] = set()
        with os.scandir(reg.workloads_dir) as it:
            ns_entries = sorted((e for e in it if e.is_dir()), key=lambda e: e.name)
        for entry in ns_entries:
            present.add(entry.path)
            try:
                mtime = entry.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._ns_dirs.get(entry.path) == mtime:
                continue
            # File times tick coarsely (a few ms): a directory changed within the last two seconds may
            # change again without its mtime moving, so it is listed again until it has been quiet.
            quiet = time.time_ns() - mtime > 2_000_000_000
            self._ns_dirs[entry.path] = mtime if quiet else -1
            self._rescan_namespace(entry.path)
        for gone in set(self._ns_dirs) - present:
            del self._ns_dirs[gone]
            self._rescan_namespace(gone)
        out: dict[Key, Resource] = {}
        for files in self._workload_cache.values():
            for _sig, res in files.values():
                if res is not None:
                    out[res.key] = res
        return out

    def _rescan_namespace(self, ns_dir: str) -> None:
        old = self._workload_cache.get(ns_dir, {})
        new: dict[str, tuple[tuple[int, int, int], Resource | None]] = {}
        try:
            with os.scandir(ns_dir) as it:
                entries = [e for e in it if e.name.endswith(".yaml") and not e.name.startswith(".")]
        except FileNotFoundError:
            entries = []
        for e in entries:
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns, st.st_ino)
            cached = old.get(e.name)
            if cached is not None and cached[0] == sig:
                new[e.name] = cached
                continue
            self._registry_changed = True
            try:
                res: Resource | None = workload_resource(_read_workload(Path(e.path)))
                self._registry_errors.pop(e.path, None)
            except (WorkloadError, ValueError, OSError, yaml.YAMLError) as err:
                res = None
                self._registry_errors[e.path] = (str(err),)
            new[e.name] = (sig, res)
        for name in old.keys() - new.keys():
            self._registry_changed = True
            self._registry_errors.pop(os.path.join(ns_dir, name), None)
        if new:
            self._workload_cache[ns_dir] = new
        else:
            self._workload_cache.pop(ns_dir, None)

    def scan(self) -> bool:
        """Re-read what changed and publish the differences; True when any kind changed."""
        self.metrics.scans_total += 1
        files_changed = self._read_files()
        self._registry_changed = False
        workloads = self._read_registry()
        if not files_changed and not self._registry_changed:
            return False  # nothing on disk changed: the published view stands
        view: dict[str, dict[Key, Resource]] = {kind: {} for kind in KINDS}
        owner: dict[tuple[str, str, str], str] = {}
        conflicts: dict[str, list[str]] = {}
        for path, entry in sorted(self._files.items()):
            for item in entry.good:
                r = item.resource
                ident = (r.KIND, *r.key)
                if ident in owner:
                    conflicts.setdefault(str(path), []).append(
                        f"{path}: document {item.document} ({r.ref()}): also defined in {owner[ident]}; "
                        "that definition is used"
                    )
                    continue
                owner[ident] = str(path)
                view[r.KIND][r.key] = r
        view["Workload"].update(workloads)
        self._conflicts = {k: tuple(v) for k, v in conflicts.items()}
        self.metrics.conflicts = sum(len(v) for v in conflicts.values())
        any_change = False
        for kind, watched in self._kinds.items():
            events = diff(watched.state, view[kind])
            for ev in events:
                watched.change(ev)
                self.metrics.events_total[ev.type] = self.metrics.events_total.get(ev.type, 0) + 1
            any_change = any_change or bool(events)
        return any_change or files_changed

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Poll until ``stop`` is set (or forever)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.poll_interval):
                    await stop.wait()
            except TimeoutError:
                pass
            if not stop.is_set():
                try:
                    self.scan()
                except Exception:  # a store that stops polling would silently serve stale state
                    log.exception("store scan failed; retrying")

    def close(self) -> None:
        for w in self._kinds.values():
            w.close()

    def metrics_text(self) -> str:
        m = self.metrics
        errors = self.source_errors()
        lines = [
            "# HELP store_loads_total Resource files read (each change of a file is one load).",
            "# TYPE store_loads_total counter",
            f"store_loads_total {m.loads_total}",
            "# HELP store_invalid_loads_total Loads refused because the file had an invalid document.",
            "# TYPE store_invalid_loads_total counter",
            f"store_invalid_loads_total {m.invalid_loads_total}",
            "# HELP store_invalid_sources Sources currently refused (their last good version is served).",
            "# TYPE store_invalid_sources gauge",
            f"store_invalid_sources {len(errors)}",
            "# HELP store_resources Objects in the store by kind.",
            "# TYPE store_resources gauge",
        ]
        for kind, w in sorted(self._kinds.items()):
            lines.append(f'store_resources{{kind="{kind}"}} {len(w.state)}')
        lines += ["# HELP store_events_total Watch events published.", "# TYPE store_events_total counter"]
        for t, n in sorted(m.events_total.items()):
            lines.append(f'store_events_total{{type="{t}"}} {n}')
        return "\n".join(lines) + "\n"
