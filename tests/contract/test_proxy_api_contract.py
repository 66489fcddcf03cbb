"""tether's control plane against an independent implementation of linkerd2-proxy-api v0.20.0.

The client (tests/contract/goclient, built by scripts/tools/build-goclient.sh) uses the Go stubs
published in github.com/linkerd/linkerd2-proxy-api at v0.20.0 and prints what it decoded as JSON
(proto field names). It calls real `tether controller destination` and `tether controller identity`
processes; the same program serves fixed Destination and policy answers that tether's own stubs decode.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from tether.api.gen import (
    destination_pb2,
    destination_pb2_grpc,
    inbound_pb2,
    inbound_pb2_grpc,
    net_pb2,
    outbound_pb2,
    outbound_pb2_grpc,
)
from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.procs import Proc, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "tests" / "fixtures" / "seeds"
WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: api-service, namespace: production}
spec:
  selector: {app: api-service}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {app: payments-api}
  ports: [{port: 8080}]
"""


@pytest.fixture(scope="module")
def goclient() -> Path:
    r = subprocess.run([str(ROOT / "scripts/tools/build-goclient.sh")], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"the Go contract client could not be built (needs Go and the module proxy): {r.stderr[-500:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def run(goclient: Path, *args: str) -> list[dict[str, Any]]:
    r = subprocess.run([str(goclient), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("plane")
    res = tmp / "resources"
    res.mkdir()
    (res / "services.yaml").write_text(SERVICES)
    for seed in ("004-serviceprofile.yaml", "003-authorization.yaml", "003-httproute-canary.yaml"):
        (res / seed).write_text((SEEDS / seed).read_text())
    reg = WorkloadRegistry(tmp / "state")
    reg.register(Workload("api-1", "production", "api", ("127.0.10.1",), (WorkloadPort(8080),), {"app": "api-service"}))
    reg.register(
        Workload(
            "payments-api-1", "payments", "payments", ("127.0.11.1",), (WorkloadPort(8080),), {"app": "payments-api"}
        )
    )
    reg.register(Workload("web", "shop", "web"))
    ca = tmp / "ca"
    r = subprocess.run([sys.executable, "-m", "tether", "identity", "create-ca", "--out", str(ca)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    dport, dadmin, iport, iadmin = free_port(), free_port(), free_port(), free_port()
    procs = [
        Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", f"127.0.0.1:{dport}",
              "--admin-addr", f"127.0.0.1:{dadmin}", "--resources-dir", str(res), "--state-dir", str(tmp / "state")],
             tmp / "dst.log"),
        Proc([sys.executable, "-m", "tether", "controller", "identity", "--addr", f"127.0.0.1:{iport}",
              "--admin-addr", f"127.0.0.1:{iadmin}", "--state-dir", str(tmp / "state"), "--issuer-dir", str(ca)],
             tmp / "identity.log"),
    ]  # fmt: skip
    try:
        for url in (f"http://127.0.0.1:{dadmin}/ready", f"http://127.0.0.1:{iadmin}/ready"):
            wait_for(partial(ready, url), 20, what=f"{url} ready")
        yield {
            "dst": f"127.0.0.1:{dport}",
            "identity": f"127.0.0.1:{iport}",
            "token": reg.token_path("shop", "web"),
        }
    finally:
        for p in procs:
            p.stop()


def ready(url: str) -> bool:
    return http_get(url)[0] == 200


def ipv4(addr: dict[str, Any]) -> str:
    return f"{ipaddress.IPv4Address(addr['ip']['ipv4'])}:{addr['port']}"


def test_destination_get(goclient: Path, plane: dict[str, Any]) -> None:
    (update,) = run(
        goclient, "-addr", plane["dst"], "-call", "get", "-path", "api-service.production.svc.cluster.local:8080"
    )
    (addr,) = update["add"]["addrs"]
    assert ipv4(addr["addr"]) == "127.0.10.1:8080"
    assert addr["weight"] == 10000
    assert (
        addr["tls_identity"]["dns_like_identity"]["name"]
        == "api.production.serviceaccount.identity.linkerd.cluster.local"
    )
    assert addr["protocol_hint"] == {"h2": {}}
    assert addr["metric_labels"]["pod"] == "api-1"
    assert update["add"]["metric_labels"] == {"namespace": "production", "service": "api-service"}
    (none,) = run(goclient, "-addr", plane["dst"], "-call", "get", "-path", "nope.production.svc.cluster.local:80")
    assert none == {"no_endpoints": {}}  # exists: false, the proto3 default, is not printed


def test_destination_get_profile(goclient: Path, plane: dict[str, Any]) -> None:
    (p,) = run(
        goclient, "-addr", plane["dst"], "-call", "profile", "-path", "api-service.production.svc.cluster.local:8080"
    )
    assert p["fully_qualified_name"] == "api-service.production.svc.cluster.local"
    assert [r["metrics_labels"]["route"] for r in p["routes"]] == [
        "GET /api/users",
        "POST /api/users",
        "GET /api/users/:id",
    ]
    get = p["routes"][0]
    assert get["is_retryable"] is True and get["timeout"] == "5s"
    assert get["condition"]["all"]["matches"] == [{"path": {"regex": "/api/users"}}, {"method": {"registered": "GET"}}]
    assert get["response_classes"] == [{"condition": {"status": {"min": 500, "max": 599}}, "is_failure": True}]
    assert "is_retryable" not in p["routes"][1]  # false
    assert p["retry_budget"] == {"retry_ratio": pytest.approx(0.2), "min_retries_per_second": 10, "ttl": "10s"}
    # tether's extension fields (retry limit, per-try timeout) are unknown to the published stubs: skipped.
    assert not any(k.startswith("tether") for r in p["routes"] for k in r)


def test_outbound_policies_watch(goclient: Path, plane: dict[str, Any]) -> None:
    (pol,) = run(
        goclient, "-addr", plane["dst"], "-call", "outbound", "-path", "payments-api.payments.svc.cluster.local:8080"
    )
    assert pol["metadata"]["resource"]["name"] == "payments-api"
    detect = pol["protocol"]["detect"]
    assert detect["timeout"] == "10s"
    (route,) = detect["http1"]["routes"]
    assert route["metadata"]["resource"] == {
        "group": "policy.linkerd.io", "kind": "HTTPRoute", "name": "payments-api-canary", "namespace": "payments"
    }  # fmt: skip
    backends = route["rules"][0]["backends"]["random_available"]["backends"]
    got = [(b["backend"]["backend"]["balancer"]["discovery"]["dst"]["path"], b["weight"]) for b in backends]
    assert got == [
        ("payments-api-stable.payments.svc.cluster.local:8080", 90),
        ("payments-api-canary.payments.svc.cluster.local:8080", 10),
    ]
    assert backends[0]["backend"]["backend"]["balancer"]["peak_ewma"] == {"default_rtt": "0.030s", "decay": "10s"}


def test_inbound_watch_port(goclient: Path, plane: dict[str, Any]) -> None:
    workload = json.dumps({"ns": "payments", "pod": "payments-api-1"})
    (srv,) = run(goclient, "-addr", plane["dst"], "-call", "inbound", "-workload", workload, "-port", "8080")
    assert "http2" in srv["protocol"]
    assert srv["labels"] == {"group": "policy.linkerd.io", "kind": "server", "name": "payments-api"}
    (authz,) = srv["authorizations"]
    assert authz["authentication"]["meshTLS"]["identities"]["identities"] == [
        {"name": "checkout.payments.serviceaccount.identity.linkerd.cluster.local"}
    ]
    assert {n["net"].get("prefix_len", 0) for n in authz["networks"]} == {0}  # 0.0.0.0/0 and ::/0


@pytest.mark.parametrize("with_uri", [False, True], ids=["dns-only-csr-as-linkerd", "dns-and-spiffe-csr"])
def test_identity_certify(goclient: Path, plane: dict[str, Any], with_uri: bool) -> None:
    # Linkerd's proxies send a CSR with the DNS name only (linkerd2's identity refuses URIs in a CSR);
    # either way the leaf carries both the DNS name and the SPIFFE id.
    spiffe = "spiffe://cluster.local/ns/shop/sa/web"
    args = ["-addr", plane["identity"], "-call", "certify", "-identity", WEB, "-token-file", str(plane["token"])]
    (out,) = run(goclient, *args, *(["-spiffe", spiffe] if with_uri else []))
    assert out["leaf_dns_names"] == [WEB]
    assert spiffe in out["leaf_uris"]
    assert out["intermediates"] >= 1
    assert out["valid_until_unix"] == out["leaf_not_after"]


LOOPBACK_80 = {"ip": {"ipv4": 2130706433}, "port": 80}
FORWARD_ROUTE = {
    "metadata": {"default": "egress"},
    "rules": [{"backends": {"first_available": {"backends": [{"backend": {"forward": {"addr": LOOPBACK_80}}}]}}}],
}
FORWARD_POLICY = {
    "metadata": {"default": "egress-fallback"},
    "protocol": {"detect": {"timeout": "10s", "http1": {"routes": [FORWARD_ROUTE]}}},
}


def test_go_fixed_answer_server_is_decoded_by_tethers_stubs(goclient: Path, tmp_path: Path) -> None:
    answers = {
        "get": {
            "web.shop.svc.cluster.local:80": [
                {"add": {"addrs": [{"addr": {"ip": {"ipv4": 2130706433}, "port": 8080}, "weight": 10000,
                                    "tls_identity": {"dns_like_identity": {"name": WEB}}}]}}
            ]
        },
        "profile": {
            "web.shop.svc.cluster.local:80": {
                "routes": [{"condition": {"path": {"regex": "/x"}}, "is_retryable": True, "timeout": "2s",
                            "metrics_labels": {"route": "x"}}],
                "dst_overrides": [{"authority": "a.shop.svc.cluster.local:80", "weight": 90000}],
            }
        },
        "outbound": {"127.0.0.1:80": FORWARD_POLICY},
        "inbound": {'{"ns":"shop","pod":"web"}:8080': {"protocol": {"http1": {}}, "labels": {"name": "web"}}},
    }  # fmt: skip
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    port = free_port()
    answers_file = str(tmp_path / "answers.json")
    server = Proc([str(goclient), "-call", "serve", "-listen", f"127.0.0.1:{port}", "-answers", answers_file],
                  tmp_path / "server.log")  # fmt: skip
    try:
        wait_for(lambda: "listening" in server.log(), 10, what="go server")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = destination_pb2_grpc.DestinationStub(ch)
            req = destination_pb2.GetDestination(path="web.shop.svc.cluster.local:80", context_token='{"ns":"shop"}')
            update = next(stub.Get(req, timeout=5))
            assert update.add.addrs[0].addr.ip.ipv4 == 2130706433
            assert update.add.addrs[0].tls_identity.dns_like_identity.name == WEB
            prof = next(stub.GetProfile(req, timeout=5))
            assert prof.routes[0].is_retryable and prof.routes[0].timeout.seconds == 2
            assert prof.dst_overrides[0].weight == 90000
            other = next(stub.Get(destination_pb2.GetDestination(path="x.y.svc.cluster.local:1"), timeout=5))
            assert other.WhichOneof("update") == "no_endpoints" and not other.no_endpoints.exists
            out = outbound_pb2_grpc.OutboundPoliciesStub(ch)
            spec = outbound_pb2.TrafficSpec(addr=net_pb2.TcpAddress(ip=net_pb2.IPAddress(ipv4=2130706433), port=80))
            pol = next(out.Watch(spec, timeout=5))
            fwd = pol.protocol.detect.http1.routes[0].rules[0].backends.first_available.backends[0].backend.forward
            assert pol.metadata.default == "egress-fallback" and fwd.addr.port == 80
            with pytest.raises(grpc.RpcError) as e:
                next(out.Watch(outbound_pb2.TrafficSpec(authority="nope:80"), timeout=5))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            inb = inbound_pb2_grpc.InboundServerPoliciesStub(ch)
            srv = next(inb.WatchPort(inbound_pb2.PortSpec(workload='{"ns":"shop","pod":"web"}', port=8080), timeout=5))
            assert srv.protocol.WhichOneof("kind") == "http1" and srv.labels["name"] == "web"
        assert '"context_token":"{\\"ns\\":\\"shop\\"}"' in server.log()
    finally:
        server.stop()


def test_go_server_answers_the_proxys_own_grpc_client(goclient: Path, tmp_path: Path) -> None:
    """The proxy's control-plane transport (gRPC over tether's HTTP/2 client, no grpcio) against grpc-go."""
    import asyncio

    from tether.proxy.destination import DestinationDiscovery, DestinationSettings
    from tether.proxy.grpc_client import GrpcChannel, GrpcError, Status

    answers = {
        "get": {
            "web.shop.svc.cluster.local:80": [
                {"add": {"addrs": [{"addr": {"ip": {"ipv4": 2130706433}, "port": 8080}, "weight": 10000,
                                    "tls_identity": {"dns_like_identity": {"name": WEB}}}]}}
            ]
        },
        "profile": {
            "web.shop.svc.cluster.local:80": {
                "routes": [{"condition": {"path": {"regex": "/x"}}, "is_retryable": True, "timeout": "2s",
                            "metrics_labels": {"route": "x"}}],
            }
        },
        "outbound": {"127.0.0.1:80": FORWARD_POLICY},
    }  # fmt: skip
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    port = free_port()
    server = Proc([str(goclient), "-call", "serve", "-listen", f"127.0.0.1:{port}",
                   "-answers", str(tmp_path / "answers.json")], tmp_path / "server.log")  # fmt: skip

    async def calls() -> None:
        ch = GrpcChannel(f"127.0.0.1:{port}")
        try:
            # The raw transport: a server stream decoded with the upstream messages.
            req = destination_pb2.GetDestination(path="web.shop.svc.cluster.local:80", context_token='{"ns":"shop"}')
            stream = ch.server_stream("/io.linkerd.proxy.destination.Destination/Get", req.SerializeToString())
            update = destination_pb2.Update.FromString(await anext(stream))
            await stream.aclose()  # the caller stops: the stream is reset, the connection stays usable
            assert update.add.addrs[0].tls_identity.dns_like_identity.name == WEB
            # The server's status reaches the caller with its code (grpc-go answers NOT_FOUND here).
            spec = outbound_pb2.TrafficSpec(authority="nope:80")
            with pytest.raises(GrpcError) as e:
                async for _ in ch.server_stream("/io.linkerd.proxy.outbound.OutboundPolicies/Watch",
                                                spec.SerializeToString()):
                    pass
            assert e.value.code == Status.NOT_FOUND
            # An unknown method: grpc-go's UNIMPLEMENTED.
            with pytest.raises(GrpcError) as e:
                await ch.unary("/io.linkerd.proxy.destination.Destination/Nope", b"", timeout=5)
            assert e.value.code == Status.UNIMPLEMENTED
        finally:
            ch.close()
        # The proxy's Discovery over that transport.
        dst = DestinationDiscovery(DestinationSettings((f"127.0.0.1:{port}",), '{"ns":"shop"}'))
        try:
            res = await dst.resolve("web.shop.svc.cluster.local:80")
            assert res is not None
            ep = res.endpoints.state.get(("127.0.0.1", 8080))
            assert ep is not None and ep.identity == WEB
            prof = await dst.profile("web.shop.svc.cluster.local:80")
            assert prof is not None
            assert len(prof.state.routes) == 1 and prof.state.routes[0].timeout == 2.0  # the first answer
            # OutboundPolicies.Watch over the same transport (grpc-go keys its answers by authority or address).
            pol = await dst.policy("127.0.0.1:80")
            assert pol is not None and pol.state is not None
        finally:
            await dst.aclose()

    try:
        wait_for(lambda: "listening" in server.log(), 10, what="go server")
        asyncio.run(asyncio.wait_for(calls(), 30))
    finally:
        server.stop()

