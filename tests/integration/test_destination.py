"""`tether controller destination` as a real process over a store directory, called with grpcio clients."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tether.api.gen import (
    destination_pb2,
    destination_pb2_grpc,
    inbound_pb2,
    inbound_pb2_grpc,
    outbound_pb2,
    outbound_pb2_grpc,
)
from tether.control.destination.translate import format_tcp_address
from tether.platform.local.workloads import Workload, WorkloadPort, WorkloadRegistry
from tether.testing.procs import Proc, free_port, http_get, wait_for

SEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "seeds"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: api-service, namespace: production}
spec:
  clusterIP: 10.96.0.10
  selector: {app: api-service}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: payments-api, namespace: payments}
spec:
  selector: {app: payments-api}
  ports: [{port: 8080}]
"""


class DestinationProc(Proc):
    def __init__(self, workdir: Path, name: str = "dst") -> None:
        self.port = free_port()
        self.admin_port = free_port()
        args = [
            sys.executable, "-m", "tether", "controller", "destination",
            "--addr", f"127.0.0.1:{self.port}", "--admin-addr", f"127.0.0.1:{self.admin_port}",
            "--resources-dir", str(workdir / "resources"), "--state-dir", str(workdir / "state"),
        ]  # fmt: skip
        super().__init__(args, workdir / f"{name}.log")
        wait_for(lambda: http_get(f"http://127.0.0.1:{self.admin_port}/ready")[0] == 200, 20, what=f"{name} ready")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin(self, path: str) -> str:
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")[1].decode()


