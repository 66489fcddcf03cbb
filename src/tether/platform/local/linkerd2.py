"""Linkerd's own proxy (linkerd2-proxy) as a local pod's sidecar, on tether's control plane.

With the annotation ``local.tether.io/linkerd2-proxy: /path/to/linkerd2-proxy`` a pod's proxy is
that binary instead of tether's: the same ports (4143 inbound, 4140 outbound, 4191 admin, 4190
control), the same iptables rules (it runs as uid 2102), its settings in the ``LINKERD2_PROXY_*``
environment Linkerd's injector would give it, and its identity documents (``key.p8``, ``csr.der``)
written as Linkerd's proxy-identity step writes them. It reaches the identity, destination and
policy services over TLS under their Linkerd names, as in a Linkerd cluster.

tether does not ship or build the binary: the operator brings one built from Linkerd's sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tether.core.identity.csr import build_csr, generate_key
from tether.core.identity.names import WorkloadIdentity

ANNOTATION = "local.tether.io/linkerd2-proxy"
# tether's default log spec names tether's targets; linkerd2-proxy's are "linkerd".
DEFAULT_LOG = "warn,linkerd=info"


def write_identity_documents(directory: Path, identity: WorkloadIdentity, uid: int | None) -> None:
    """A fresh P-256 key (PKCS#8 DER, ``key.p8``) and its CSR (DER, ``csr.der``) for ``identity``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = generate_key()
    docs = {
        "key.p8": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()),
        "csr.der": build_csr(key, identity),
    }
    for name, data in docs.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    if uid is not None:
        for p in (directory, *(directory / n for n in docs)):
            os.chown(p, uid, uid)


def proxy_env(*, namespace: str, pod: str, pod_ip: str, identity: str, token_path: Path, identity_dir: Path,
              trust_anchors_pem: str, identity_addr: str, identity_name: str, destination_addr: str,
              destination_name: str, cluster_domain: str, cluster_networks: str, inbound_ports: list[int],
              opaque_ports: tuple[str, ...], log_level: str | None) -> dict[str, str]:
    """The environment of a linkerd2-proxy sidecar (the variables Linkerd's injector sets)."""
    env = {
        "LINKERD2_PROXY_LOG": log_level or DEFAULT_LOG,
        "LINKERD2_PROXY_LOG_FORMAT": "plain",
        "LINKERD2_PROXY_INBOUND_LISTEN_ADDR": "0.0.0.0:4143",
        "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR": "127.0.0.1:4140",
        "LINKERD2_PROXY_ADMIN_LISTEN_ADDR": "0.0.0.0:4191",
        "LINKERD2_PROXY_CONTROL_LISTEN_ADDR": "0.0.0.0:4190",
        "LINKERD2_PROXY_INBOUND_IPS": pod_ip,
        "LINKERD2_PROXY_INBOUND_PORTS": ",".join(str(p) for p in inbound_ports),
        "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY": "all-unauthenticated",
        "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS": cluster_networks,
        "LINKERD2_PROXY_DESTINATION_PROFILE_SUFFIXES": f"svc.{cluster_domain}.",
        "LINKERD2_PROXY_DESTINATION_SVC_ADDR": destination_addr,
        "LINKERD2_PROXY_DESTINATION_SVC_NAME": destination_name,
        "LINKERD2_PROXY_DESTINATION_CONTEXT": json.dumps({"ns": namespace, "nodeName": "local", "pod": pod},
                                                         separators=(",", ":")),
        "LINKERD2_PROXY_POLICY_SVC_ADDR": destination_addr,
        "LINKERD2_PROXY_POLICY_SVC_NAME": destination_name,
        "LINKERD2_PROXY_POLICY_WORKLOAD": json.dumps({"ns": namespace, "pod": pod}, separators=(",", ":")),
        "LINKERD2_PROXY_IDENTITY_DIR": str(identity_dir),
        "LINKERD2_PROXY_IDENTITY_TOKEN_FILE": str(token_path),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": trust_anchors_pem,
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": identity,
        "LINKERD2_PROXY_IDENTITY_SVC_ADDR": identity_addr,
        "LINKERD2_PROXY_IDENTITY_SVC_NAME": identity_name,
        "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD": "10s",
    }
    if opaque_ports:
        env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] = ",".join(opaque_ports)
    return env
