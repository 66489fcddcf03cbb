"""tether's proxy and Linkerd's (linkerd2-proxy) side by side on the meshed two-hop path, both as pod
sidecars in one local mesh (`tether up`): the same control plane, the same iptables interception,
the same fortio load from inside a client pod, mTLS between the two proxies of each pair.

    sudo .venv/bin/python bench/parity.py --linkerd2-proxy /path/to/linkerd2-proxy

tether does not build linkerd2-proxy: bring a binary built from Linkerd's sources (for the figures in
docs/notes, `cargo build --release --package=linkerd2-proxy` at the upstream head). It is copied into
the run's work directory so that the proxies' uid (2102) can run it.

Targets (nginx's one hop on loopback stays the baseline of the ratios, as in the other benchmarks):

- pods-direct: fortio in the client pod straight to the server pod's application (no proxy): what
  the pods' network costs;
- tether-pods: client pod -> its tether proxy -> mTLS -> the server pod's tether proxy -> fortio server;
- linkerd2-proxy-pods: the same with linkerd2-proxy as both pods' sidecar (annotation
  local.tether.io/linkerd2-proxy).

"proxy CPU us/req" and the RSS rows are the pair's two proxies together. Each pair's server is its
own fortio echo server in its own pod. The held-connections row: 1,000 client connections opened
from inside the client pod, one request each, kept open.

Under the table, new connections: each pair's client pod also calls a second server pod whose port is
opaque (config.linkerd.io/opaque-ports on the pod and its Service), one request per connection (fortio
-keepalive=false), so every client connection is a new mTLS connection between the two proxies; the
figure is connections per CPU-second of both proxies, each proxy as deployed (tether's resume TLS
sessions with a peer they have verified; Linkerd's do a full handshake every time).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import harness as h
import http1

from tether.platform.local import network

TARGETS = ("nginx", "pods-direct", "tether-pods", "linkerd2-proxy-pods")
PAIRS = {"pods-direct": "d", "tether-pods": "t", "linkerd2-proxy-pods": "l"}
ANNOTATION = "local.tether.io/linkerd2-proxy"
_state: dict[str, Any] = {"l2p": None, "mesh": None, "fortio": None}
# name -> (the client pod's netns command, the opaque server's URL, the pods whose proxies are measured)
_new_conn_targets: dict[str, tuple[list[str], str, list[str]]] = {}
NEW_CONN_SECONDS = 5.0
NEW_CONN_CONNECTIONS = 16

# Opens n connections from inside a pod, one request on each, holds them until stdin closes.
_HOLD = r"""
import socket, sys
host, port, n, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
socks = []
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            data += chunk
        socks.append(s)
    except OSError:
        break
