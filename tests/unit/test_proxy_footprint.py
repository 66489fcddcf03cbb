"""What a meshed proxy loads: its control-plane clients ride on tether's own HTTP/2 client, its
identity needs neither grpcio nor cryptography, and its messages go through protolite, not protobuf.

grpcio cost a meshed proxy ~12 MiB of RSS and 7 threads (60.9 -> 48.5 MiB, 12 -> 5 threads), and
cryptography ~8 MiB more (docs/notes/issue-16.md); these keep them from coming back through an import.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tether.core.identity.authority import create_anchor, create_issuer
from tether.core.identity.certs import IssuerCredentials
from tether.core.identity.csr import validate_csr
from tether.core.identity.issuance import issue_leaf
from tether.core.identity.names import parse_identity_name

WEB = "web.shop.serviceaccount.identity.linkerd.cluster.local"
# hashlib: ~0.7 MiB of OpenSSL digests; tempfile brings shutil, bz2 and lzma (~0.5 MiB)
_HEAVY = ("grpc", "cryptography", "_cffi_backend", "hashlib", "tempfile", "bz2", "lzma")


def test_meshed_proxy_modules_do_not_load_grpcio() -> None:
    code = (
        "import sys; import tether.proxy.app, tether.proxy.identity, tether.proxy.destination, "
        "tether.proxy.grpc_client; print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_proxys_message_code_does_not_load_protobuf() -> None:
    """protobuf and the generated _pb2 modules cost a proxy ~6.5 MiB; protolite replaces them."""
    code = (
        "import sys; import tether.proxy.app, tether.proxy.identity, tether.proxy.destination, tether.proxy.policy, "
        "tether.proxy.inbound.policy, tether.proxy.inbound.policy_watch, tether.proxy.tap_wire, tether.proxy.tracing; "
        "print(sorted(m for m in sys.modules if m.startswith('google') or '_pb2' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# A proxy process from its config to a certified identity: the app's identity client (key and CSR
# from the key generator), an answer verified and installed, contexts built, /identity.json rendered.
_PROXY_SIDE = f"""
import sys
from types import SimpleNamespace
from tether.proxy.app import identity_client
from tether.proxy.config import ProxyConfig

c = identity_client(ProxyConfig(identity_name={WEB!r}, identity_token_path=sys.argv[1],
                                identity_trust_anchors=sys.argv[2], identity_addrs="127.0.0.1:1"))
print(c.csr_der.hex(), flush=True)
leaf, issuer = (bytes.fromhex(sys.stdin.readline().strip()) for _ in range(2))
c.install(c._verify(SimpleNamespace(leaf_certificate=leaf, intermediate_certificates=[issuer]), "test"))
c.server_ssl_context(), c.client_ssl_context(), c.identity_json()
print(c.ready, sorted({{m.split(".")[0] for m in sys.modules}} & set({_HEAVY!r})))
"""


def test_a_certified_meshed_proxy_never_loads_cryptography_or_grpcio(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    anchor, anchor_key = create_anchor("root", now)
    issuer, issuer_key = create_issuer("identity", anchor, anchor_key, now)
    anchors = tmp_path / "ca.crt"
    anchors.write_bytes(anchor.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "token").write_text("t")
    proc = subprocess.Popen([sys.executable, "-c", _PROXY_SIDE, str(tmp_path / "token"), str(anchors)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ident = parse_identity_name(WEB)
        csr = validate_csr(bytes.fromhex(proc.stdout.readline().strip()), ident)
        leaf = issue_leaf(IssuerCredentials(issuer, issuer_key), csr, ident, now)
        out, err = proc.communicate(leaf.leaf_der.hex() + "\n" + leaf.intermediates_der[0].hex() + "\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "True []"
