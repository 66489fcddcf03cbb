"""The host side of a local mesh's network: a bridge, and per pod a network namespace with a veth.

The bridge lives in the host's namespace with the pod network's first address (the gateway, where
the control plane listens). Each pod gets ``tether-<mesh>-<ns>-<pod>``: a veth whose host end is on
the bridge, ``eth0`` inside with the pod's address, loopback, and a default route via the gateway
(so connections to Service virtual IPs leave the application and meet the pod's iptables rules).
Names resolve in the pod through ``/etc/netns/<netns>/hosts`` and ``resolv.conf``, which
``ip netns exec`` mounts over ``/etc/hosts`` and ``/etc/resolv.conf`` for processes it starts: the
host's own resolver is never touched.

Every operation here is blocking (``ip`` runs in well under a second); the supervisor calls them
off its event loop.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
# Linux limits interface names to 15 bytes.
IFNAME_MAX = 15


class NetworkError(RuntimeError):
    """An ``ip`` command failed; the message has the command and its error."""


def run_ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def link_exists(name: str) -> bool:
    return run_ip("link", "show", "dev", name, check=False).returncode == 0


def netns_list() -> list[str]:
    r = run_ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def addresses_in_use(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    """Interfaces of this host with an address inside ``network`` (another mesh or a real LAN)."""
    r = run_ip("-o", "addr", "show", check=False)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6"):
            try:
                iface = ipaddress.ip_interface(parts[3])
            except ValueError:
                continue
            if iface.network.version == network.version and iface.network.overlaps(network):
                out.append(f"{parts[1]} ({parts[3]})")
    return out


def create_bridge(name: str, gateway: str, prefixlen: int) -> None:
    """The bridge with the gateway address, up; an existing one with that address is kept."""
    if not link_exists(name):
        run_ip("link", "add", name, "type", "bridge")
    current = run_ip("-o", "addr", "show", "dev", name).stdout
    if f" {gateway}/{prefixlen} " not in current:
        run_ip("addr", "add", f"{gateway}/{prefixlen}", "dev", name)
    run_ip("link", "set", name, "up")


def delete_bridge(name: str) -> None:
    if link_exists(name):
        run_ip("link", "del", name)


def veth_name(mesh_id: str, index: int) -> str:
    name = f"tth{mesh_id}{index:x}"
    if len(name) > IFNAME_MAX:
        raise NetworkError(f"interface name {name} is longer than {IFNAME_MAX} bytes")
    return name


def create_pod_netns(netns: str, veth: str, bridge: str, ip: str, prefixlen: int, gateway: str) -> None:
    """A namespace wired to the bridge; any half-made one with the same name is removed first."""
    if netns in netns_list():
        delete_pod_netns(netns)
    run_ip("netns", "add", netns)
    try:
        run_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run_ip("link", "set", veth, "master", bridge)
        run_ip("link", "set", veth, "up")
        run_ip("addr", "add", f"{ip}/{prefixlen}", "dev", "eth0", netns=netns)
        run_ip("link", "set", "eth0", "up", netns=netns)
        run_ip("link", "set", "lo", "up", netns=netns)
        run_ip("route", "add", "default", "via", gateway, netns=netns)
    except NetworkError:
        delete_pod_netns(netns)
        raise


def netns_pids(netns: str) -> list[int]:
    r = run_ip("netns", "pids", netns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def delete_pod_netns(netns: str) -> None:
    """Kill what still runs inside, delete the namespace (its veth goes with it) and its /etc files."""
    for pid in netns_pids(netns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run_ip("netns", "del", netns, check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def write_netns_etc(netns: str, hosts: str, resolv: str) -> None:
    """Write the pod's hosts and resolv.conf in place.

    In place, not by rename: ``ip netns exec`` bind-mounts these files, and a running process keeps
    seeing the inode it was given, so a renamed-in file would never reach it.
    """
    d = NETNS_ETC / netns
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("hosts", hosts), ("resolv.conf", resolv)):
        path = d / name
        if path.exists() and path.read_text() == text:
            continue
        with open(path, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write(text)


def hosts_file(pod: str, pod_ip: str, namespace: str, services: Iterable[tuple[str, str, str]],
               cluster_domain: str) -> str:
    """/etc/hosts for a pod in ``namespace``: itself, and every Service (namespace, name, virtual IP)
    as ``name.ns.svc.<domain>``, ``name.ns.svc`` and ``name.ns``, plus ``name`` in its own namespace."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod_ip}\t{pod}"]
    for ns, name, vip in sorted(services):
        names = [f"{name}.{ns}.svc.{cluster_domain}", f"{name}.{ns}.svc", f"{name}.{ns}"]
        if ns == namespace:
            names.append(name)
        lines.append(f"{vip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str, cluster_domain: str) -> str:
    """Search domains as in a cluster pod; no nameserver is reachable, the hosts file answers."""
    return (f"search {namespace}.svc.{cluster_domain} svc.{cluster_domain} {cluster_domain}\n"
            "nameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n")


def leftover_netns(prefix: str) -> list[str]:
    return [n for n in netns_list() if n.startswith(prefix)]


def delete_leftover_veths(mesh_id: str) -> None:
    """Delete the host ends of this mesh's pod veths still present. Deleting a namespace frees its
    veth only once the kernel has torn the namespace down, which is asynchronous (its last
    processes may still be exiting); deleting the host end removes the pair now."""
    for line in run_ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if name.startswith(f"tth{mesh_id}"):
            run_ip("link", "del", name, check=False)


def leftover_netns_etc(prefix: str) -> list[Path]:
    return sorted(NETNS_ETC.glob(prefix + "*")) if NETNS_ETC.is_dir() else []


def netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]