class Stream:
    """A server stream read on a thread into a queue, so a test can wait for the next message with a deadline."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.q: queue.Queue[Any] = queue.Queue()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.q.put(msg)
        except grpc.RpcError as e:
            self.q.put(e)

    def next(self, timeout: float = 5.0) -> Any:
        item = self.q.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def close(self) -> None:
        self.call.cancel()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    res = tmp_path / "resources"
    res.mkdir()
    (res / "services.yaml").write_text(SERVICES)
    (res / "profile.yaml").write_text((SEEDS / "004-serviceprofile.yaml").read_text())
    (res / "authz.yaml").write_text((SEEDS / "003-authorization.yaml").read_text())
    (res / "canary.yaml").write_text((SEEDS / "003-httproute-canary.yaml").read_text())
    reg = WorkloadRegistry(tmp_path / "state")
    reg.register(Workload("api-1", "production", "api", ("127.0.10.1",), (WorkloadPort(8080),), {"app": "api-service"}))
    reg.register(
        Workload(
            "payments-api-1", "payments", "payments", ("127.0.11.1",), (WorkloadPort(8080),), {"app": "payments-api"}
        )
    )
    return tmp_path


@pytest.fixture
def dst(workdir: Path) -> Iterator[DestinationProc]:
    p = DestinationProc(workdir)
    try:
        yield p
    finally:
        p.stop()


def replace(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_get_snapshot_then_new_endpoint_within_a_second(dst: DestinationProc, workdir: Path) -> None:
    with grpc.insecure_channel(dst.addr) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        s = Stream(stub.Get(destination_pb2.GetDestination(path="api-service.production.svc.cluster.local:8080")))
        first = s.next()
        assert [format_tcp_address(a.addr) for a in first.add.addrs] == ["127.0.10.1:8080"]
        ident = first.add.addrs[0].tls_identity.dns_like_identity.name
        assert ident == "api.production.serviceaccount.identity.linkerd.cluster.local"
        t0 = time.monotonic()
        WorkloadRegistry(workdir / "state").register(
            Workload("api-2", "production", "api", ("127.0.10.2",), (WorkloadPort(8080),), {"app": "api-service"})
        )
        update = s.next(timeout=3)
        assert time.monotonic() - t0 < 1.0
        assert [format_tcp_address(a.addr) for a in update.add.addrs] == ["127.0.10.2:8080"]
        # By cluster IP, and a name nobody has (exists=false lets a proxy fall back to DNS).
        by_ip = Stream(stub.Get(destination_pb2.GetDestination(path="10.96.0.10:8080")))
        assert len(by_ip.next().add.addrs) == 2
        unknown = Stream(stub.Get(destination_pb2.GetDestination(path="nope.production.svc.cluster.local:80")))
        assert unknown.next() == destination_pb2.Update(no_endpoints=destination_pb2.NoEndpoints(exists=False))
        for x in (s, by_ip, unknown):
            x.close()


def test_profile_edit_reaches_open_stream_and_invalid_edit_keeps_old(dst: DestinationProc, workdir: Path) -> None:
    profile = workdir / "resources" / "profile.yaml"
    original = profile.read_text()
    with grpc.insecure_channel(dst.addr) as ch:
        stub = destination_pb2_grpc.DestinationStub(ch)
        s = Stream(
            stub.GetProfile(destination_pb2.GetDestination(path="api-service.production.svc.cluster.local:8080"))
        )
        first = s.next()
        assert [r.metrics_labels["route"] for r in first.routes] == [
            "GET /api/users",
            "POST /api/users",
            "GET /api/users/:id",
        ]
        assert first.routes[0].timeout.seconds == 5
        t0 = time.monotonic()
        replace(profile, original.replace("timeout: 5s", "timeout: 7s"))
        edited = s.next(timeout=3)
        assert time.monotonic() - t0 < 1.0
        assert edited.routes[0].timeout.seconds == 7
        # An invalid edit: the error becomes visible, and the stream keeps the last good profile.
        replace(profile, original.replace("pathRegex: /api/users\n", "pathRegex: '/api/users('\n", 1))
        errors = wait_for(lambda: json.loads(dst.admin("/store-errors.json"))["sourceErrors"], 3, what="store error")
        assert isinstance(errors, list)
        (err,) = errors
        assert err["source"] == str(profile)
        assert "spec.routes[0].condition.pathRegex: invalid regular expression '/api/users('" in err["errors"][0]
        assert "store_invalid_loads_total 1" in dst.admin("/metrics")
        assert "invalid regular expression" in dst.log()
        # The next message is the next valid edit: the invalid one never reached the stream.
        replace(profile, original.replace("timeout: 5s", "timeout: 9s"))
        after = s.next(timeout=3)
        assert after.routes[0].timeout.seconds == 9
        assert json.loads(dst.admin("/store-errors.json"))["sourceErrors"] == []
        s.close()


def test_outbound_and_inbound_policy_streams(dst: DestinationProc) -> None:
    with grpc.insecure_channel(dst.addr) as ch:
        out = outbound_pb2_grpc.OutboundPoliciesStub(ch)
        s = Stream(out.Watch(outbound_pb2.TrafficSpec(authority="payments-api.payments.svc.cluster.local:8080")))
        pol = s.next()
        (route,) = pol.protocol.detect.http1.routes
        assert route.metadata.resource.name == "payments-api-canary"
        assert [b.weight for b in route.rules[0].backends.random_available.backends] == [90, 10]
        s.close()
        inb = inbound_pb2_grpc.InboundServerPoliciesStub(ch)
        s2 = Stream(inb.WatchPort(inbound_pb2.PortSpec(workload='{"ns":"payments","pod":"payments-api-1"}', port=8080)))
        srv = s2.next()
        assert srv.labels["name"] == "payments-api"
        assert (
            srv.authorizations[0].authentication.meshTLS.identities.identities[0].name.startswith("checkout.payments.")
        )
        s2.close()
        with pytest.raises(grpc.RpcError) as e:
            Stream(out.Watch(outbound_pb2.TrafficSpec(authority="nope.payments.svc.cluster.local:80"))).next()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no Service named by 'nope.payments.svc.cluster.local'" in (e.value.details() or "")


def test_two_replicas_over_one_directory_serve_the_same_edit(dst: DestinationProc, workdir: Path) -> None:
    second = DestinationProc(workdir, "dst2")
    try:
        streams = []
        for p in (dst, second):
            ch = grpc.insecure_channel(p.addr)
            stub = destination_pb2_grpc.DestinationStub(ch)
            st = Stream(stub.GetProfile(destination_pb2.GetDestination(path="api-service.production:8080")))
            assert st.next().routes[0].timeout.seconds == 5
            streams.append((ch, st))
        profile = workdir / "resources" / "profile.yaml"
        replace(profile, profile.read_text().replace("timeout: 5s", "timeout: 6s"))
        for ch, st in streams:
            assert st.next(timeout=3).routes[0].timeout.seconds == 6
            st.close()
            ch.close()
    finally:
        second.stop()


def tether(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether", *args], capture_output=True, text=True, timeout=60)


def test_diagnostics_commands(dst: DestinationProc) -> None:
    flag = ["--destination-addr", dst.addr]
    r = tether("diagnostics", "endpoints", "api-service.production.svc.cluster.local:8080", *flag)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "IP", "PORT", "POD", "SERVICE"]
    assert lines[1].split() == ["production", "127.0.10.1", "8080", "api-1", "api-service"]
    r = tether("diagnostics", "endpoints", "api-service:8080", "-n", "production", "-o", "json", *flag)
    (row,) = json.loads(r.stdout)
    assert row["identity"] == "api.production.serviceaccount.identity.linkerd.cluster.local"
    assert row["protocolHint"] == "h2" and row["weight"] == 10000
    r = tether("diagnostics", "endpoints", "nope.production.svc.cluster.local:80", *flag)
    assert r.returncode == 1 and r.stderr == "No endpoints found for nope.production.svc.cluster.local:80\n"

    r = tether("diagnostics", "profile", "api-service.production.svc.cluster.local:8080", *flag)
    prof = json.loads(r.stdout)
    assert prof["routes"][0]["metrics_labels"] == {"route": "GET /api/users"}
    assert prof["routes"][0]["tether_max_retries"] == 3
    r = tether("diagnostics", "profile", "api-service.production.svc.cluster.local:8080", "-o", "table", *flag)
    assert r.stdout.splitlines()[1].split() == ["GET", "/api/users", "yes", "5s", "500-599"]

    r = tether("diagnostics", "policy", "po/payments-api-1", "8080", "-n", "payments", *flag)
    assert r.returncode == 0, r.stderr
    assert "name: payments-api\n" in r.stdout and "checkout.payments.serviceaccount" in r.stdout
    r = tether("diagnostics", "policy", "svc/payments-api", "8080", "-n", "payments", "-o", "json", *flag)
    assert json.loads(r.stdout)["metadata"]["resource"]["name"] == "payments-api"
    r = tether("diagnostics", "policy", "deploy/x", "80", *flag)
    assert r.returncode == 2 and "want po/NAME (inbound) or svc/NAME (outbound)" in r.stderr
    r = tether(
        "diagnostics", "endpoints", "a.b.svc.cluster.local:80", "--destination-addr", "127.0.0.1:1", "--timeout", "2"
    )
    assert r.returncode == 1 and "cannot reach the destination service at 127.0.0.1:1" in r.stderr


def test_an_admin_port_in_use_is_one_line_and_exit_1(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = tether(
            "controller", "destination", "--addr", "127.0.0.1:0", "--admin-addr", f"127.0.0.1:{port}",
            "--resources-dir", str(workdir / "resources"), "--state-dir", str(workdir / "state"),
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tether controller destination: cannot serve: ") and str(port) in last
