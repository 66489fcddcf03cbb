"""A real Kubernetes control plane on loopback, for the `kube` test tier (issue 4).

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (three simulated nodes) run
as child processes, each in its own process group, on free 127.0.0.1 ports. The binaries come from
scripts/kube/build.sh; certificates and the service-account signing key are made here. Use it as a
context manager::

    with KubeCluster() as cluster:
        cluster.kubectl("get", "nodes")
        cluster.api.get("/api/v1/nodes")

or from a shell: ``python scripts/kube/cluster.py up``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[3]
KUBE_SCRIPTS = REPO_ROOT / "scripts" / "kube"
VERSIONS_FILE = KUBE_SCRIPTS / "versions.env"
BUILD_SCRIPT = KUBE_SCRIPTS / "build.sh"

# Everything build.sh puts in the bin directory; a cluster needs all of it.
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
KWOK_STAGES = "kwok-stages.yaml"

# kwok manages only nodes carrying this annotation (kwok's documented convention).
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
# The first address of SERVICE_CIDR: the `kubernetes` Service's ClusterIP, a SAN of the API cert.
KUBERNETES_SERVICE_IP = "10.96.0.1"

T = TypeVar("T")


class KubeClusterError(RuntimeError):
    """The cluster could not be built, started or stopped; the message says which part and why."""


class KubeAPIError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


# ---- versions and binaries ------------------------------------------------------------------------


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse versions.env (KEY=VALUE lines, # comments) into a dict."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        versions[key.strip()] = value.strip().strip("\"'")
    return versions


def cache_root() -> Path:
    """Root of the build cache; TETHER_KUBE_CACHE overrides ~/.cache/tether/kube (as in build.sh)."""
    override = os.environ.get("TETHER_KUBE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "tether" / "kube"


def default_bin_dir(versions: Mapping[str, str] | None = None) -> Path:
    """Where build.sh puts the binaries for the pinned Kubernetes version."""
    pinned = versions if versions is not None else read_versions()
    return cache_root() / pinned["KUBERNETES_VERSION"] / "bin"


# Where the official Go tarball installs; build.sh looks there too when `go` is not on PATH.
GO_FALLBACK = Path("/usr/local/go/bin/go")


def go_toolchain() -> str | None:
    """Path of the `go` command, or None when the toolchain is absent."""
    found = shutil.which("go")
    if found is None and os.access(GO_FALLBACK, os.X_OK):
        found = str(GO_FALLBACK)
    return found


def missing_binaries(bin_dir: Path) -> list[str]:
    """Names of the build outputs that bin_dir lacks (empty when the cluster can start)."""
    missing = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if not (bin_dir / KWOK_STAGES).is_file():
        missing.append(KWOK_STAGES)
    return missing


def build_binaries(timeout: float = 4 * 3600.0) -> Path:
    """Run scripts/kube/build.sh (a no-op when cached); its progress goes to stderr."""
    if go_toolchain() is None:
        raise KubeClusterError("the Go toolchain is not on PATH; scripts/kube/build.sh needs it")
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise KubeClusterError(f"scripts/kube/build.sh failed with exit code {done.returncode}")
    return Path(done.stdout.strip().splitlines()[-1])


# ---- certificates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    """A PEM certificate and key on disk."""

    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed ECDSA CA that issues serving and client certificates into a directory."""

    def __init__(self, directory: Path, name: str, validity: datetime.timedelta) -> None:
        self.directory = directory
        self.validity = validity
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        stem = name.replace(" ", "-")
        self.pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
        self.pair.cert.write_bytes(self.pem)
        _write_private(self.pair.key, _key_pem(self._key))

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        stem: str,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        server: bool = False,
        client: bool = False,
    ) -> CertPair:
        """Issue a leaf certificate and write it as <stem>.crt / <stem>.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + self.validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        pair = CertPair(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(pair.key, _key_pem(key))
        return pair


# ---- a small HTTPS client for the API server ---------------------------------------------------------


class KubeAPI:
    """JSON over HTTPS to the API server with the admin client certificate (stdlib only)."""

    def __init__(self, server: str, ca_file: Path, client: CertPair, timeout: float = 15.0) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file))
        self._tls.load_cert_chain(str(client.cert), str(client.key))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body (or text), raise KubeAPIError on >= 400."""
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._tls) as resp:
                raw = resp.read().decode()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raise KubeAPIError(method, path, err.code, err.read().decode(errors="replace")) from None
        if "json" in ctype and raw:
            return json.loads(raw)
        return raw

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, obj: Mapping[str, Any]) -> Any:
        return self.request("POST", path, obj)

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except KubeAPIError as err:
            if err.status == 404:
                return False
            raise
        return True


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_poll: Callable[[], None] | None = None,
) -> T:
    """Poll check() until it returns something other than None/False, or fail after timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if on_poll is not None:
            on_poll()
        try:
            result = check()
        except (OSError, KubeAPIError, ValueError) as err:
            last_error = err
            result = None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# ---- processes -------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the test process dies without cleaning up."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    ports: tuple[int, ...]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def free_loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now: all sockets are held until every port is picked."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---- the cluster -----------------------------------------------------------------------------------


@dataclass
class ClusterPorts:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def pick(cls) -> ClusterPorts:
        return cls(*free_loopback_ports(6))

    def all(self) -> tuple[int, ...]:
        return (
            self.etcd_client,
            self.etcd_peer,
            self.apiserver,
            self.controller_manager,
            self.scheduler,
            self.kwok,
        )


@dataclass
class StartTimings:
    """Seconds from start() to each milestone, for the note and for slow-machine diagnosis."""

    milestones: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, since: float) -> None:
        self.milestones[name] = round(time.monotonic() - since, 2)


class KubeCluster:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok nodes on 127.0.0.1.

    start() returns when the API server is ready, the controllers and scheduler are healthy, every
    node is Ready and the default namespace has its service account; stop() ends every process
    group and checks that no port is left listening. A context manager does both.
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        start_timeout: float = 240.0,
        stop_timeout: float = 20.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.versions = read_versions()
        self.bin_dir = bin_dir if bin_dir is not None else default_bin_dir(self.versions)
        self.node_names = [f"kwok-node-{i}" for i in range(nodes)]
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._log = log or (lambda _msg: None)
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tether-kube-"))
        self.pki_dir = self.workdir / "pki"
        self.log_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.ports = ClusterPorts.pick()
        self.server = f"https://127.0.0.1:{self.ports.apiserver}"
        self.timings = StartTimings()
        self.start_seconds: float | None = None
        self._components: list[_Component] = []
        self._api: KubeAPI | None = None
        self._ca: CertificateAuthority | None = None
        self._stopped = True

    # -- public surface --

    @property
    def api(self) -> KubeAPI:
        if self._api is None:
            raise KubeClusterError("the cluster is not started")
        return self._api

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            raise KubeClusterError("the cluster is not started")
        return self._ca

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm subprocesses: this cluster's kubeconfig, helm state in workdir."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        helm_home = self.workdir / "helm"
        env["HELM_CACHE_HOME"] = str(helm_home / "cache")
        env["HELM_CONFIG_HOME"] = str(helm_home / "config")
        env["HELM_DATA_HOME"] = str(helm_home / "data")
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 60.0) -> str:
        """Run kubectl against this cluster; return stdout, raise with stderr on failure."""
        return self._run_tool("kubectl", args, stdin, timeout)

    def delete(self, *args: str, stdin: str | None = None, timeout: float = 240.0) -> None:
        """`kubectl delete ARGS` (or the objects of the manifests in stdin with `-f -`), then wait until
        every one of them is gone.

        A CRD can stay Terminating for minutes: its deletion restarts the resource's watch cache, the
        API server's CRD finalizer may list the instances while that cache is still initializing
        ("storage is (re)initializing"), and the retry of that failure is sometimes never run (seen
        here about once in four deletions of tether's CRDs; operator-framework/operator-controller#1437
        describes the same). Any change to the CRD queues its finalizer again, so a CRD still there
        after a few seconds gets a fresh annotation every few seconds until it goes."""
        self.kubectl("delete", "--ignore-not-found", "--wait=false", *args, stdin=stdin, timeout=timeout)
        nudges = 0
        last_nudge = time.monotonic()

        def gone() -> bool:
            nonlocal nudges, last_nudge
            left = self.kubectl("get", "--ignore-not-found", "-o", "name", *args, stdin=stdin).split()
            if left and time.monotonic() - last_nudge >= 5.0:
                nudges += 1
                last_nudge = time.monotonic()
                for name in left:
                    if name.startswith("customresourcedefinition"):
                        # The CRD may go between the get and this: ignore not-found.
                        subprocess.run([str(self.binary("kubectl")), "annotate", name, "--overwrite",
                                        f"tether.test/finalizer-requeue={nudges}"],
                                       env=self.env(), capture_output=True, timeout=30, check=False)
            return not left

        wait_until(gone, timeout=timeout, what=f"kubectl delete {' '.join(args)} to finish", interval=0.5)

    def helm(self, *args: str, timeout: float = 180.0) -> str:
        """Run helm against this cluster; return stdout, raise with stderr on failure."""
        return self._run_tool("helm", args, None, timeout)

    def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create a namespace and wait until its default service account exists (pods need it)."""
        self.api.create(
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels or {})},
            },
        )
        wait_until(
            lambda: self.api.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
            timeout=60,
            what=f"service account default in namespace {name}",
        )

    @contextlib.contextmanager
    def namespaces(self, *prefixes: str) -> Iterator[tuple[str, ...]]:
        """One fresh namespace per prefix (PREFIX-<6 hex>, the same suffix for all) for one test;
        deleted afterwards without waiting (nothing reuses their names)."""
        suffix = os.urandom(3).hex()
        names = tuple(f"{prefix}-{suffix}" for prefix in prefixes)
        for name in names:
            self.create_namespace(name)
        try:
            yield names
        finally:
            for name in names:
                self.kubectl("delete", "namespace", name, "--wait=false")

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle --

    def start(self) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise KubeClusterError(f"missing in {self.bin_dir}: {', '.join(missing)}; run scripts/kube/build.sh")
        began = time.monotonic()
        self._stopped = False
        atexit.register(self.stop)
        try:
            self._start(began)
        except BaseException:
            # Tear down what did start; the start failure is the error worth reporting.
            with contextlib.suppress(KubeClusterError):
                self.stop()
            raise
        self.start_seconds = round(time.monotonic() - began, 2)
        self._log(f"cluster ready in {self.start_seconds}s: {self.timings.milestones}")

    def _start(self, began: float) -> None:
        for directory in (self.pki_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        pki = self._make_pki()
        self.timings.mark("pki", began)
        deadline = began + self.start_timeout

        def remaining() -> float:
            return max(1.0, deadline - time.monotonic())

        etcd = self._spawn("etcd", self._etcd_args(), (self.ports.etcd_client, self.ports.etcd_peer))
        wait_until(
            lambda: self._http_ok(f"http://127.0.0.1:{self.ports.etcd_client}/health", "true"),
            timeout=remaining(),
            what="etcd /health",
            on_poll=lambda: self._check_alive(etcd),
        )
        self.timings.mark("etcd", began)

        apiserver = self._spawn("kube-apiserver", self._apiserver_args(pki), (self.ports.apiserver,))
        self._api = KubeAPI(self.server, pki["ca"].cert, pki["admin"])
        wait_until(
            lambda: self.api.get("/readyz") == "ok",
            timeout=remaining(),
            what="kube-apiserver /readyz",
            on_poll=lambda: self._check_alive(apiserver),
        )
        self.timings.mark("kube-apiserver", began)
        self._write_kubeconfig(pki)

        controllers = [
            self._spawn(
                "kube-controller-manager",
                self._controller_manager_args(pki),
                (self.ports.controller_manager,),
            ),
            self._spawn("kube-scheduler", self._scheduler_args(pki), (self.ports.scheduler,)),
            self._spawn("kwok", self._kwok_args(), (self.ports.kwok,)),
        ]

        def all_alive() -> None:
            for component in self._components:
                self._check_alive(component)

        # The controller-manager and scheduler serve certificates from our CA, so verify them.
        tls = ssl.create_default_context(cafile=str(pki["ca"].cert))
        for component in controllers[:2]:
            healthz = f"https://127.0.0.1:{component.ports[0]}/healthz"
            wait_until(
                functools.partial(self._http_ok, healthz, "ok", tls),
                timeout=remaining(),
                what=f"{component.name} /healthz",
                on_poll=all_alive,
            )
        wait_until(
            lambda: self._http_ok(f"http://127.0.0.1:{self.ports.kwok}/healthz", "ok"),
            timeout=remaining(),
            what="kwok /healthz",
            on_poll=all_alive,
        )
        self.timings.mark("controllers", began)

        for index, name in enumerate(self.node_names):
            self.api.create("/api/v1/nodes", self._node_manifest(name, index))
        wait_until(
            self._nodes_ready,
            timeout=remaining(),
            what=f"{len(self.node_names)} kwok nodes Ready",
            on_poll=all_alive,
        )
        # Node status is dropped on create and kwok's initialize stage writes addresses without an
        # InternalIP; its heartbeat keeps whatever addresses are there, so add them once Ready.
        for index, name in enumerate(self.node_names):
            self.api.merge_patch(
                f"/api/v1/nodes/{name}/status",
                {
                    "status": {
                        "addresses": [
                            {"type": "InternalIP", "address": self.node_internal_ip(index)},
                            {"type": "Hostname", "address": name},
                        ]
                    }
                },
            )
        wait_until(
            lambda: self._nodes_ready(with_address=True),
            timeout=remaining(),
            what="kwok nodes keeping their InternalIP",
            on_poll=all_alive,
        )
        self.timings.mark("nodes-ready", began)
        wait_until(
            lambda: (
                self.api.exists("/api/v1/namespaces/default/serviceaccounts/default")
                and self.api.exists("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
            ),
            timeout=remaining(),
            what="default service account and kube-root-ca.crt",
            on_poll=all_alive,
        )
        self.timings.mark("ready", began)

    def stop(self) -> None:
        """End every component (newest first), then make sure none of our ports is still listening."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        problems: list[str] = []
        for component in reversed(self._components):
            problems.extend(self._terminate(component))
        deadline = time.monotonic() + self.stop_timeout
        for port in self.ports.all():
            while port_is_listening(port) and time.monotonic() < deadline:
                time.sleep(0.1)
            if port_is_listening(port):
                problems.append(f"port {port} still listening after stop")
        self._components.clear()
        if self._own_workdir and not problems and not os.environ.get("TETHER_KUBE_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if problems:
            raise KubeClusterError("; ".join(problems) + f" (logs in {self.log_dir})")

    def _terminate(self, component: _Component) -> list[str]:
        proc = component.process
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout / 2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout / 2)
        # Anything else left in the group (none of these binaries forks, but be sure).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return [] if proc.returncode is not None else [f"{component.name} (pid {proc.pid}) did not exit"]

    # -- helpers --

    def _spawn(self, name: str, args: list[str], ports: tuple[int, ...]) -> _Component:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(self.binary(name)), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        component = _Component(name, process, log, ports)
        self._components.append(component)
        self._log(f"started {name} (pid {process.pid}) log {log}")
        return component

    @staticmethod
    def _check_alive(component: _Component) -> None:
        code = component.process.poll()
        if code is not None:
            raise KubeClusterError(f"{component.name} exited with code {code}; last log lines:\n{component.log_tail()}")

    @staticmethod
    def _http_ok(url: str, expect: str, context: ssl.SSLContext | None = None) -> bool:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            return expect in resp.read().decode()

    @staticmethod
    def node_internal_ip(index: int) -> str:
        """The InternalIP recorded on kwok node <index>: a label only, nothing listens there."""
        return f"10.250.0.{index + 1}"

    def _nodes_ready(self, with_address: bool = False) -> bool:
        items = self.api.get("/api/v1/nodes")["items"]
        ready = set()
        for node in items:
            status = node.get("status", {})
            if not any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])):
                continue
            if with_address and not any(a["type"] == "InternalIP" for a in status.get("addresses") or []):
                continue
            ready.add(node["metadata"]["name"])
        return set(self.node_names) <= ready

    def _run_tool(self, tool: str, args: Sequence[str], stdin: str | None, timeout: float) -> str:
        done = subprocess.run(
            [str(self.binary(tool)), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise KubeClusterError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    # -- configuration --

    def _make_pki(self) -> dict[str, CertPair]:
        validity = datetime.timedelta(days=2)
        ca = CertificateAuthority(self.pki_dir, "tether-kube-ca", validity)
        self._ca = ca
        front_proxy_ca = CertificateAuthority(self.pki_dir, "tether-front-proxy-ca", validity)
        pki = {"ca": ca.pair, "front-proxy-ca": front_proxy_ca.pair}
        pki["apiserver"] = ca.issue(
            "apiserver",
            "kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ip_addresses=["127.0.0.1", KUBERNETES_SERVICE_IP],
            server=True,
        )
        # Admin for people, tests, the controller-manager, the scheduler and kwok alike: the cluster
        # is a throwaway on loopback, and one identity keeps the kubeconfig single.
        pki["admin"] = ca.issue("admin", "tether-admin", organizations=["system:masters"], client=True)
        pki["apiserver-kubelet-client"] = ca.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            organizations=["system:masters"],
            client=True,
        )
        pki["front-proxy-client"] = front_proxy_ca.issue("front-proxy-client", "front-proxy-client", client=True)
        for name in ("kube-controller-manager", "kube-scheduler"):
            pki[name] = ca.issue(
                f"{name}-serving", name, dns_names=["localhost"], ip_addresses=["127.0.0.1"], server=True
            )
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sa = CertPair(self.pki_dir / "sa.pub", self.pki_dir / "sa.key")
        _write_private(sa.key, _key_pem(sa_key))
        sa.cert.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        pki["service-account"] = sa
        return pki

    def _write_kubeconfig(self, pki: Mapping[str, CertPair]) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "tether-kube",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": b64(pki["ca"].cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "tether-admin",
                    "user": {
                        "client-certificate-data": b64(pki["admin"].cert),
                        "client-key-data": b64(pki["admin"].key),
                    },
                }
            ],
            "contexts": [{"name": "tether-kube", "context": {"cluster": "tether-kube", "user": "tether-admin"}}],
            "current-context": "tether-kube",
            "preferences": {},
        }
        # JSON is YAML: every Kubernetes client reads it.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        return [
            "--name=tether",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=tether={peer}",
            "--initial-cluster-state=new",
            # A throwaway store: durability buys nothing and fsync costs seconds on a busy disk.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, pki: Mapping[str, CertPair]) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports.apiserver}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki['apiserver'].cert}",
            f"--tls-private-key-file={pki['apiserver'].key}",
            f"--client-ca-file={pki['ca'].cert}",
            f"--kubelet-client-certificate={pki['apiserver-kubelet-client'].cert}",
            f"--kubelet-client-key={pki['apiserver-kubelet-client'].key}",
            # TokenReview and TokenRequest: the API server signs and verifies projected SA tokens.
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki['service-account'].cert}",
            f"--service-account-signing-key-file={pki['service-account'].key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # On by default; named so that a change of defaults cannot silently drop them.
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,"
            "ValidatingAdmissionWebhook",
            "--allow-privileged=true",
            # The aggregation layer (APIService backends) authenticates with the front-proxy pair.
            f"--requestheader-client-ca-file={pki['front-proxy-ca'].cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki['front-proxy-client'].cert}",
            f"--proxy-client-key-file={pki['front-proxy-client'].key}",
            # 127.0.0.1 is not a valid endpoint address for the `kubernetes` Service: publish none.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self, pki: Mapping[str, CertPair]) -> list[str]:
        kubeconfig = str(self.kubeconfig)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports.controller_manager}",
            f"--tls-cert-file={pki['kube-controller-manager'].cert}",
            f"--tls-private-key-file={pki['kube-controller-manager'].key}",
            "--leader-elect=false",
            # All default controllers: deployment, replicaset, endpointslice, serviceaccount,
            # serviceaccount-token, namespace, garbage collector, node lifecycle, root CA publisher...
            "--controllers=*",
            f"--service-account-private-key-file={pki['service-account'].key}",
            f"--root-ca-file={pki['ca'].cert}",
            f"--cluster-signing-cert-file={pki['ca'].cert}",
            f"--cluster-signing-key-file={pki['ca'].key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_args(self, pki: Mapping[str, CertPair]) -> list[str]:
        kubeconfig = str(self.kubeconfig)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports.scheduler}",
            f"--tls-cert-file={pki['kube-scheduler'].cert}",
            f"--tls-private-key-file={pki['kube-scheduler'].key}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _kwok_args(self) -> list[str]:
        key, value = KWOK_NODE_ANNOTATION
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom",
            f"--server-address=127.0.0.1:{self.ports.kwok}",
            "--node-lease-duration-seconds=40",
        ]

    def _node_manifest(self, name: str, index: int) -> dict[str, Any]:
        key, value = KWOK_NODE_ANNOTATION
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "topology.kubernetes.io/zone": f"zone-{index}",
                },
            },
            # kwok hands out pod IPs from the node's podCIDR, so each node gets its own range.
            "spec": {"podCIDR": f"10.244.{index}.0/24", "podCIDRs": [f"10.244.{index}.0/24"]},
        }


# ---- command line --------------------------------------------------------------------------------


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into SystemExit so `with KubeCluster()` unwinds and tears down.

    SIGINT is set explicitly: a shell starts background jobs with it ignored, and Python then
    never raises KeyboardInterrupt.
    """

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    """`up`: build if needed, start a cluster, print how to use it, run until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="scripts/kube/cluster.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster and keep it until interrupted")
    up.add_argument("--nodes", type=int, default=3, help="number of kwok nodes (default 3)")
    up.add_argument("--workdir", type=Path, help="directory for certificates, data and logs (default: temp)")
    up.add_argument("--no-build", action="store_true", help="fail instead of running build.sh")
    sub.add_parser("build", help="run scripts/kube/build.sh")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"[kube] {message}", file=sys.stderr, flush=True)

    if args.command == "build":
        print(build_binaries())
        return 0
    bin_dir = default_bin_dir()
    if missing_binaries(bin_dir):
        if args.no_build:
            say(f"missing binaries in {bin_dir}: {', '.join(missing_binaries(bin_dir))}")
            return 2
        bin_dir = build_binaries()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with _signals_raise():
        try:
            with KubeCluster(nodes=args.nodes, bin_dir=bin_dir, workdir=args.workdir, log=say) as cluster:
                say(f"API server {cluster.server}; logs in {cluster.log_dir}")
                print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
                print(f"export PATH={bin_dir}:$PATH", flush=True)
                say("press Ctrl-C to stop")
                while True:
                    signal.pause()
        except SystemExit as stop:
            say(f"stopped (signal {stop.code - 128 if isinstance(stop.code, int) else stop.code})")
    return 0
