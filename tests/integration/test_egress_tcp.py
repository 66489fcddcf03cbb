"""An EgressNetwork with trafficPolicy Deny refuses opaque TCP to the addresses it covers, in pods
with real interception: the client pod's proxy asks the control plane about the original
destination and closes the connection before any byte leaves; removing the EgressNetwork lets the
next connection through."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing import netns
from tether.testing.procs import Proc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.netns]

_reason = netns.available()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)

from test_transparent import _TCP_ECHO, metric_lines, start_pod_proxy  # noqa: E402

EGRESS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: EgressNetwork
metadata: {name: outside, namespace: default}
spec:
  networks: [{cidr: IP/32}]
  trafficPolicy: Deny
"""


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[netns.Pod, netns.Pod, Path, list[Proc]]]:
    net = netns.PodNetwork()
    procs: list[Proc] = []
    res = tmp_path / "resources"
    res.mkdir()
    try:
        control, client, outside = net.add_pod("control"), net.add_pod("client"), net.add_pod("outside")
        procs.append(Proc([sys.executable, "-m", "tether", "controller", "destination", "--addr", "0.0.0.0:8086",
                           "--admin-addr", "127.0.0.1:9996", "--resources-dir", str(res),
                           "--state-dir", str(tmp_path / "state")], tmp_path / "dst.log", netns=control.ns))
        wait_for(lambda: control.exec("curl", "-sf", "http://127.0.0.1:9996/ready", check=False).returncode == 0,
                 20, what="destination ready")
        procs.append(start_pod_proxy(client, tmp_path, "--destination-addrs", f"{control.ip}:8086",
                                     "--destination-context", '{"ns":"default"}'))
        procs.append(Proc([sys.executable, "-c", _TCP_ECHO], tmp_path / "tcp.log", netns=outside.ns))
        wait_for(lambda: client.exec("curl", "-sf", "http://127.0.0.1:4191/ready", check=False).returncode == 0,
                 20, what="client proxy ready")
        yield client, outside, res, procs
    finally:
        for p in procs:
            p.stop(5)
        net.close()


def _talk(client: netns.Pod, ip: str) -> str:
    script = (f"import socket; c = socket.create_connection(('{ip}', 9300), timeout=5); c.settimeout(5)\n"
              "try:\n    print(c.recv(100).decode().strip() or 'closed')\n"
              "except OSError as e:\n    print(type(e).__name__)")
    return client.exec(sys.executable, "-c", script).stdout.strip()


def test_a_denying_egress_network_refuses_opaque_connections(pods) -> None:  # type: ignore[no-untyped-def]
    client, outside, res, _ = pods
    wait_for(lambda: _talk(client, outside.ip) == "banner", 10, what="the outside server through the proxy")
    (res / "egress.yaml").write_text(EGRESS.replace("IP", outside.ip))
    # The client proxy watches the address's policy: the next connections are refused.
    wait_for(lambda: _talk(client, outside.ip) in ("closed", "ConnectionResetError"), 10,
             what="the EgressNetwork's Deny in force")
    errors = [ln for ln in metric_lines(client, "outbound_tcp_errors_total") if 'error="forbidden"' in ln]
    assert errors and f'target_addr="{outside.ip}:9300"' in errors[0], errors
    (res / "egress.yaml").unlink()
    wait_for(lambda: _talk(client, outside.ip) == "banner", 10, what="traffic allowed again")
