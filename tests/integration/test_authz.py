"""Inbound authorization through real processes: a destination controller serving inbound policy from
the local store, an identity service, server proxies in front of an HTTP app, a gRPC app and an
opaque TCP app, and four kinds of clients:

- ``meshed``: a client proxy with identity ``client`` (HTTP/1.1 and gRPC through its outbound
  listener; for opaque TCP a TLS client holding a real ``client`` certificate from the mesh's issuer,
  since the outbound proxy only carries opaque TCP for redirected connections);
- ``meshed-other``: the same with identity ``other``;
- ``plain-inside``: no mesh, from 127.0.0.1 (the cluster networks are 127.0.0.1/32 here);
- ``plain-outside``: no mesh, from 127.0.0.2.

The server proxies run with ``--inbound-permit-localhost false``: on a single host every client is
on loopback, and Linkerd's "always permit localhost" would authorize them all.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import yaml

from tether.testing.backend import tcp_server
from tether.testing.mesh import LocalMesh
from tether.testing.procs import Proc, ProxyProc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

HTTP_AUTHORITY = "web.default.svc.cluster.local:80"
GRPC_AUTHORITY = "greeter.default.svc.cluster.local:50051"
TCP_AUTHORITY = "echo.default.svc.cluster.local:7000"
SERVICE = "test.Greeter"
INSIDE, OUTSIDE = "127.0.0.1", "127.0.0.2"
PING = b"\x00\x01opaque ping\n"  # a binary protocol: detection calls it opaque at its first byte
CLIENTS = ("meshed", "meshed-other", "plain-inside", "plain-outside")
PROTOCOLS = ("http", "grpc", "tcp")
POLICIES = ("all-unauthenticated", "all-authenticated", "cluster-authenticated", "cluster-unauthenticated",
            "deny", "audit")
# Which clients each default policy lets in (the meshed clients come from 127.0.0.1, inside).
ALLOWED = {
    "all-unauthenticated": set(CLIENTS),
    "audit": set(CLIENTS),
    "all-authenticated": {"meshed", "meshed-other"},
    "cluster-authenticated": {"meshed", "meshed-other"},
    "cluster-unauthenticated": {"meshed", "meshed-other", "plain-inside"},
    "deny": set(),
}


# -- the applications -------------------------------------------------------------------------------


class App(ThreadingHTTPServer):
    """An HTTP app that counts what reaches it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _AppHandler)


class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: App

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        body = b"web " + self.path.encode()
        if self.headers.get("x-stamp") is not None:
            body += b" stamp=" + self.headers["x-stamp"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TcpApp:
    """Echoes until EOF; counts the connections that reached it."""

    def __init__(self) -> None:
        self.accepted = 0
        self.sock, self.port = tcp_server(self._handle)

    def _handle(self, c: socket.socket) -> None:
        self.accepted += 1
        while data := c.recv(65536):
            c.sendall(data)


def grpc_app() -> tuple[grpc.Server, int]:
    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        return b"greeter:" + req

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, lambda b: b, lambda b: b)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class Relay:
    """Forwards 127.0.0.1:port to ``target`` from source address ``source`` (for clients that cannot
    bind one, like grpcio)."""

    def __init__(self, target: tuple[str, int], source: str) -> None:
        self.target, self.source = target, source
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, source_address=(self.source, 0))
            except OSError:
                c.close()
                continue
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (a, b):
                s.close()


# -- the mesh ------------------------------------------------------------------------------------------


