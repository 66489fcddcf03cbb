"""Start one container's process the way a container runtime would, inside a pod's network namespace.

Run as ``unshare --mount --propagation private python -m tether.testing.podexec SPEC.json`` (the
runner in ``tether.testing.kubelet`` does). SPEC names the volume mounts (host directory -> path
in the container), the /etc/hosts file, the user and group, the environment and the argv. In the
private mount namespace each mount path is made (a tmpfs covers the first directory that would have
to be created on the host, so the host's file system is never written) and bind-mounted, /etc/hosts
is replaced, then the process drops to its user and execs with exactly the container's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"podexec: mount {' '.join(args)}: {r.stderr.strip()}")


def _make_mount_point(path: str, writable: set[Path]) -> None:
    """Make ``path`` exist in this mount namespace without touching the host's directories: inside a
    volume mounted before (the runtime makes nested mount points there too) or on a tmpfs."""
    target = Path(os.path.realpath(path))
    if target.is_dir():
        return
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not any(parent == w or w in parent.parents for w in writable):
        if str(parent) == "/":
            raise SystemExit(f"podexec: mount path {path}: its top directory does not exist on this host")
        _mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(parent))
        writable.add(parent)
    target.mkdir(parents=True, exist_ok=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tether.testing.podexec SPEC.json")
    spec = json.loads(Path(sys.argv[1]).read_text())
    writable: set[Path] = set()
    # Shallow paths first, as container runtimes order mounts, so a nested mount lands inside its parent.
    for host, container in sorted(spec["mounts"], key=lambda m: len(Path(os.path.realpath(m[1])).parts)):
        _make_mount_point(container, writable)
        target = os.path.realpath(container)
        _mount("--bind", host, target)
        writable.add(Path(target))
    if spec.get("hosts"):
        _mount("--bind", spec["hosts"], "/etc/hosts")
    uid, gid = int(spec["uid"]), int(spec["gid"])
    argv = list(spec["argv"])
    if uid or gid:
        # A non-root user keeps the capabilities the container adds only through file capabilities on
        # the binary that needs them (an image sets them on iptables); here they are ambient instead.
        caps = ",".join(f"+{c.lower()}" for c in spec.get("caps", ()))
        drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if caps:
            drop += [f"--inh-caps={caps}", f"--ambient-caps={caps}"]
        argv = [*drop, "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **spec["env"]}
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
