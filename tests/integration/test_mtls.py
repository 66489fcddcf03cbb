"""mTLS between real proxies with certificates from a real identity service.

client --> outbound proxy --mTLS--> inbound proxy --> app, with curl, openssl and steady load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tether.testing.backend import BackendServer, start_in_thread, tcp_server
from tether.testing.load import SteadyLoad
from tether.testing.mesh import LocalMesh, MeshWorkload
from tether.testing.procs import ProxyProc, http_get, wait_for

pytestmark = pytest.mark.integration

AUTHORITY = "web.default.svc.cluster.local:80"


class Pair:
    def __init__(self, mesh: LocalMesh, app: BackendServer, web: MeshWorkload, client: MeshWorkload,
                 inbound: ProxyProc, outbound: ProxyProc, dst: Path) -> None:
        self.mesh, self.app, self.web, self.client = mesh, app, web, client
        self.inbound, self.outbound, self.dst = inbound, outbound, dst

    def get(self, path: str = "/") -> tuple[int, bytes]:
        return http_get(self.outbound.outbound + path, headers={"Host": AUTHORITY})

    def identity_json(self, proxy: ProxyProc) -> dict[str, object]:
        return json.loads(http_get(proxy.admin + "/identity.json")[1])


def make_pair(tmp_path: Path, lifetime: str | None = None, promised_identity: str | None = None,
              hint: str | None = None, **proxy_flags: str) -> tuple[Pair, list[object]]:
    mesh = LocalMesh(tmp_path)
    mesh.create_ca()
    extra = ["--reload-interval", "0.2s"]
    if lifetime:
        extra += ["--issuance-lifetime", lifetime]
    mesh.start_identity(1, *extra)
    app = start_in_thread("web")
    web, client = mesh.workload("web"), mesh.workload("client")
    inbound = mesh.proxy(web, inbound_app_addr=f"127.0.0.1:{app.server_address[1]}", **proxy_flags)
    dst = tmp_path / "destinations.yaml"
    dst.write_text(yaml.safe_dump({"destinations": {AUTHORITY: [{
        "addr": f"127.0.0.1:{app.server_address[1]}", "proxy_port": inbound.inbound_port,
        "identity": promised_identity or web.identity, **({"protocol_hint": hint} if hint else {})}]}}))
    outbound = mesh.proxy(client, destinations_file=str(dst), **proxy_flags)
    return Pair(mesh, app, web, client, inbound, outbound, dst), [mesh, app]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p, _closers = make_pair(tmp_path)
    yield p
    p.mesh.close()
    p.app.shutdown()


def metric_lines(proxy: ProxyProc, name: str) -> list[str]:
    return [ln for ln in proxy.metrics().splitlines() if ln.startswith(name + "{") or ln.startswith(name + " ")]


def test_requests_cross_the_mesh_over_mtls_with_verified_identities(pair: Pair) -> None:
    for _ in range(3):
        assert pair.get() == (200, b"hello from web\n")
    out = metric_lines(pair.outbound, "request_total")
    assert any('tls="true"' in ln and f'server_id="{pair.web.identity}"' in ln and ln.endswith(" 3") for ln in out), out
    inb = metric_lines(pair.inbound, "request_total")
    assert any('tls="true"' in ln and f'client_id="{pair.client.identity}"' in ln and ln.endswith(" 3")
               for ln in inb), inb
    # The clients here (urllib) send Connection: close; the mTLS connection between the proxies is
    # pooled all the same: one handshake for all three requests.
    opened = metric_lines(pair.inbound, "tcp_open_total")
    assert any('tls="true"' in ln and ln.endswith(" 1") for ln in opened), opened
    exp = metric_lines(pair.outbound, "control_identity_cert_expiration_timestamp_seconds")
    assert exp and float(exp[0].split()[-1]) > 0


def test_large_bodies_cross_the_mesh_intact(pair: Pair) -> None:
    # Each way many 16 KiB records, read ahead (one read(2) takes a record and the start of the next):
    # every byte arrives, in order, on one keep-alive connection through both proxies.
    import http.client

    conn = http.client.HTTPConnection(pair.outbound.host, pair.outbound.outbound_port, timeout=30)
    try:
        for size in (200_000, 200_001, 1_000_000):
            body = os.urandom(size)
            conn.request("POST", "/echo", body=body, headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert (resp.status, resp.read() == body) == (200, True), size
    finally:
        conn.close()
    opened = metric_lines(pair.inbound, "tcp_open_total")
    assert any('tls="true"' in ln and ln.endswith(" 1") for ln in opened), opened


def handshakes(proxy: ProxyProc, direction: str, resumed: bool) -> int:
    want = f'tls_handshakes_total{{direction="{direction}",resumed="{str(resumed).lower()}"}} '
    return sum(int(ln.split()[-1]) for ln in proxy.metrics().splitlines() if ln.startswith(want))


def counts(p: Pair) -> tuple[int, int, int, int]:
    """(outbound full, outbound resumed, inbound full, inbound resumed) handshakes so far."""
    return (handshakes(p.outbound, "outbound", False), handshakes(p.outbound, "outbound", True),
            handshakes(p.inbound, "inbound", False), handshakes(p.inbound, "inbound", True))


def test_new_connections_between_proxies_resume_the_tls_session(tmp_path: Path) -> None:
    # No idle connection is kept: each request is a new mTLS connection between the proxies.
    p, _ = make_pair(tmp_path, pool_max_idle_per_endpoint="0")
    try:
        for _ in range(4):
            assert p.get() == (200, b"hello from web\n")
        # One full handshake, then the client proxy resumes its session; both ends say so.
        wait_for(lambda: counts(p) == (1, 3, 1, 3), 10, what="1 full and 3 resumed handshakes on both proxies")
        # The server still knows the client by its certificate on the resumed connections.
        inb = metric_lines(p.inbound, "request_total")
        assert any(f'client_id="{p.client.identity}"' in ln and ln.endswith(" 4") for ln in inb), inb
        out = metric_lines(p.outbound, "request_total")
        assert any(f'server_id="{p.web.identity}"' in ln and ln.endswith(" 4") for ln in out), out
        assert metric_lines(p.outbound, "tls_session_cache_entries") == ["tls_session_cache_entries 1"]
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_a_burst_of_new_connections_costs_one_full_handshake(tmp_path: Path) -> None:
    # 20 requests at once, each held 1.5 s by the app and each on a new mTLS connection between the
    # proxies: the first connection's handshake is full, the others wait for its session (read with
    # its ticket, not with its answer) and resume it. Both proxies then keep no decoded certificate
    # chain per connection, and spend about half the CPU per new connection.
    from concurrent.futures import ThreadPoolExecutor

    p, _ = make_pair(tmp_path, pool_max_idle_per_endpoint="0")
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: p.get("/delay/1500"), range(20)))
        assert answers == [(200, b"delayed\n")] * 20
        wait_for(lambda: counts(p) == (1, 19, 1, 19), 10, what="1 full and 19 resumed handshakes on both proxies")
        inb = metric_lines(p.inbound, "request_total")
        assert any(f'client_id="{p.client.identity}"' in ln and ln.endswith(" 20") for ln in inb), inb
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_no_tls_session_survives_a_certificate_renewal(tmp_path: Path) -> None:
    # 30 s certificates renew after ~21 s; each request is a new mTLS connection.
    p, _ = make_pair(tmp_path, lifetime="30s", pool_max_idle_per_endpoint="0")
    try:
        chains = {proxy: str(p.identity_json(proxy)["certificate_chain_pem"]) for proxy in (p.inbound, p.outbound)}
        assert p.get()[0] == 200 and p.get()[0] == 200
        wait_for(lambda: counts(p) == (1, 1, 1, 1), 10, what="a full then a resumed handshake")
        for proxy in (p.inbound, p.outbound):
            wait_for(lambda proxy=proxy: str(p.identity_json(proxy)["certificate_chain_pem"]) != chains[proxy], 40,
                     what="both proxies renewed their certificates")
        # New contexts on both ends: the client's cache started empty (nothing from before is
        # offered) and the server's new ticket keys would refuse an old ticket anyway.
        assert p.get()[0] == 200
        wait_for(lambda: counts(p) == (2, 1, 2, 1), 10, what="a full handshake after the renewal")
        assert p.get()[0] == 200
        wait_for(lambda: counts(p) == (2, 2, 2, 2), 10, what="resumption under the new certificates")
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_resumption_off_means_a_full_handshake_for_every_connection(tmp_path: Path) -> None:
    p, _ = make_pair(tmp_path, pool_max_idle_per_endpoint="0", identity_tls_session_max_age="0")
    try:
        for _ in range(3):
            assert p.get() == (200, b"hello from web\n")
        wait_for(lambda: counts(p) == (3, 0, 3, 0), 10, what="3 full handshakes on both proxies")
        # Each end verified its peer's chain in full once; the next two handshakes found it remembered.
        for proxy, direction in ((p.outbound, "outbound"), (p.inbound, "inbound")):
            checks = metric_lines(proxy, "tls_peer_chain_checks_total")
            assert f'tls_peer_chain_checks_total{{direction="{direction}",cached="false"}} 1' in checks, checks
            assert f'tls_peer_chain_checks_total{{direction="{direction}",cached="true"}} 2' in checks, checks
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_mtls_requests_cost_no_memory_mapping_system_calls(pair: Pair) -> None:
    """uvloop reads TLS records into a 256 KiB buffer it then shrinks; without the proxy's malloc
    tuning that cost an mmap, an mremap and a munmap (or a brk) per request. Counted by strace on
    both proxies over 300 keep-alive requests."""
    import http.client
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/setup installs it)")
    assert pair.get()[0] == 200  # pooled mTLS connection up, identities settled
    tracers = [subprocess.Popen(["strace", "-f", "-c", "-e", "trace=mmap,munmap,mremap,brk", "-p", str(p.pid)],
                                stderr=subprocess.PIPE, text=True) for p in (pair.inbound, pair.outbound)]
    try:
        # strace prints "attached" once it holds every thread; only then does the count mean anything.
        for t in tracers:
            assert t.stderr is not None
            first = t.stderr.readline()
            assert "attached" in first, first
        conn = http.client.HTTPConnection("127.0.0.1", pair.outbound.outbound_port, timeout=10)
        for _ in range(300):
            conn.request("GET", "/", headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        conn.close()
    finally:
        for t in tracers:
            t.send_signal(2)  # SIGINT: detach and print the summary
    for t, name in zip(tracers, ("inbound", "outbound"), strict=True):
        _, err = t.communicate(timeout=30)
        calls = 0
        for line in err.splitlines():
            parts = line.split()
            if parts and parts[-1] in ("mmap", "munmap", "mremap", "brk"):
                calls += int(parts[3])  # % time, seconds, usecs/call, calls, [errors,] syscall
        assert calls < 60, f"{name} proxy: {calls} memory-mapping calls for 300 requests\n{err}"


def test_openssl_sees_the_identity_and_verifies_the_chain(pair: Pair, tmp_path: Path) -> None:
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{pair.inbound.inbound_port}",
                        "-servername", pair.web.identity, "-CAfile", str(pair.mesh.anchors), "-showcerts",
                        "-verify_return_error"], input="", capture_output=True, text=True, timeout=20)
    assert f"subject=CN = {pair.web.identity}" in r.stdout, r.stdout + r.stderr
    assert "Verify return code: 0 (ok)" in r.stdout
    assert "TLSv1.3" in r.stdout
    # The chain the proxy serves verifies against the anchor with openssl verify.
    chain = json.loads(http_get(pair.inbound.admin + "/identity.json")[1])["certificate_chain_pem"]
    certs = [c + "-----END CERTIFICATE-----\n" for c in chain.split("-----END CERTIFICATE-----")[:-1]]
    (tmp_path / "leaf.pem").write_text(certs[0])
    (tmp_path / "inter.pem").write_text("".join(certs[1:]))
    v = subprocess.run(["openssl", "verify", "-CAfile", str(pair.mesh.anchors), "-untrusted",
                        str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert v.returncode == 0 and "OK" in v.stdout, v.stderr


def test_plaintext_from_unmeshed_clients_is_still_accepted(pair: Pair) -> None:
    status, body = http_get(pair.inbound.inbound + "/")
    assert (status, body) == (200, b"hello from web\n")
    inb = metric_lines(pair.inbound, "request_total")
    assert any('tls="disabled"' in ln for ln in inb), inb


def test_client_certificate_from_another_ca_is_refused(pair: Pair, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    subprocess.run([sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(other)],
                   check=True, capture_output=True, timeout=60)
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{pair.inbound.inbound_port}",
                        "-servername", pair.web.identity, "-cert", str(other / "tls.crt"), "-key",
                        str(other / "tls.key"), "-CAfile", str(pair.mesh.anchors)],
                       input="GET / HTTP/1.1\r\nHost: x\r\n\r\n", capture_output=True, text=True, timeout=20)
    assert "hello from web" not in r.stdout
    assert pair.app.requests == 0 or "alert" in (r.stdout + r.stderr).lower()


def test_a_peer_with_another_identity_than_promised_is_refused(tmp_path: Path) -> None:
    p, _ = make_pair(tmp_path, promised_identity="db.default.serviceaccount.identity.tether.cluster.local")
    try:
        status, body = p.get()
        assert status == 502
        assert b"expecting identity db.default.serviceaccount" in body, body
        assert p.app.requests == 0
    finally:
        p.mesh.close()
        p.app.shutdown()


def _refreshes(proxy: ProxyProc, result: str) -> float:
    for ln in metric_lines(proxy, "control_identity_cert_refreshes_total"):
        if f'result="{result}"' in ln:
            return float(ln.split()[-1])
    return 0.0


def test_ca_outage_past_the_renew_point_keeps_traffic_flowing(tmp_path: Path) -> None:
    # 40 s certificates renew after 28 s: the CA is down across that point.
    p, _ = make_pair(tmp_path, lifetime="40s")
    try:
        with SteadyLoad("127.0.0.1", p.outbound.outbound_port, AUTHORITY) as load:
            wait_for(lambda: load.ok > 20, 20, what="traffic flowing")
            p.mesh.stop_identity(0)
            wait_for(lambda: _refreshes(p.outbound, "error") >= 1, 40, what="a failed renewal while the CA is down")
            ok_during_outage = load.ok
            wait_for(lambda: load.ok > ok_during_outage + 20, 20, what="traffic during the outage")
            before = _refreshes(p.outbound, "ok")
            p.mesh.restart_identity(0)
            wait_for(lambda: _refreshes(p.outbound, "ok") > before, 60, what="renewal after the CA returns")
        assert load.outcomes.keys() == {"200"}, load.outcomes
    finally:
        p.mesh.close()
        p.app.shutdown()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _tether(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _issuer_of_leaf(p: Pair, proxy: ProxyProc) -> str:
    chain = str(p.identity_json(proxy)["certificate_chain_pem"])
    return chain.split("-----END CERTIFICATE-----", 1)[1]


@pytest.mark.parametrize("new_connections", [False, True], ids=["pooled", "new-mtls-connection-each"])
def test_issuer_rotation_under_load_loses_no_request(tmp_path: Path, new_connections: bool) -> None:
    # new_connections: every request opens a new mTLS connection, resuming TLS sessions across the
    # renewals (each proxy's new contexts start without them).
    flags = {"pool_max_idle_per_endpoint": "0"} if new_connections else {}
    p, _ = make_pair(tmp_path, lifetime="20s", identity_bundle_poll_interval="0.5s", **flags)
    ca = p.mesh.ca_dir
    try:
        with SteadyLoad("127.0.0.1", p.outbound.outbound_port, AUTHORITY) as load:
            wait_for(lambda: load.ok > 20, 20, what="traffic flowing")
            new = tmp_path / "issuer2"
            _tether("identity", "create-issuer", "--anchor-cert", str(ca / "ca.crt"), "--anchor-key",
                    str(ca / "ca.key"), "--out", str(new), "--identity-trust-domain", "cluster.local",
                    "--controller-namespace", p.mesh.cp_ns)
            new_issuer = (new / "tls.crt").read_text().strip()
            _replace(ca / "tls.key", (new / "tls.key").read_bytes())
            _replace(ca / "tls.crt", (new / "tls.crt").read_bytes())
            for proxy in (p.inbound, p.outbound):
                wait_for(lambda proxy=proxy: new_issuer in _issuer_of_leaf(p, proxy), 60,
                         what="leaf re-issued by the new issuer")
            done = load.ok
            wait_for(lambda: load.ok > done + 20, 20, what="traffic after rotation")
        assert load.outcomes.keys() == {"200"}, load.outcomes
        if new_connections:
            out_full, out_resumed, in_full, in_resumed = counts(p)
            # Full handshakes: the first, then about one per new client context (renewals) and per
            # refused ticket (the server's renewals); everything else resumed.
            assert out_resumed > 10 * out_full and in_resumed > 10 * in_full, counts(p)
            assert out_full >= 2, counts(p)
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_trust_anchor_rotation_under_load_loses_no_request(tmp_path: Path) -> None:
    p, _ = make_pair(tmp_path, lifetime="20s", identity_bundle_poll_interval="0.5s")
    ca = p.mesh.ca_dir
    try:
        with SteadyLoad("127.0.0.1", p.outbound.outbound_port, AUTHORITY) as load:
            wait_for(lambda: load.ok > 20, 20, what="traffic flowing")
            # 1. A new anchor, added to the bundle everyone trusts.
            b = tmp_path / "anchor-b"
            _tether("identity", "create-ca", "--out", str(b))
            bundle = tmp_path / "bundle.crt"
            _tether("identity", "bundle", str(ca / "ca.crt"), str(b / "ca.crt"), "--out", str(bundle))
            old_anchor = (ca / "ca.crt").read_bytes()
            _replace(ca / "ca.crt", bundle.read_bytes())
            b_pem = (b / "ca.crt").read_text().strip()
            for proxy in (p.inbound, p.outbound):
                wait_for(lambda proxy=proxy: b_pem in str(p.identity_json(proxy)["trust_anchors_pem"]), 30,
                         what="proxies trust both anchors")
            # 2. The issuer re-issued from the new anchor; leaves rotate onto it.
            issuer_b = tmp_path / "issuer-b"
            _tether("identity", "create-issuer", "--anchor-cert", str(b / "ca.crt"), "--anchor-key",
                    str(b / "ca.key"), "--trust-anchors", str(bundle), "--out", str(issuer_b),
                    "--identity-trust-domain", "cluster.local", "--controller-namespace", p.mesh.cp_ns)
            new_issuer = (issuer_b / "tls.crt").read_text().strip()
            _replace(ca / "tls.key", (issuer_b / "tls.key").read_bytes())
            _replace(ca / "tls.crt", (issuer_b / "tls.crt").read_bytes())
            for proxy in (p.inbound, p.outbound):
                wait_for(lambda proxy=proxy: new_issuer in _issuer_of_leaf(p, proxy), 60,
                         what="leaf re-issued under the new anchor")
            # 3. The old anchor removed.
            old_file = tmp_path / "old.crt"
            old_file.write_bytes(old_anchor)
            only_b = tmp_path / "only-b.crt"
            _tether("identity", "bundle", str(bundle), "--remove", str(old_file), "--out", str(only_b))
            _replace(ca / "ca.crt", only_b.read_bytes())
            old_pem = old_anchor.decode().strip()
            for proxy in (p.inbound, p.outbound):
                wait_for(lambda proxy=proxy: old_pem not in str(p.identity_json(proxy)["trust_anchors_pem"]), 30,
                         what="proxies dropped the old anchor")
            done = load.ok
            wait_for(lambda: load.ok > done + 20, 20, what="traffic after rotation")
        assert load.outcomes.keys() == {"200"}, load.outcomes
        # New handshakes now verify against anchor B alone.
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{p.inbound.inbound_port}",
                            "-servername", p.web.identity, "-CAfile", str(b / "ca.crt"), "-verify_return_error"],
                           input="", capture_output=True, text=True, timeout=20)
        assert "Verify return code: 0 (ok)" in r.stdout, r.stdout + r.stderr
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_issuer_expiry_metric_the_seed_alert_queries(pair: Pair) -> None:
    # The seeds' LinkerdCertificateExpiringSoon alert:
    #   (linkerd_identity_cert_expiration_timestamp_seconds - time()) / 86400 < 7
    import time

    from prometheus_client.parser import text_string_to_metric_families

    url = pair.mesh.identity_admin_urls[0] + "/metrics"
    families = {f.name: f for f in text_string_to_metric_families(http_get(url)[1].decode())}
    exp = families["linkerd_identity_cert_expiration_timestamp_seconds"].samples[0].value
    days_left = (exp - time.time()) / 86400
    assert 300 < days_left < 366  # create-ca's issuer lives a year: the alert stays quiet


def _greeter() -> tuple[socket.socket, int]:
    def greet(c: socket.socket) -> None:
        c.sendall(b"220 greetings\r\n")

    return tcp_server(greet)


@pytest.mark.parametrize("opaque", [True, False], ids=["opaque-port", "detect-timeout"])
def test_server_speaks_first_through_a_meshed_inbound(tmp_path: Path, opaque: bool) -> None:
    # With an identity the inbound listener peeks for a TLS ClientHello; a plaintext client of a
    # server-speaks-first app sends nothing, and must still reach the app: at once on an opaque
    # port, after the detection timeout otherwise.
    import socket

    srv, port = _greeter()
    mesh = LocalMesh(tmp_path)
    try:
        mesh.create_ca()
        mesh.start_identity()
        flags = {"inbound_app_addr": f"127.0.0.1:{port}", "detect_timeout": "1s"}
        if opaque:
            flags["opaque_ports"] = str(port)
        p = mesh.proxy(mesh.workload("db"), **flags)
        with socket.create_connection(("127.0.0.1", p.inbound_port)) as c:
            c.settimeout(10)
            assert c.recv(100) == b"220 greetings\r\n"
    finally:
        mesh.close()
        srv.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("hint", "flags", "connections"), [
    ("h2", {}, 1),  # hinted: both requests on one HTTP/2 connection
    (None, {}, 2),  # no hint (an older tether proxy there): HTTP/1, a second connection
    ("h2", {"outbound_h2_upgrade": "false"}, 2),  # turned off by the operator
], ids=["hinted", "no-hint", "upgrade-off"])
def test_http1_goes_over_http2_only_to_endpoints_hinted_h2(tmp_path: Path, hint: str | None,
                                                           flags: dict[str, str], connections: int) -> None:
    import threading

    p, _ = make_pair(tmp_path, hint=hint, **flags)
    try:
        slow: list[tuple[int, bytes]] = []
        t = threading.Thread(target=lambda: slow.append(p.get("/delay/3000")))
        t.start()
        # The slow request is at the application (its connection between the proxies busy, were it
        # HTTP/1); a second one now.
        wait_for(lambda: p.app.requests >= 1, 10, what="the slow request at the application")
        assert p.get() == (200, b"hello from web\n")
        t.join(10)
        assert slow and slow[0][0] == 200
        opened = [ln for ln in metric_lines(p.inbound, "tcp_open_total") if 'tls="true"' in ln]
        assert sum(int(float(ln.rsplit(" ", 1)[1])) for ln in opened) == connections, opened
    finally:
        p.mesh.close()
        p.app.shutdown()


def test_http1_rides_one_http2_connection_between_proxies_with_the_upgrade(tmp_path: Path) -> None:
    # An endpoint the destination hints h2: HTTP/1 requests to it go as HTTP/2 with l5d-orig-proto
    # (Linkerd's protocol between its proxies); the server proxy gives the application HTTP/1 again.
    import concurrent.futures
    import http.client

    p, _ = make_pair(tmp_path, hint="h2")
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: p.get(), range(40)))
        assert answers == [(200, b"hello from web\n")] * 40
        conn = http.client.HTTPConnection(p.outbound.host, p.outbound.outbound_port, timeout=30)
        try:
            body = os.urandom(1_000_001)
            conn.request("POST", "/echo", body=body, headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert (resp.status, resp.read() == body) == (200, True)
            # Content-Length crossed HTTP/2 both ways: the application got it (its echo answers with the
            # request's framing) and the client gets it back, not chunked.
            assert (resp.getheader("content-length"), resp.getheader("transfer-encoding")) == ("1000001", None)
            conn.request("GET", "/bytes/300000?chunked=1", headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert (resp.status, len(resp.read())) == (200, 300_000)
            assert resp.getheader("transfer-encoding") == "chunked"  # chunked stays chunked
            conn.request("GET", "/bytes/300000", headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert (resp.status, len(resp.read()), resp.getheader("content-length")) == (200, 300_000, "300000")
            conn.request("HEAD", "/bytes/5", headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("content-length"), resp.read()) == (200, "5", b"")
            conn.request("GET", "/headers", headers={"Host": AUTHORITY})
            resp = conn.getresponse()
            seen = json.loads(resp.read())
            # The application got HTTP/1.1 without the proxies' header; the client gets none either.
            assert resp.getheader("x-request-version") == "HTTP/1.1" and "l5d-orig-proto" not in seen
            assert resp.getheader("l5d-orig-proto") is None
        finally:
            conn.close()
        # An HTTP/1.0 client keeps its connection: the answer has a length to be framed by.
        with socket.create_connection((p.outbound.host, p.outbound.outbound_port), timeout=30) as c:
            f = c.makefile("rb")
            for _ in range(2):
                c.sendall(f"GET / HTTP/1.0\r\nHost: {AUTHORITY}\r\nConnection: keep-alive\r\n\r\n".encode())
                head = []
                while (line := f.readline()) not in (b"\r\n", b""):
                    head.append(line.lower())
                assert head[0].startswith(b"http/1.1 200") and b"connection: keep-alive\r\n" in head, head
                assert b"content-length: 15\r\n" in head and f.read(15) == b"hello from web\n"
        opened = metric_lines(p.inbound, "tcp_open_total")
        assert any('tls="true"' in ln and ln.endswith(" 1") for ln in opened), opened  # 40 at once, one connection
        inb = metric_lines(p.inbound, "request_total")
        assert any(f'client_id="{p.client.identity}"' in ln and ln.endswith(" 47") for ln in inb), inb
        # A request asking for a protocol upgrade keeps HTTP/1 (its own connection to the peer).
        conn = http.client.HTTPConnection(p.outbound.host, p.outbound.outbound_port, timeout=30)
        try:
            conn.request("GET", "/", headers={"Host": AUTHORITY, "Connection": "Upgrade", "Upgrade": "example/1"})
            assert conn.getresponse().status == 200  # (the application declines: no 101)
        finally:
            conn.close()
        opened = metric_lines(p.inbound, "tcp_open_total")
        assert any('tls="true"' in ln and ln.endswith(" 2") for ln in opened), opened
    finally:
        p.mesh.close()
        p.app.shutdown()