print(len(socks), flush=True)
sys.stdin.read()
"""


class LocalMesh:
    """One `tether up` with its own bridge and networks, torn down at the end of the run."""

    def __init__(self) -> None:
        # Not under the run's work directory: that goes before `tether down` runs.
        self.state = Path(tempfile.mkdtemp(prefix="tether-parity-")) / "state"
        self.bridge = f"tp{uuid.uuid4().hex[:8]}"
        self.pods, self.services = _free_networks()
        self.tether("up", "--bridge", self.bridge, "--pod-cidr", self.pods, "--service-cidr", self.services)

    def tether(self, *args: str, stdin: str | None = None) -> str:
        env = {**os.environ, "TETHER_STATE_DIR": str(self.state)}
        r = subprocess.run([str(h.TETHER), *args], input=stdin, capture_output=True, text=True, timeout=180,
                           env=env, cwd="/tmp")
        if r.returncode != 0:
            raise RuntimeError(f"tether {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.tether("status", "-o", "json")))

    def pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["pods"] if p["name"] == name)

    def down(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.tether("down")
        shutil.rmtree(self.state.parent, ignore_errors=True)


def _free_networks() -> tuple[str, str]:
    """A pod /24 and a service /24 in 10.240.0.0/12 that no interface of this host uses."""
    base = ipaddress.ip_network("10.240.0.0/12")
    for _ in range(100):
        n = random.randrange(0, 2 ** 12 - 1)
        nets = [ipaddress.ip_network((int(base.network_address) + (n + i) * 256, 24)) for i in (0, 1)]
        if not any(network.addresses_in_use(net) for net in nets):
            return str(nets[0]), str(nets[1])
    raise RuntimeError("no free /24 in 10.240.0.0/12")


def _mesh(workdir: Path) -> LocalMesh:
    if _state["mesh"] is None:
        _state["mesh"] = LocalMesh()
    mesh: LocalMesh = _state["mesh"]
    return mesh


def start_target(name: str, workdir: Path, fortio: Path, backend_port: int, workers: int) -> h.Target:
    if name == "nginx":
        return http1.start_target(name, workdir, fortio, backend_port, workers)
    if os.geteuid() != 0:
        raise h.Skip("pods need root (network namespaces, iptables)")
    annotations: list[str] = []
    if name == "pods-direct":
        annotations = ["--annotation", "linkerd.io/inject=disabled"]
    elif name == "linkerd2-proxy-pods":
        if _state["l2p"] is None:
            raise h.Skip("no --linkerd2-proxy PATH given")
        copy = workdir / "linkerd2-proxy"
        shutil.copy2(_state["l2p"], copy)
        os.chmod(workdir, 0o755)
        os.chmod(copy, 0o755)
        annotations = ["--annotation", f"{ANNOTATION}={copy}"]
    mesh = _mesh(workdir)
    server, client = f"{PAIRS[name]}server", f"{PAIRS[name]}client"
    mesh.tether("run", server, "--port", "8080", *annotations, "--", str(fortio), "server", "-quiet",
                "-http-port", "8080", "-grpc-port", "disabled", "-redirect-port", "disabled", "-tcp-port", "disabled",
                "-udp-port", "disabled")
    mesh.tether("run", client, *annotations, "--", "sleep", "86400")
    mesh.tether("apply", "-f", "-", stdin=f"apiVersion: v1\nkind: Service\nmetadata: {{name: {server}, namespace: "
                f"default}}\nspec: {{selector: {{app: {server}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n")
    if name != "pods-direct":
        # The new-connections server: the same echo server behind an opaque port (measured after the table).
        opaque = f"{PAIRS[name]}oserver"
        mesh.tether("run", opaque, "--port", "8080", *annotations, "--annotation",
                    "config.linkerd.io/opaque-ports=8080", "--", str(fortio), "server", "-quiet", "-http-port", "8080",
                    "-grpc-port", "disabled", "-redirect-port", "disabled", "-tcp-port", "disabled", "-udp-port",
                    "disabled")
        # Opaque on the Service too: the client proxies then forward each connection as TCP (no
        # HTTP pool), so every client connection is a new connection between the proxies.
        mesh.tether("apply", "-f", "-", stdin=f"apiVersion: v1\nkind: Service\nmetadata: {{name: {opaque}, "
                    f"namespace: default, annotations: {{config.linkerd.io/opaque-ports: '8080'}}}}\nspec: "
                    f"{{selector: {{app: {opaque}}}, ports: [{{port: 8080, targetPort: 8080}}]}}\n")
    server_pod, client_pod = mesh.pod(f"{server}-0"), mesh.pod(f"{client}-0")
    netns = ["ip", "netns", "exec", client_pod["netns"]]
    if name != "pods-direct":
        _new_conn_targets[name] = (netns, f"http://{opaque}.default.svc.cluster.local:8080{http1.PATH}",
                                   [f"{opaque}-0", f"{client}-0"])
    _state["fortio"] = fortio
    if name == "pods-direct":
        host, port = server_pod["ip"], 8080  # no client proxy: nothing would route a Service's address
    else:
        host, port = f"{server}.default.svc.cluster.local", 80
        h.wait_until(lambda: subprocess.run([*netns, "getent", "hosts", host], capture_output=True).returncode == 0,
                     30, f"{host} in the client pod's hosts file")
    url = f"http://{host}:{port}{http1.PATH}"

    def pids() -> list[int]:
        return [p for p in (mesh.pod(f"{server}-0").get("proxyPid"), mesh.pod(f"{client}-0").get("proxyPid")) if p]

    def load(qps: float, connections: int, seconds: float) -> h.LoadResult:
        return h.fortio_load(fortio, [url], qps, connections, seconds, workdir, ok_codes=("200",), prefix=netns)

    @contextlib.contextmanager
    def hold(n: int) -> Iterator[int]:
        proc = subprocess.Popen([*netns, sys.executable, "-c", _HOLD, host, str(port), str(n), http1.PATH],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            yield int(proc.stdout.readline() or 0)
        finally:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            proc.wait(timeout=30)

    # The pair answers before it is measured: a client proxy may ask for the Service's policy before
    # the control plane has its address (an answer that changes a moment later).
    deadline = time.monotonic() + 30
    while True:
        try:
            load(0, 4, 1.0)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
    return h.Target(name, None, load, hold, pids=None if name == "pods-direct" else pids)


def new_connections(name: str) -> tuple[float, float] | None:
    """(new connections per CPU-second of both proxies, per second) for a pair, or None if it did not run.

    Saturating load for NEW_CONN_SECONDS from the client pod to its opaque server, one request per
    connection, after a warm-up (the first connections also fetch discovery and policy)."""
    if name not in _new_conn_targets or _state["mesh"] is None or _state["fortio"] is None:
        return None
    netns, url, pods = _new_conn_targets[name]
    mesh: LocalMesh = _state["mesh"]
    fortio: Path = _state["fortio"]
    with tempfile.TemporaryDirectory(prefix="tether-parity-newconn-") as tmp:
        work = Path(tmp)
        host = url.split("//", 1)[1].split(":", 1)[0]
        h.wait_until(lambda: subprocess.run([*netns, "getent", "hosts", host], capture_output=True).returncode == 0,
                     30, f"{host} in the client pod's hosts file")
        deadline = time.monotonic() + 30
        while True:
            try:
                h.fortio_load(fortio, ["-keepalive=false", url], 0, 4, 1.0, work, ok_codes=("200",), prefix=netns)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        pids = [p for p in (mesh.pod(pod).get("proxyPid") for pod in pods) if p]
        cpu0 = h.cpu_seconds(pids)
        r = h.fortio_load(fortio, ["-keepalive=false", url], 0, NEW_CONN_CONNECTIONS, NEW_CONN_SECONDS, work,
                          ok_codes=("200",), prefix=netns)
        cpu = h.cpu_seconds(pids) - cpu0
    return (r.count / cpu if cpu else 0.0, r.actual_qps)


def summary(results: Sequence[h.TargetResult]) -> str:
    by = {r.name: r for r in results if r.skipped is None}
    t, lk = by.get("tether-pods"), by.get("linkerd2-proxy-pods")
    if t is None or lk is None:
        return "\nparity with linkerd2-proxy: not judged (both pairs must run)"
    print("measuring new connections through an opaque port (one request each) ...", flush=True)
    t_new, lk_new = new_connections("tether-pods"), new_connections("linkerd2-proxy-pods")
    # (label, tether, linkerd2-proxy, higher is better, number format)
    rows: list[tuple[str, float | None, float | None, bool, str]] = [
        ("saturation req/s", h.median([x.actual_qps for x in t.saturation]),
         h.median([x.actual_qps for x in lk.saturation]), True, "{:,.0f}"),
        ("proxy CPU us/req (both proxies)", h.median(t.cpu_us_per_request), h.median(lk.cpu_us_per_request), False,
         "{:.1f}"),
    ]
    for rate in (1000, 5000):
        rows.append((f"p99 ms @ {rate:,}/s", h.median([x.p99_ms for x in t.at_rate.get(rate, [])]),
                     h.median([x.p99_ms for x in lk.at_rate.get(rate, [])]), False, "{:.2f}"))
    rows += [
        ("RSS idle MiB (both proxies)", (t.rss_idle_kib or 0) / 1024, (lk.rss_idle_kib or 0) / 1024, False, "{:.1f}"),
        ("RSS 1k conns MiB (both proxies)", (t.rss_held_kib or 0) / 1024, (lk.rss_held_kib or 0) / 1024, False,
         "{:.1f}"),
    ]
    rows.append(("new connections per CPU-second (both proxies; opaque port, one request each)",
                 t_new[0] if t_new else None, lk_new[0] if lk_new else None, True, "{:,.0f}"))
    lines = ["", "parity with linkerd2-proxy (issue 16: at least on par on each):"]
    for label, tv, lv, higher_better, fmt in rows:
        if not tv or not lv:
            lines.append(f"  {label}: not measured")
            continue
        ok = tv >= lv if higher_better else tv <= lv
        lines.append(f"  {label}: tether {fmt.format(tv)} vs linkerd2-proxy {fmt.format(lv)} = {tv / lv:.2f}x "
                     f"{'MET' if ok else 'MISSED'}")
    if t_new and lk_new:
        lines.append(f"  (new connections wall clock: tether {t_new[1]:,.0f}/s, linkerd2-proxy {lk_new[1]:,.0f}/s, "
                     f"{NEW_CONN_CONNECTIONS} connections at a time for {NEW_CONN_SECONDS:g} s; tether's proxies "
                     "resume TLS sessions, Linkerd's do a full handshake each time)")
    return "\n".join(lines)


SUITE = h.Suite(
    kind="parity",
    script="bench/parity.py",
    title=f"meshed two-hop HTTP/1.1 GET {http1.PATH}, pod to pod in the local mesh (mTLS)",
    description=__doc__ or "",
    targets=TARGETS,
    start_backend=http1.start_backend,
    start_target=start_target,
    summary=summary,
)


def main(argv: list[str]) -> int:
    if "--linkerd2-proxy" in argv:
        i = argv.index("--linkerd2-proxy")
        if i + 1 >= len(argv):
            raise SystemExit("--linkerd2-proxy needs a PATH")
        path = Path(argv[i + 1])
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--linkerd2-proxy: {path} is not an executable file")
        _state["l2p"] = path
        argv = argv[:i] + argv[i + 2:]
    try:
        return h.main(SUITE, argv)
    finally:
        if _state["mesh"] is not None:
            _state["mesh"].down()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