class Controller(Proc):
    def __init__(self, work: Path, state: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.resources = work / "resources"
        self.resources.mkdir(exist_ok=True)
        super().__init__([sys.executable, "-m", "tether", "controller", "destination",
                          "--addr", f"127.0.0.1:{self.port}", "--admin-addr", f"127.0.0.1:{self.admin_port}",
                          "--resources-dir", str(self.resources), "--state-dir", str(state),
                          "--cluster-networks", f"{INSIDE}/32", "--poll-interval", "100ms"],
                         work / "controller.log")
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.admin_port}/ready")[0] == 200, 20, what="controller ready")

    def apply(self, docs: str) -> None:
        r = subprocess.run([sys.executable, "-m", "tether", "apply", "-f", "-", "--resources-dir",
                            str(self.resources)], input=docs, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def delete(self, docs: str) -> None:
        r = subprocess.run([sys.executable, "-m", "tether", "delete", "-f", "-", "--resources-dir",
                            str(self.resources)], input=docs, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr


class World:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.mesh = LocalMesh(work)
        self.mesh.create_ca()
        self.mesh.start_identity()
        self.app = App()
        threading.Thread(target=self.app.serve_forever, daemon=True).start()
        self.grpc_server, self.grpc_port = grpc_app()
        self.tcp = TcpApp()
        self.web = self.mesh.workload("web")
        reg = self.mesh.registry
        reg.update(replace(reg.get("default", "web"), labels={"app": "web"}))
        self.client = self.mesh.workload("client")
        self.other = self.mesh.workload("other")
        self.controller = Controller(work, self.mesh.state)
        self.mesh.procs.append(self.controller)
        self.servers = {proto: self.server_proxy(proto, port) for proto, port in (
            ("http", self.app.server_address[1]), ("grpc", self.grpc_port), ("tcp", self.tcp.port))}
        for p in self.servers.values():
            p.wait_ready(30)
        self.app_ports = {"http": self.app.server_address[1], "grpc": self.grpc_port, "tcp": self.tcp.port}
        dst = work / "destinations.yaml"
        dst.write_text(yaml.safe_dump({"destinations": {
            HTTP_AUTHORITY: [{"addr": f"127.0.0.1:{self.app_ports['http']}",
                              "proxy_port": self.servers["http"].inbound_port, "identity": self.web.identity}],
            GRPC_AUTHORITY: [{"addr": f"127.0.0.1:{self.app_ports['grpc']}",
                              "proxy_port": self.servers["grpc"].inbound_port, "identity": self.web.identity}],
            TCP_AUTHORITY: [{"addr": f"127.0.0.1:{self.app_ports['tcp']}",
                             "proxy_port": self.servers["tcp"].inbound_port, "identity": self.web.identity}],
        }}))
        self.client_proxies = {
            "meshed": self.mesh.proxy(self.client, destinations_file=str(dst)),
            "meshed-other": self.mesh.proxy(self.other, destinations_file=str(dst)),
        }
        self.relays = {src: Relay(("127.0.0.1", self.servers["grpc"].inbound_port), src) for src in (INSIDE, OUTSIDE)}
        self.channels: dict[str, grpc.Channel] = {}

    def server_proxy(self, proto: str, app_port: int) -> ProxyProc:
        """The web workload's proxy in front of one app (a log file of its own)."""
        p = ProxyProc(self.work, name=f"server-{proto}", identity_name=self.web.identity,
                      identity_token_path=str(self.web.token_path), identity_trust_anchors=str(self.mesh.anchors),
                      identity_addrs=",".join(self.mesh.identity_addrs), inbound_app_addr=f"127.0.0.1:{app_port}",
                      policy_addrs=f"127.0.0.1:{self.controller.port}", inbound_permit_localhost="false",
                      log_level="warn,tether=info")
        self.mesh.procs.append(p)
        return p

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.mesh.close()
        self.app.shutdown()
        self.grpc_server.stop(0)
        self.tcp.sock.close()
        for r in self.relays.values():
            r.sock.close()

    # -- one request of each protocol from each kind of client ---------------------------------------
    def http(self, client: str, path: str = "/") -> tuple[int, str, bytes]:
        """(status, l5d-proxy-error, body)."""
        if client in self.client_proxies:
            conn = http.client.HTTPConnection("127.0.0.1", self.client_proxies[client].outbound_port, timeout=10)
            headers = {"Host": HTTP_AUTHORITY}
        else:
            src = INSIDE if client == "plain-inside" else OUTSIDE
            conn = http.client.HTTPConnection("127.0.0.1", self.servers["http"].inbound_port, timeout=10,
                                              source_address=(src, 0))
            headers = {"Host": HTTP_AUTHORITY}
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            return r.status, r.getheader("l5d-proxy-error") or "", r.read()
        finally:
            conn.close()

    def grpc(self, client: str) -> str:
        """OK or the status code's name."""
        ch = self.channels.get(client)
        if ch is None:
            if client in self.client_proxies:
                target = f"127.0.0.1:{self.client_proxies[client].outbound_port}"
            else:
                target = f"127.0.0.1:{self.relays[INSIDE if client == 'plain-inside' else OUTSIDE].port}"
            ch = self.channels[client] = grpc.insecure_channel(target, options=[("grpc.default_authority",
                                                                                 GRPC_AUTHORITY)])
        call = ch.unary_unary(f"/{SERVICE}/Unary", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            assert call(b"hi", timeout=10) == b"greeter:hi"
            return "OK"
        except grpc.RpcError as e:
            return str(e.code().name)

    def tcp_call(self, client: str) -> bytes:
        """What comes back for PING (b"" when the connection was refused). A meshed client's stream
        goes through its own proxy (a CONNECT to the echo service: the client proxy opens mesh TLS to
        the server's proxy with the port in the transport header, as for any opaque stream)."""
        if client in self.client_proxies:
            s = socket.create_connection(("127.0.0.1", self.client_proxies[client].outbound_port), timeout=10)
            s.sendall(f"CONNECT {TCP_AUTHORITY} HTTP/1.1\r\nHost: {TCP_AUTHORITY}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(1024)
                if not chunk:
                    break
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
            got = head.split(b"\r\n\r\n", 1)[1]
        else:
            src = OUTSIDE if client == "plain-outside" else INSIDE
            s = socket.create_connection(("127.0.0.1", self.servers["tcp"].inbound_port), timeout=10,
                                         source_address=(src, 0))
            got = b""
        try:
            s.sendall(PING)
            if client in self.client_proxies:
                deadline = time.monotonic() + 5
                while len(got) < len(PING) and time.monotonic() < deadline:
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
            else:
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(64):
                    got += chunk
        except OSError:
            pass
        finally:
            s.close()
        return got

    # -- policy -----------------------------------------------------------------------------------------
    def policy_in_force(self, proto: str) -> str:
        port = self.app_ports[proto]
        for line in self.servers[proto].metrics().splitlines():
            if line.startswith(f'tether_inbound_policy{{srv_port="{port}"') and line.endswith(" 1"):
                return line.split('srv_name="', 1)[1].split('"', 1)[0]
        return ""

    def wait_policy(self, name: str) -> None:
        # The server proxies watch a port once they saw a connection for it.
        self.http("plain-inside")
        self.grpc("plain-inside")
        self.tcp_call("plain-inside")
        for proto in PROTOCOLS:
            wait_for(lambda p=proto: self.policy_in_force(p) == name, 10,  # type: ignore[misc]
                     what=f"{proto} server proxy applying {name}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("authz"))
    try:
        yield w
    finally:
        w.close()


def namespace_with_policy(policy: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "default", "annotations": {"config.linkerd.io/default-inbound-policy": policy}}})


def test_default_policy_matrix_every_cell_as_linkerd(world: World) -> None:
    """6 default policies x 4 clients x 3 protocols, each cell's outcome asserted: 0 mismatches."""
    mismatches: list[str] = []
    cells = 0
    for policy in POLICIES:
        world.controller.apply(namespace_with_policy(policy))
        world.wait_policy(policy)
        for client in CLIENTS:
            allowed = client in ALLOWED[policy]
            before_http, before_tcp = len(world.app.seen), world.tcp.accepted
            status, reason, _ = world.http(client, f"/{policy}/{client}")
            got_http = "allowed" if status == 200 else f"{status} {reason}"
            want_http = "allowed" if allowed else "403 unauthorized request on route"
            got_grpc = world.grpc(client)
            want_grpc = "OK" if allowed else "PERMISSION_DENIED"
            echoed = world.tcp_call(client)
            got_tcp = "allowed" if echoed == PING else f"refused ({echoed!r})"
            want_tcp = "allowed" if allowed else "refused (b'')"
            for proto, got, want in (("http", got_http, want_http), ("grpc", got_grpc, want_grpc),
                                     ("tcp", got_tcp, want_tcp)):
                cells += 1
                if got != want:
                    mismatches.append(f"{policy} {client} {proto}: got {got}, want {want}")
            if not allowed:
                # Refused before the application: it saw neither the request nor the connection.
                if len(world.app.seen) != before_http:
                    mismatches.append(f"{policy} {client}: the HTTP app saw a denied request")
                if world.tcp.accepted != before_tcp:
                    mismatches.append(f"{policy} {client}: the TCP app accepted a refused connection")
    assert cells == 72
    print(f"\nmatrix: {cells} cells, {len(mismatches)} mismatches")
    assert mismatches == []
    m = world.servers["http"].metrics()
    assert 'inbound_http_authz_deny_total{' in m and 'srv_kind="default",srv_name="deny"' in m
    assert 'authz_kind="default",authz_name="audit"' in m
    t = world.servers["tcp"].metrics()
    assert any(ln.startswith("inbound_tcp_authz_deny_total{") and f'srv_port="{world.tcp.port}"' in ln
               for ln in t.splitlines())
    assert "connection allowed by audit" in world.servers["tcp"].log()


WEB_SERVER = """
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-http, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  port: %(port)d
  proxyProtocol: HTTP/1
---
"""

LOCKDOWN = WEB_SERVER + """
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: web-admin, namespace: default}
spec:
  parentRefs: [{name: web-http, kind: Server, group: policy.linkerd.io}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /admin}}]
---
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: web-public, namespace: default}
spec:
  parentRefs: [{name: web-http, kind: Server, group: policy.linkerd.io}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {name: client-only, namespace: default}
spec:
  identities: ["%(client)s"]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: cluster-nets, namespace: default}
spec:
  networks: [{cidr: 127.0.0.0/8, except: [127.0.0.2/32]}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: admin-from-client, namespace: default}
spec:
  targetRef: {group: policy.linkerd.io, kind: HTTPRoute, name: web-admin}
  requiredAuthenticationRefs:
  - {group: policy.linkerd.io, kind: MeshTLSAuthentication, name: client-only}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public-from-cluster, namespace: default}
spec:
  targetRef: {group: policy.linkerd.io, kind: HTTPRoute, name: web-public}
  requiredAuthenticationRefs:
  - {group: policy.linkerd.io, kind: NetworkAuthentication, name: cluster-nets}
"""


def test_locking_down_a_server_and_a_route_flips_the_next_request(world: World) -> None:
    world.controller.apply(namespace_with_policy("all-unauthenticated"))
    world.wait_policy("all-unauthenticated")
    docs = LOCKDOWN % {"port": world.app_ports["http"], "client": world.client.identity}
    # One keep-alive connection from the unmeshed client, kept across the change.
    conn = http.client.HTTPConnection("127.0.0.1", world.servers["http"].inbound_port, timeout=10,
                                      source_address=(INSIDE, 0))

    def get(path: str) -> int:
        conn.request("GET", path, headers={"Host": HTTP_AUTHORITY})
        r = conn.getresponse()
        r.read()
        return r.status

    try:
        assert get("/admin/x") == 200
        assert world.http("meshed-other", "/admin/x")[0] == 200
        world.controller.apply(docs)
        wait_for(lambda: world.policy_in_force("http") == "web-http", 10, what="the Server in force")
        # The same connection: its next request meets the new policy.
        assert get("/admin/x") == 403
        # `tether apply` writes one file per resource, as kubectl applies one object at a time: the
        # Server can be in force a moment before the last AuthorizationPolicy (the public one).
        wait_for(lambda: get("/") == 200, 10, what="the public route's authorization in force")
        assert world.http("meshed", "/admin/x")[0] == 200
        status, reason, _ = world.http("meshed-other", "/admin/x")
        assert (status, reason) == (403, "unauthorized request on route")
        assert world.http("meshed-other", "/index")[0] == 200  # public, from 127.0.0.1
        assert world.http("plain-outside", "/index")[0] == 403  # 127.0.0.2 is excepted
        m = world.servers["http"].metrics()
        assert any(ln.startswith("inbound_http_authz_allow_total{") and 'route_name="web-admin"' in ln
                   and 'authz_kind="authorizationpolicy",authz_name="admin-from-client"' in ln
                   and f'client_id="{world.client.identity}"' in ln for ln in m.splitlines()), m
        assert any(ln.startswith("inbound_http_authz_deny_total{") and 'srv_name="web-http"' in ln
                   and 'route_name="web-admin"' in ln for ln in m.splitlines())
        # Deleting the lock-down opens the route again, on the same connection.
        world.controller.delete(docs)
        wait_for(lambda: world.policy_in_force("http") == "all-unauthenticated", 10, what="the default again")
        assert get("/admin/x") == 200
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


def test_malformed_request_to_a_route_protected_port_gets_400_and_the_app_sees_nothing(world: World) -> None:
    world.controller.apply(namespace_with_policy("all-unauthenticated"))
    docs = LOCKDOWN % {"port": world.app_ports["http"], "client": world.client.identity}
    world.controller.apply(docs)
    try:
        world.http("plain-inside", "/")
        wait_for(lambda: world.policy_in_force("http") == "web-http", 10, what="the Server in force")
        before = len(world.app.seen)
        port = world.servers["http"].inbound_port
        for junk in (b"GET\x00/admin HTTP/1.1\r\n\r\n", b"GET /admin\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"POST /admin HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"PUT\t\t\x7f\r\n\r\n"):
            reply = raw_exchange(port, junk)
            assert reply.startswith(b"HTTP/1.1 400"), (junk, reply)
        assert len(world.app.seen) == before
    finally:
        world.controller.delete(docs)


RATE_LIMIT = """
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {name: web-limited, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  port: %(port)d
  proxyProtocol: HTTP/1
  accessPolicy: all-unauthenticated
---
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: web-rl, namespace: default}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-limited}
  total: {requestsPerSecond: %(total)d}
  identity: {requestsPerSecond: %(identity)d}
  overrides:
  - requestsPerSecond: %(override)d
    clientRefs: [{kind: ServiceAccount, name: client}]
"""


def count_ok(world: World, client: str, seconds: float, max_requests: int) -> tuple[int, int, str]:
    """Requests for ``seconds`` (at most ``max_requests``) on one connection: (200s, 429s, a 429 reason)."""
    if client in world.client_proxies:
        conn = http.client.HTTPConnection("127.0.0.1", world.client_proxies[client].outbound_port, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", world.servers["http"].inbound_port, timeout=10,
                                          source_address=(INSIDE, 0))
    ok = limited = 0
    reason = ""
    deadline = time.monotonic() + seconds
    try:
        for _ in range(max_requests):
            if time.monotonic() >= deadline:
                break
            conn.request("GET", "/rl", headers={"Host": HTTP_AUTHORITY})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                ok += 1
            elif r.status == 429:
                limited += 1
                reason = r.getheader("l5d-proxy-error") or ""
            time.sleep(0.002)  # about 300 req/s offered at most: bounded load
    finally:
        conn.close()
    return ok, limited, reason


def test_rate_limit_total_per_identity_and_override(world: World) -> None:
    port = world.app_ports["http"]
    docs = RATE_LIMIT % {"port": port, "total": 1000, "identity": 10, "override": 40}
    gdocs = ""
    world.controller.apply(docs)
    try:
        world.http("plain-inside", "/")
        wait_for(lambda: world.policy_in_force("http") == "web-limited", 10, what="the limited Server")
        seconds = 3.0
        results = {}
        for client in ("meshed", "meshed-other", "plain-inside"):
            results[client] = count_ok(world, client, seconds, 2000)
        # Over T seconds a limit of r admits r*T plus its one-second burst (r): within 10% of that.
        for client, rps in (("meshed", 40), ("meshed-other", 10), ("plain-inside", 10)):
            ok, limited, _ = results[client]
            expected = rps * (seconds + 1)
            assert abs(ok - expected) <= 0.1 * expected + 1, (client, results[client], expected)
            assert limited > 0
        assert results["meshed"][2] == "override rate limit exceeded: 40rps"
        assert results["plain-inside"][2] == "per-identity rate limit exceeded: 10rps"
        m = world.servers["http"].metrics()
        assert any(ln.startswith("inbound_http_local_ratelimit_total{") and 'ratelimit_name="web-rl"' in ln
                   and 'ratelimit_scope="identity"' in ln for ln in m.splitlines()), m
        # gRPC clients get RESOURCE_EXHAUSTED: the gRPC server proxy's port under a tiny total limit.
        gdocs = (RATE_LIMIT.replace("web-limited", "greeter-limited").replace("web-rl", "greeter-rl") % {
            "port": world.app_ports["grpc"], "total": 2, "identity": 2, "override": 2}).replace(
            "proxyProtocol: HTTP/1", "proxyProtocol: HTTP/2")
        world.controller.apply(gdocs)
        wait_for(lambda: world.policy_in_force("grpc") == "greeter-limited", 10, what="the limited gRPC Server")
        # The rate limit may reach the proxy in an update after its Server's: a burst of calls meets
        # it once it is in force.
        wait_for(lambda: "RESOURCE_EXHAUSTED" in [world.grpc("plain-inside") for _ in range(6)], 10,
                 what="RESOURCE_EXHAUSTED from the gRPC server proxy's rate limit")
    finally:
        world.controller.delete(docs)
        if gdocs:  # also when the test failed: a Server left on the port would hold every later test
            world.controller.delete(gdocs)


def test_static_default_policy_without_a_control_plane(tmp_path: Path) -> None:
    app = App()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    p = ProxyProc(tmp_path, inbound_app_addr=f"127.0.0.1:{app.server_address[1]}",
                  default_inbound_policy="cluster-unauthenticated", cluster_networks=f"{INSIDE}/32",
                  inbound_permit_localhost="false").wait_ready()
    try:
        def get(src: str) -> tuple[int, str]:
            c = http.client.HTTPConnection("127.0.0.1", p.inbound_port, timeout=10, source_address=(src, 0))
            c.request("GET", "/x")
            r = c.getresponse()
            r.read()
            c.close()
            return r.status, r.getheader("l5d-proxy-error") or ""

        assert get(INSIDE) == (200, "")
        assert get(OUTSIDE) == (403, "unauthorized request on route")
        assert app.seen == ["/x"]
    finally:
        p.stop()
        app.shutdown()


def test_bad_policy_flags_are_one_line_errors(tmp_path: Path) -> None:
    for flag, value, want in (("--default-inbound-policy", "allow",
                               "'--default-inbound-policy': 'allow' is not one of"),
                              ("--cluster-networks", "10.0.0.0/33", "'--cluster-networks': network '10.0.0.0/33'"),
                              ("--policy-workload", '{"ns": 1}', "'--policy-workload': ")):
        r = subprocess.run([sys.executable, "-m", "tether", "proxy", flag, value], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert want in r.stderr, r.stderr
    # Checked at start: a policy service without knowing which workload to ask for.
    r = subprocess.run([sys.executable, "-m", "tether", "proxy", "--policy-addrs", "127.0.0.1:1", "--inbound-addr",
                        "127.0.0.1:0", "--outbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "tether proxy: --policy-addrs is set but the proxy's workload is unknown: set --policy-workload "
        '(JSON {"ns": ..., "pod": ...}), a --destination-context with "pod", or --identity-name']


def test_never_received_policy_denies(tmp_path: Path) -> None:
    """A policy service that never answers: connections wait --inbound-policy-timeout, then are denied."""
    app = App()
    threading.Thread(target=app.serve_forever, daemon=True).start()
    dead = free_port()  # nothing listens there
    p = ProxyProc(tmp_path, inbound_app_addr=f"127.0.0.1:{app.server_address[1]}", policy_addrs=f"127.0.0.1:{dead}",
                  policy_workload=json.dumps({"ns": "default", "pod": "web"}), inbound_policy_timeout="300ms",
                  inbound_permit_localhost="false").wait_ready()
    try:
        status, body = http_get(p.inbound + "/", headers={"Host": HTTP_AUTHORITY})
        assert status == 403 and b"no inbound policy for port" in body
        assert app.seen == []
    finally:
        p.stop()
        app.shutdown()


def test_an_opaque_server_is_authorized_per_connection_without_detection(world: World) -> None:
    docs = f"""
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {{name: web-opaque, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  port: {world.app_ports["http"]}
  proxyProtocol: opaque
  accessPolicy: cluster-unauthenticated
"""
    world.controller.apply(docs)
    try:
        world.http("plain-inside", "/")
        wait_for(lambda: world.policy_in_force("http") == "web-opaque", 10, what="the opaque Server")
        # Inside: the HTTP request goes through as bytes (no HTTP metrics of its own on the server proxy).
        assert world.http("plain-inside", "/opaque")[0] == 200
        # Outside: the connection is refused, no 403: nothing was parsed.
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            world.http("plain-outside", "/opaque")
        m = world.servers["http"].metrics()
        assert any(ln.startswith("inbound_tcp_authz_allow_total{") and 'srv_name="web-opaque"' in ln
                   and 'authz_name="cluster-unauthenticated"' in ln for ln in m.splitlines()), m
        assert any(ln.startswith("inbound_tcp_authz_deny_total{") and 'srv_name="web-opaque"' in ln
                   for ln in m.splitlines()), m
        assert "/opaque" in world.app.seen
    finally:
        world.controller.delete(docs)


def test_the_first_connection_to_an_opaque_server_port_waits_for_its_policy_not_for_detection(
        tmp_path: Path) -> None:
    """A Server with proxyProtocol opaque on a port the pod does not annotate: the first connection
    waits for the port's policy, then is forwarded at once, so a server that speaks first is heard
    without the client sending a byte. Before, that connection was detected while the policy was
    fetched, and a silent client heard nothing until the detection timeout (here 120 s)."""
    from tether.testing.policy import ScriptedInboundPolicy, server_from_yaml

    banner = b"220 ready\r\n"
    listener, app_port = tcp_server(lambda c: c.sendall(banner))
    opaque = server_from_yaml(namespace_with_policy("all-unauthenticated") + "---\n" + yaml.safe_dump({
        "apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
        "metadata": {"name": "smtp", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {}}, "port": app_port, "proxyProtocol": "opaque"}}) + "---\n"
        + yaml.safe_dump({"apiVersion": "workload.tether.io/v1alpha1", "kind": "Workload",
                          "metadata": {"name": "web", "namespace": "default"}, "spec": {"serviceAccount": "web"}}),
        "default", "web", app_port)
    policy = ScriptedInboundPolicy({app_port: opaque}).start()
    p = ProxyProc(tmp_path, inbound_app_addr=f"127.0.0.1:{app_port}", policy_addrs=f"127.0.0.1:{policy.port}",
                  policy_workload=json.dumps({"ns": "default", "pod": "web"}), detect_timeout="120s").wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=60) as s:
            assert s.recv(64) == banner
        m = p.metrics()
        assert any(ln.startswith("inbound_tcp_authz_allow_total{") and 'srv_name="smtp"' in ln
                   for ln in m.splitlines()), m
    finally:
        p.stop()
        policy.stop()
        listener.close()


def test_policy_watch_fails_over_keeps_the_last_good_policy_and_says_stale() -> None:
    """The proxy's WatchPort client against real gRPC servers: a dead replica, a live one, an outage,
    an invalid message."""
    import asyncio

    from tether.api.gen import inbound_pb2 as inb
    from tether.proxy.inbound.policy_watch import PolicyWatch, PolicyWatchSettings
    from tether.testing.policy import ScriptedInboundPolicy, server_from_yaml

    good = server_from_yaml(namespace_with_policy("cluster-authenticated") + "---\n" + yaml.safe_dump({
        "apiVersion": "workload.tether.io/v1alpha1", "kind": "Workload",
        "metadata": {"name": "web", "namespace": "default"}, "spec": {"serviceAccount": "web"}}),
        "default", "web", 8080)
    live = ScriptedInboundPolicy({8080: good}).start()
    dead = free_port()

    def gauge(w: PolicyWatch, name: str) -> float:
        return next(float(ln.split()[-1]) for ln in w.metrics_lines() if ln.startswith(name + " "))

    async def run() -> None:
        w = PolicyWatch(PolicyWatchSettings((f"127.0.0.1:{dead}", f"127.0.0.1:{live.port}"),
                                            '{"ns":"default","pod":"web"}', wait_timeout=10))
        try:
            p = await w.get(8080)
            assert p is not None and p.server.name == "cluster-authenticated"
            live.stop()  # every replica gone
            async with asyncio.timeout(10):
                # The gauge is what an operator sees: poll it (with the deadline above).
                while gauge(w, "tether_inbound_policy_stale") != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert w.current(8080) == p  # the last good policy stays in force
        finally:
            await w.aclose()

        # A replica that sends something the proxy cannot apply: nothing in force, denied, counted.
        bad = ScriptedInboundPolicy({8080: inb.Server()}).start()
        w2 = PolicyWatch(PolicyWatchSettings((f"127.0.0.1:{bad.port}",), '{"ns":"default","pod":"web"}',
                                             wait_timeout=10))
        try:
            assert await w2.get(8080) is None
            assert gauge(w2, "tether_inbound_policy_invalid_total") >= 1
        finally:
            await w2.aclose()
            bad.stop()

    asyncio.run(run())


def test_open_opaque_connection_is_closed_when_a_new_policy_no_longer_authorizes_it(world: World) -> None:
    world.controller.apply(namespace_with_policy("all-unauthenticated"))
    world.wait_policy("all-unauthenticated")
    with socket.create_connection(("127.0.0.1", world.servers["tcp"].inbound_port), timeout=10,
                                  source_address=(OUTSIDE, 0)) as s:
        s.sendall(PING)
        got = b""
        while len(got) < len(PING):
            got += s.recv(64)
        assert got == PING  # open and working
        world.controller.apply(namespace_with_policy("cluster-unauthenticated"))  # 127.0.0.2 is outside
        s.settimeout(10)
        try:
            rest = s.recv(64)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # closed by the proxy, not by us
    m = world.servers["tcp"].metrics()
    assert any(ln.startswith("inbound_tcp_authz_terminate_total{") and 'srv_name="cluster-unauthenticated"' in ln
               for ln in m.splitlines()), m


FILTERED = WEB_SERVER + """
apiVersion: policy.linkerd.io/v1beta3
kind: HTTPRoute
metadata: {name: web-filtered, namespace: default}
spec:
  parentRefs: [{name: web-http, kind: Server, group: policy.linkerd.io}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /stamped}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-stamp, value: inbound}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /}}]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: filtered-from-anyone, namespace: default}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: web-http}
  requiredAuthenticationRefs:
  - {group: policy.linkerd.io, kind: NetworkAuthentication, name: everywhere}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: NetworkAuthentication
metadata: {name: everywhere, namespace: default}
spec:
  networks: [{cidr: 0.0.0.0/0}]
"""


def test_inbound_route_filters_rewrite_the_request_or_answer_a_redirect(world: World) -> None:
    """An HTTPRoute on a Server with a RequestHeaderModifier sets the header the application sees
    (replacing the client's); one with a RequestRedirect answers 301 with the new location, and the
    application sees nothing of it; a rule without filters passes the request as sent."""
    world.controller.apply(namespace_with_policy("all-unauthenticated"))
    world.wait_policy("all-unauthenticated")
    docs = FILTERED % {"port": world.app_ports["http"]}
    world.controller.apply(docs)
    try:
        wait_for(lambda: world.policy_in_force("http") == "web-http", 10, what="the Server in force")
        conn = http.client.HTTPConnection("127.0.0.1", world.servers["http"].inbound_port, timeout=10,
                                          source_address=(INSIDE, 0))

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str, http.client.HTTPResponse]:
            conn.request("GET", path, headers={"Host": HTTP_AUTHORITY, **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read().decode(), r

        # The Server, its route and its authorization may reach the proxy in separate updates: the
        # route is in force once its redirect answers.
        wait_for(lambda: get("/old/page")[0] == 301, 10, what="the HTTPRoute and its authorization in force")

        assert get("/stamped/a", {"x-stamp": "from-client"})[:2] == (200, "web /stamped/a stamp=inbound")
        assert get("/plain", {"x-stamp": "from-client"})[:2] == (200, "web /plain stamp=from-client")
        seen = len(world.app.seen)
        status, _, r = get("/old/page")
        assert status == 301 and r.getheader("location", "").endswith("/new"), (status, r.getheaders())
        assert len(world.app.seen) == seen  # answered by the proxy
        conn.close()
    finally:
        world.controller.delete(docs)
        wait_for(lambda: world.policy_in_force("http") == "all-unauthenticated", 10, what="the default again")


def _handshakes(proxy: ProxyProc, resumed: bool) -> int:
    want = f'tls_handshakes_total{{direction="inbound",resumed="{str(resumed).lower()}"}} '
    return sum(int(ln.split()[-1]) for ln in proxy.metrics().splitlines() if ln.startswith(want))


def test_a_resumed_tls_session_is_authorized_as_its_full_handshake_proved(world: World) -> None:
    """Each opaque stream is a new mesh TLS connection; from a client's second one on, its proxy
    resumes the TLS session. A MeshTLSAuthentication still sees that client's own identity."""
    docs = f"""
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {{name: web-tcp, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  port: {world.app_ports["tcp"]}
---
apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {{name: client-only, namespace: default}}
spec:
  identities: ["{world.client.identity}"]
---
apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: tcp-from-client, namespace: default}}
spec:
  targetRef: {{group: policy.linkerd.io, kind: Server, name: web-tcp}}
  requiredAuthenticationRefs:
  - {{group: policy.linkerd.io, kind: MeshTLSAuthentication, name: client-only}}
"""
    tcp = world.servers["tcp"]
    world.controller.apply(docs)
    try:
        world.tcp_call("plain-inside")
        wait_for(lambda: world.policy_in_force("tcp") == "web-tcp", 10, what="the opaque Server")
        wait_for(lambda: world.tcp_call("meshed") == PING, 10, what="the client's authorization in force")
        world.tcp_call("meshed-other")  # its first connection: a full handshake, then a ticket
        resumed_before = _handshakes(tcp, True)
        for _ in range(3):
            assert world.tcp_call("meshed") == PING
            assert world.tcp_call("meshed-other") == b""
        wait_for(lambda: _handshakes(tcp, True) >= resumed_before + 6, 10, what="both clients resuming")
        m = tcp.metrics().splitlines()
        allowed = [ln for ln in m if ln.startswith("inbound_tcp_authz_allow_total{") and 'srv_name="web-tcp"' in ln]
        denied = [ln for ln in m if ln.startswith("inbound_tcp_authz_deny_total{") and 'srv_name="web-tcp"' in ln
                  and 'tls="true"' in ln]  # (the plaintext call that started the port's watch may be there too)
        assert allowed and all(f'client_id="{world.client.identity}"' in ln for ln in allowed), allowed
        assert denied and all(f'client_id="{world.other.identity}"' in ln for ln in denied), denied
    finally:
        world.controller.delete(docs)
