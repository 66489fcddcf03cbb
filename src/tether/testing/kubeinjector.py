"""`tether controller injector` as a host process the real API server calls: the chart's webhook
configurations, renamed for a test and pointed at the process with a url clientConfig."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tether.testing.kubecluster import KubeCluster, free_loopback_ports, wait_until

MUTATING = "tether-test-proxy-injector"
VALIDATING = "tether-test-policy-validator"


@dataclass
class Injector:
    proc: subprocess.Popen[bytes] | None
    args: list[str]
    admin: str
    log: Path
    env: dict[str, str] | None = None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def requests(self) -> int:
        m = re.search(r'proxy_inject_admission_requests_total\{webhook="inject"\} (\d+)', self.metrics())
        return int(m.group(1)) if m else 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"),
                                     env={**os.environ, **(self.env or {})})

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"injector exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.admin}/ready", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout=30, what="the injector's /ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None


def register_webhooks(cluster: KubeCluster, url: str, ca_pem: str, policy: str) -> None:
    """The chart's webhook configurations, renamed for this test and pointed at the host process."""
    out = subprocess.run([sys.executable, "-m", "tether", "install"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"].endswith("WebhookConfiguration")]
    for doc in docs:
        mutating = doc["kind"] == "MutatingWebhookConfiguration"
        doc["metadata"] = {"name": MUTATING if mutating else VALIDATING}
        for hook in doc["webhooks"]:
            hook["clientConfig"] = {"url": f"{url}/{'inject' if mutating else 'validate'}",
                                    "caBundle": base64.b64encode(ca_pem.encode()).decode()}
            hook["failurePolicy"] = policy
            hook["timeoutSeconds"] = 5
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(docs))


def start_injector(cluster: KubeCluster, workdir: Path, values: str, policy: str,
                   probe_pod: Callable[[str, dict[str, str]], dict[str, Any]], controller_namespace: str = "linkerd",
                   env: dict[str, str] | None = None) -> Injector:
    """The injector reading ``values`` (linkerd-config's values text), hooked into the API server; returns
    once the API server injects a dry-run pod made by ``probe_pod(name, annotations)``. ``env`` is added
    to its environment (another release's sources on PYTHONPATH)."""
    from tether.cli.install_cmd import webhook_certificate

    workdir.mkdir(parents=True, exist_ok=True)
    crt, key, ca = webhook_certificate("linkerd", dt.datetime.now(dt.UTC), hosts=("127.0.0.1",))
    (workdir / "tls.crt").write_text(crt)
    (workdir / "tls.key").write_text(key)
    (workdir / "values.yaml").write_text(values)
    port, admin = free_loopback_ports(2)
    inj = Injector(None, [sys.executable, "-m", "tether", "controller", "injector", "--addr", f"127.0.0.1:{port}",
                          "--admin-addr", f"127.0.0.1:{admin}", "--tls-cert-file", str(workdir / "tls.crt"),
                          "--tls-key-file", str(workdir / "tls.key"), "--values-file", str(workdir / "values.yaml"),
                          "--kubeconfig", str(cluster.kubeconfig), "--controller-namespace", controller_namespace],
                   f"127.0.0.1:{admin}", workdir / "injector.log", env)
    inj.start()
    try:
        register_webhooks(cluster, f"https://127.0.0.1:{port}", ca, policy)
        # The API server picks webhook configurations up asynchronously: wait until a dry-run pod is injected
        # by this injector (its request counter moves).
        probe_ns = "t-inj-probe"
        if not cluster.api.exists(f"/api/v1/namespaces/{probe_ns}"):
            cluster.create_namespace(probe_ns)

        def hooked() -> bool:
            before = inj.requests()
            pod = cluster.api.request("POST", f"/api/v1/namespaces/{probe_ns}/pods",
                                      probe_pod("probe", {"linkerd.io/inject": "enabled"}), query={"dryRun": "All"})
            return any(c["name"] == "linkerd-proxy" for c in pod["spec"]["containers"]) and inj.requests() > before

        wait_until(hooked, timeout=60, what="the API server calling the injector")
    except BaseException:
        inj.stop()
        raise
    return inj


def remove_webhooks(cluster: KubeCluster) -> None:
    cluster.kubectl("delete", "--ignore-not-found", "mutatingwebhookconfiguration", MUTATING)
    cluster.kubectl("delete", "--ignore-not-found", "validatingwebhookconfiguration", VALIDATING)


@contextmanager
def running_injector(cluster: KubeCluster, workdir: Path, values: str, policy: str,
                     probe_pod: Callable[[str, dict[str, str]], dict[str, Any]],
                     controller_namespace: str = "linkerd") -> Iterator[Injector]:
    """start_injector for the length of a block, the webhooks removed at its end."""
    inj = start_injector(cluster, workdir, values, policy, probe_pod, controller_namespace)
    try:
        yield inj
    finally:
        inj.stop()
        remove_webhooks(cluster)
