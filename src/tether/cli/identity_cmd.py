"""`tether identity`: show a workload's certificate, and make CAs for trying things out.

    tether identity [WORKLOAD | --admin-addr HOST:PORT]    the certificate a proxy is using
    tether identity create-ca --out DIR                    a trust anchor and an issuer
    tether identity create-issuer --anchor-cert F --anchor-key F --out DIR   a new issuer from an anchor
    tether identity bundle FILE... [--remove FILE] --out FILE  merge trust anchors (for rotation)

Server-side contract for the first form: the proxy admin server answers ``GET /identity.json`` with
``IdentityClient.identity_json()`` (keys ``identity``, ``ready``, ``certificate_chain_pem``, leaf first).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tether.cli.main import CliError

ACTIONS = ("create-ca", "create-issuer", "bundle")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "identity",
        help="show a workload's certificate; create-ca, create-issuer, bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _show_flags(p)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="WORKLOAD, or an action and its flags")
    p.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    rest: list[str] = list(args.rest)
    if rest and rest[0] in ACTIONS:
        action, rest = rest[0], rest[1:]
        makers = {"create-ca": _create_ca_parser, "create-issuer": _create_issuer_parser}
        parser = makers.get(action, _bundle_parser)()
        ns = parser.parse_args(rest)
        return int(ns.func(ns))
    # Flags before WORKLOAD were parsed already; parse what followed it into the same namespace.
    ns = _show_parser().parse_args(rest, namespace=args)
    return _show(ns)


# -- show ------------------------------------------------------------------------------------------


def _show_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tether identity", description="Show the certificate a proxy is using.")
    p.add_argument("workload", nargs="?", help="NAMESPACE/NAME of a local workload (its proxyAdmin address)")
    _show_flags(p)
    return p


def _show_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-addr", help="the proxy's admin address (default 127.0.0.1:4191)")
    p.add_argument("--state-dir", default=".tether", help="local state directory (workload registry)")
    p.add_argument("--timeout", type=float, default=5.0)


def _admin_addr(ns: argparse.Namespace) -> str:
    if ns.admin_addr:
        return str(ns.admin_addr)
    if ns.workload:
        from tether.platform.local.workloads import WorkloadError, WorkloadRegistry

        namespace, _, name = ns.workload.rpartition("/")
        try:
            w = WorkloadRegistry(ns.state_dir).get(namespace or "default", name)
        except WorkloadError as e:
            raise CliError(str(e)) from None
        if not w.proxy_admin:
            raise CliError(f"workload {w.key} has no proxyAdmin address; pass --admin-addr")
        return w.proxy_admin
    return "127.0.0.1:4191"


def describe_chain(chain: list[x509.Certificate], now: dt.datetime) -> str:
    """Human-readable certificate details: subject, SANs, issuer, validity and time left."""
    from tether.core.identity.certs import fingerprint, fmt_time, sans

    out = []
    for i, c in enumerate(chain):
        dns, uris = sans(c)
        left = c.not_valid_after_utc - now
        left_s = f"EXPIRED {_fmt_delta(-left)} ago" if left.total_seconds() <= 0 else _fmt_delta(left)
        out.append(f"{'Certificate' if i == 0 else 'Intermediate'} {i}:")
        out.append(f"  Subject:   {c.subject.rfc4514_string()}")
        if dns or uris:
            out.append(f"  SANs:      {', '.join([f'DNS:{d}' for d in dns] + [f'URI:{u}' for u in uris])}")
        out.append(f"  Issuer:    {c.issuer.rfc4514_string()}")
        out.append(f"  Validity:  {fmt_time(c.not_valid_before_utc)} to {fmt_time(c.not_valid_after_utc)}")
        out.append(f"  Time left: {left_s}")
        out.append(f"  Serial:    {c.serial_number:x}")
        out.append(f"  SHA-256:   {fingerprint(c)}")
    return "\n".join(out)


def _fmt_delta(d: dt.timedelta) -> str:
    s = int(d.total_seconds())
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d" if days else "") + f"{h}h{m:02d}m{s:02d}s"


def _show(ns: argparse.Namespace) -> int:
    addr = _admin_addr(ns)
    url = f"http://{addr}/identity.json"
    try:
        with urllib.request.urlopen(url, timeout=ns.timeout) as r:
            doc = json.loads(r.read(1 << 20))
    except urllib.error.HTTPError as e:
        raise CliError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CliError(f"cannot read {url}: {e}") from None
    print(f"Identity:  {doc.get('identity', '?')}")
    pem = str(doc.get("certificate_chain_pem") or "")
    if not doc.get("ready") or not pem:
        print("The proxy has no certificate yet (not ready): is the identity service reachable?")
        return 1
    chain = x509.load_pem_x509_certificates(pem.encode())
    print(describe_chain(chain, dt.datetime.now(dt.UTC)))
    return 0


# -- create-ca / create-issuer / bundle ------------------------------------------------------------


def _duration(text: str) -> dt.timedelta:
    from tether.proxy.config import ConfigError, parse_duration

    try:
        return dt.timedelta(seconds=parse_duration(text, "lifetime"))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CliError(f"{path} exists; pass --force to overwrite")
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _create_ca_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether identity create-ca",
        description="Create a trust anchor (ca.crt, ca.key) and an issuer signed by it (tls.crt, tls.key) in "
        "DIR, laid out like a kubernetes.io/tls Secret so DIR works as --issuer-dir. For trying tether "
        "out: production users bring their own PKI.",
    )
    p.add_argument("--out", required=True, help="directory to write into (created)")
    p.add_argument("--identity-trust-domain", "--trust-domain", dest="trust_domain", default="cluster.local")
    p.add_argument("--controller-namespace", default="linkerd")
    p.add_argument("--anchor-lifetime", type=_duration, default=dt.timedelta(days=3650))
    p.add_argument("--issuer-lifetime", type=_duration, default=dt.timedelta(days=365))
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_create_ca)
    return p


def _create_ca(ns: argparse.Namespace) -> int:
    from tether.core.identity.authority import create_anchor, create_issuer
    from tether.core.identity.certs import describe

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    suffix = f"{ns.controller_namespace}.{ns.trust_domain}"
    anchor, anchor_key = create_anchor(f"root.{suffix}", now, ns.anchor_lifetime)
    issuer, issuer_key = create_issuer(f"identity.{suffix}", anchor, anchor_key, now, ns.issuer_lifetime)
    pem = serialization.Encoding.PEM
    _write(out / "ca.crt", anchor.public_bytes(pem), False, ns.force)
    _write(out / "ca.key", _key_pem(anchor_key), True, ns.force)
    _write(out / "tls.crt", issuer.public_bytes(pem), False, ns.force)
    _write(out / "tls.key", _key_pem(issuer_key), True, ns.force)
    print(f"wrote {describe(anchor, 'trust anchor')} to {out / 'ca.crt'} (key ca.key)")
    print(f"wrote {describe(issuer, 'issuer')} to {out / 'tls.crt'} (key tls.key)")
    print(f"run: tether controller identity --issuer-dir {out}")
    return 0


def _create_issuer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether identity create-issuer",
        description="Issue a new issuer (tls.crt, tls.key) from an anchor (rotation step 2). OUT/ca.crt is "
        "written from --trust-anchors (default: the anchor alone).",
    )
    p.add_argument("--anchor-cert", required=True)
    p.add_argument("--anchor-key", required=True)
    p.add_argument("--trust-anchors", help="bundle to write as OUT/ca.crt (default: --anchor-cert)")
    p.add_argument("--out", required=True)
    p.add_argument("--identity-trust-domain", "--trust-domain", dest="trust_domain", default="cluster.local")
    p.add_argument("--controller-namespace", default="linkerd")
    p.add_argument("--lifetime", type=_duration, default=dt.timedelta(days=365))
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_create_issuer)
    return p


def _create_issuer(ns: argparse.Namespace) -> int:
    from tether.core.identity.authority import create_issuer
    from tether.core.identity.certs import (
        CertificateError,
        TrustBundle,
        describe,
        parse_certificates,
        parse_private_key,
    )

    try:
        anchor = parse_certificates(Path(ns.anchor_cert).read_bytes(), ns.anchor_cert)[0]
        anchor_key = parse_private_key(Path(ns.anchor_key).read_bytes(), ns.anchor_key)
        bundle_src = ns.trust_anchors or ns.anchor_cert
        bundle = TrustBundle.from_pem(Path(bundle_src).read_bytes(), bundle_src)
    except (OSError, CertificateError) as e:
        raise CliError(str(e)) from None
    if not bundle.is_anchor(anchor):
        raise CliError(f"{describe(anchor, 'anchor')} is not in the bundle {bundle_src}; add it first")
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    issuer, key = create_issuer(
        f"identity.{ns.controller_namespace}.{ns.trust_domain}", anchor, anchor_key, now, ns.lifetime
    )
    pem = serialization.Encoding.PEM
    # Key before certificate: a reloading identity service sees a mismatched pair at worst, never uses it.
    _write(out / "tls.key", _key_pem(key), True, ns.force)
    _write(out / "tls.crt", issuer.public_bytes(pem), False, ns.force)
    _write(out / "ca.crt", bundle.pem(), False, True)
    print(f"wrote {describe(issuer, 'issuer')} to {out / 'tls.crt'}")
    return 0


def _bundle_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether identity bundle",
        description="Merge trust anchors into one bundle (rotation steps 1 and 4): each FILE's anchors are "
        "added, each --remove FILE's anchors are dropped, duplicates collapse.",
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--remove", action="append", default=[])
    p.add_argument("--drop-expired", action="store_true", help="also drop anchors that have expired")
    p.add_argument("--out", help="write here (default: stdout)")
    p.set_defaults(func=_bundle)
    return p


def _bundle(ns: argparse.Namespace) -> int:
    from tether.core.identity.certs import (
        CertificateError,
        TrustBundle,
        certificates_pem,
        describe,
        fingerprint,
    )

    try:

        def read(f: str) -> tuple[x509.Certificate, ...]:
            return TrustBundle.from_pem(Path(f).read_bytes(), f).anchors

        anchors = [a for f in ns.files for a in read(f)]
        removed = {fingerprint(a) for f in ns.remove for a in read(f)}
    except (OSError, CertificateError) as e:
        raise CliError(str(e)) from None
    now = dt.datetime.now(dt.UTC)
    keep = []
    seen: set[str] = set()
    for a in anchors:
        fp = fingerprint(a)
        if fp in seen or fp in removed or (ns.drop_expired and a.not_valid_after_utc <= now):
            continue
        seen.add(fp)
        keep.append(a)
    if not keep:
        raise CliError("the bundle would be empty")
    data = certificates_pem(keep)
    if ns.out:
        Path(ns.out).write_bytes(data)
        for a in keep:
            print(f"  {describe(a, 'anchor')}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0
