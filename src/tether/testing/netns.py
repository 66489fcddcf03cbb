"""Local "pods": network namespaces joined by a bridge, for tests with real iptables rules.

A :class:`PodNetwork` makes one namespace holding a bridge and, per pod, a namespace with a
veth into that bridge and an address in 198.18.0.0/24 (the RFC 2544 benchmarking range, so no
real network is ever addressed). Everything is removed on close.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

SUBNET_PREFIX = "198.18.0"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def available() -> str | None:
    """None when namespaces can be made here, else the reason they can't."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"tether-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Pod:
    name: str
    ns: str
    ip: str

    def exec(self, *args: str, timeout: float = 30, check: bool = True,
             user: int | None = None) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        r = subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
        return r


class PodNetwork:
    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.bridge_ns = f"tether-{self.id}-br"
        self.pods: list[Pod] = []
        _ip("netns", "add", self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _ip("link", "set", "br0", "up", ns=self.bridge_ns)
        _ip("link", "set", "lo", "up", ns=self.bridge_ns)

    def add_pod(self, name: str) -> Pod:
        n = len(self.pods) + 2
        ns = f"tether-{self.id}-{name}"
        ip = f"{SUBNET_PREFIX}.{n}"
        _ip("netns", "add", ns)
        host_if = f"v{self.id[:4]}{n}"
        _ip("link", "add", host_if, "netns", self.bridge_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", host_if, "master", "br0", ns=self.bridge_ns)
        _ip("link", "set", host_if, "up", ns=self.bridge_ns)
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        pod = Pod(name, ns, ip)
        self.pods.append(pod)
        return pod

    def close(self) -> None:
        for pod in self.pods:
            subprocess.run(["ip", "netns", "pids", pod.ns], capture_output=True)
            pids = subprocess.run(["ip", "netns", "pids", pod.ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-9", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", pod.ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.bridge_ns], capture_output=True)
        self.pods.clear()
