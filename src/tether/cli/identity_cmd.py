"""``tether identity``: show the certificate a proxy is using; make and rotate CAs.

    tether identity [WORKLOAD | --admin-addr HOST:PORT]     (the ``show`` subcommand)
    tether identity create-ca --out DIR
    tether identity create-issuer --anchor-cert F --anchor-key F --out DIR
    tether identity bundle FILE... [--remove FILE] [--out FILE]

Server-side contract of ``show``: the proxy admin server answers ``GET /identity.json`` with
``IdentityClient.identity_json()`` (keys ``identity``, ``ready``, ``certificate_chain_pem``, leaf first).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import dump, output_option
from tether.cli.params import (
    ADDRESS,
    POSITIVE_DURATION,
    control_plane_options,
    namespace_option,
    state_dir_option,
)

if TYPE_CHECKING:
    from cryptography import x509

DAY = 86400.0


class DefaultShowGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to ``show`` (Linkerd's
    ``linkerd identity POD`` form next to the CA subcommands)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Not while completing: `tether identity cr<TAB>` must offer the subcommands.
        if ctx.resilient_parsing:
            return super().parse_args(ctx, args)
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@click.group("identity", cls=DefaultShowGroup, short_help="show a proxy's certificate; create and rotate CAs")
def identity() -> None:
    """Show the certificate a workload's proxy is using (`tether identity WORKLOAD`, the `show`
    subcommand), and create trust anchors and issuers for trying tether out and for rotation.

    Anchor rotation without downtime: `bundle` the new anchor next to the old one, `create-issuer`
    from the new anchor, let the proxies renew, then `bundle --remove` the old anchor.
    """


# -- show ------------------------------------------------------------------------------------------


@identity.command("show", short_help="the certificate a proxy is using (the default)")
@click.argument("workload", required=False)
@namespace_option
@click.option("--admin-addr", type=ADDRESS, help="the proxy's admin address (instead of a registered WORKLOAD)")
@state_dir_option
@click.option("--timeout", type=POSITIVE_DURATION, default="5s", show_default=True,
              help="time allowed for the proxy's answer")
@output_option(("text", "json", "yaml"), default="text")
def show(workload: str | None, namespace: str, admin_addr: tuple[str, int] | None, state_dir: str,
         timeout: float, output: str) -> int:
    """Show the certificate chain a proxy is using: its identity, SANs, issuer and time left.

    WORKLOAD is NAME or NAMESPACE/NAME of a workload in the local registry (`tether workload
    list`); its proxy's admin address is read from there. --admin-addr asks a proxy directly
    (127.0.0.1:4191 is the default admin address of `tether proxy`).
    """
    addr, key = _admin_addr(workload, namespace, admin_addr, state_dir)
    url = f"http://{addr}/identity.json"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            doc = json.loads(r.read(1 << 20))
    except urllib.error.HTTPError as e:
        raise OperationFailed(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise OperationFailed(f"cannot read {url}: {reason}") from None
    pem = str(doc.get("certificate_chain_pem") or "")
    chain = _load_chain(pem, url) if pem else []
    now = dt.datetime.now(dt.UTC)
    ready = bool(doc.get("ready")) and bool(chain)
    if output != "text":
        dump({
            "workload": key,
            "adminAddr": addr,
            "identity": doc.get("identity"),
            "ready": ready,
            "certificates": [_cert_doc(c, now) for c in chain],
        }, output)
        return 0 if ready else 1
    click.echo(f"Identity:  {doc.get('identity', '?')}")
    if not ready:
        click.echo("The proxy has no certificate yet (not ready): is the identity service reachable?")
        return 1
    click.echo(describe_chain(chain, now))
    return 0


def _admin_addr(workload: str | None, namespace: str, admin_addr: tuple[str, int] | None,
                state_dir: str) -> tuple[str, str | None]:
    if admin_addr is not None:
        if workload:
            raise CliError("give either WORKLOAD or --admin-addr, not both")
        host = f"[{admin_addr[0]}]" if ":" in admin_addr[0] else admin_addr[0]
        return f"{host}:{admin_addr[1]}", None
    if not workload:
        raise CliError("give a WORKLOAD (NAME or NAMESPACE/NAME) or --admin-addr HOST:PORT")
    from tether.platform.local.workloads import WorkloadError, WorkloadRegistry

    ns, _, name = workload.rpartition("/")
    try:
        w = WorkloadRegistry(state_dir).get(ns or namespace, name)
    except WorkloadError as e:
        raise OperationFailed(f"{e} (--state-dir {state_dir})") from None
    if not w.proxy_admin:
        raise OperationFailed(
            f"workload {w.key} has no proxyAdmin address in {state_dir}: register it with "
            f"`tether workload register {w.name} -n {w.namespace} --proxy-admin HOST:PORT`, or pass --admin-addr"
        )
    return w.proxy_admin, w.key


def _load_chain(pem: str, source: str) -> list[x509.Certificate]:
    from tether.core.identity.certs import CertificateError, parse_certificates

    try:
        return parse_certificates(pem.encode(), source)
    except CertificateError as e:
        raise OperationFailed(str(e)) from None


def _cert_doc(c: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    from tether.core.identity.certs import fingerprint, fmt_time, sans

    dns, uris = sans(c)
    return {
        "subject": c.subject.rfc4514_string(),
        "dnsNames": dns,
        "uris": uris,
        "issuer": c.issuer.rfc4514_string(),
        "notBefore": fmt_time(c.not_valid_before_utc),
        "notAfter": fmt_time(c.not_valid_after_utc),
        "secondsLeft": int((c.not_valid_after_utc - now).total_seconds()),
        "serial": f"{c.serial_number:x}",
        "sha256": fingerprint(c),
    }


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


# -- create-ca / create-issuer / bundle ------------------------------------------------------------


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CliError(f"{path} exists; pass --force to overwrite")
    mode = 0o600 if private else 0o644
    # Written beside it and renamed over it: a reader (an identity service reloading its issuer
    # files) sees the old file or the new one, never a half-written one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OperationFailed(f"cannot write {path}: {e.strerror}") from None


def _mkdir(out: str, flag: str = "--out") -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"{flag} {out}: cannot create the directory: {e.strerror}") from None
    return path


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


@identity.command("create-ca", short_help="create a trust anchor and an issuer signed by it")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory to write into (created)")
@control_plane_options
@click.option("--anchor-lifetime", type=POSITIVE_DURATION, default="87600h", show_default=True,
              help="how long the trust anchor is valid (87600h: 10 years)")
@click.option("--issuer-lifetime", type=POSITIVE_DURATION, default="8760h", show_default=True,
              help="how long the issuer is valid (8760h: 1 year); at most --anchor-lifetime")
@click.option("--force", is_flag=True, help="overwrite existing files")
def create_ca(out: str, controller_namespace: str, trust_domain: str, anchor_lifetime: float,
              issuer_lifetime: float, force: bool) -> int:
    """Create a trust anchor (ca.crt, ca.key) and an issuer signed by it (tls.crt, tls.key) in OUT,
    laid out like a kubernetes.io/tls Secret so OUT works as `tether controller identity --issuer-dir`.

    For trying tether out: production users bring their own PKI (step, cert-manager, Vault).
    """
    from tether.core.identity.authority import create_anchor, create_issuer
    from tether.core.identity.certs import describe

    if issuer_lifetime > anchor_lifetime:
        raise CliError(
            "--issuer-lifetime: the issuer would outlive the trust anchor; make it at most --anchor-lifetime"
        )
    path = _mkdir(out)
    now = dt.datetime.now(dt.UTC)
    suffix = f"{controller_namespace}.{trust_domain}"
    anchor, anchor_key = create_anchor(f"root.{suffix}", now, dt.timedelta(seconds=anchor_lifetime))
    issuer, issuer_key = create_issuer(f"identity.{suffix}", anchor, anchor_key, now,
                                       dt.timedelta(seconds=issuer_lifetime))
    if not force:
        for name in ("ca.crt", "ca.key", "tls.crt", "tls.key"):
            if (path / name).exists():
                raise CliError(f"{path / name} exists; pass --force to overwrite")
    _write(path / "ca.crt", _cert_pem(anchor), False, force)
    _write(path / "ca.key", _key_pem(anchor_key), True, force)
    _write(path / "tls.crt", _cert_pem(issuer), False, force)
    _write(path / "tls.key", _key_pem(issuer_key), True, force)
    click.echo(f"wrote {describe(anchor, 'trust anchor')} to {path / 'ca.crt'} (key ca.key)")
    click.echo(f"wrote {describe(issuer, 'issuer')} to {path / 'tls.crt'} (key tls.key)")
    click.echo(f"run: tether controller identity --issuer-dir {path}")
    return 0


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot read: {e.strerror}") from None


@identity.command("create-issuer", short_help="issue a new issuer from a trust anchor (rotation)")
@click.option("--anchor-cert", required=True, metavar="PATH", help="the trust anchor's certificate (PEM)")
@click.option("--anchor-key", required=True, metavar="PATH", help="the trust anchor's private key (PEM, unencrypted)")
@click.option("--trust-anchors", metavar="PATH", help="bundle to write as OUT/ca.crt  [default: --anchor-cert]")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory to write into (created)")
@control_plane_options
@click.option("--lifetime", type=POSITIVE_DURATION, default="8760h", show_default=True,
              help="how long the issuer is valid (8760h: 1 year); must end before the anchor does")
@click.option("--force", is_flag=True, help="overwrite existing files")
def create_issuer(anchor_cert: str, anchor_key: str, trust_anchors: str | None, out: str,
                  controller_namespace: str, trust_domain: str, lifetime: float, force: bool) -> int:
    """Issue a new issuer (OUT/tls.crt, OUT/tls.key) from a trust anchor, rotation step 2.

    OUT/ca.crt is written from --trust-anchors. The anchor's key must belong to its certificate,
    the anchor must be in the bundle and valid now, and the issuer must expire before the anchor:
    each is refused otherwise, since an issuer that does not verify is an outage once it is loaded.
    """
    from tether.core.identity.authority import create_issuer as make_issuer
    from tether.core.identity.certs import (
        CertificateError,
        TrustBundle,
        chain_to_anchor,
        describe,
        fmt_time,
        is_ca,
        parse_certificates,
        parse_private_key,
        public_keys_match,
        validity_problem,
    )

    bundle_src, bundle_flag = (trust_anchors, "--trust-anchors") if trust_anchors else (anchor_cert, "--anchor-cert")
    try:
        anchor = parse_certificates(_read(anchor_cert, "--anchor-cert"), f"--anchor-cert {anchor_cert}")[0]
        key = parse_private_key(_read(anchor_key, "--anchor-key"), f"--anchor-key {anchor_key}")
        bundle = TrustBundle.from_pem(_read(bundle_src, bundle_flag), f"{bundle_flag} {bundle_src}")
    except CertificateError as e:
        raise CliError(str(e)) from None
    now = dt.datetime.now(dt.UTC)
    if not public_keys_match(anchor, key):
        raise CliError(f"--anchor-key {anchor_key} is not the key of --anchor-cert {anchor_cert} "
                       f"({describe(anchor, 'anchor')}): the issuer would not verify")
    if not is_ca(anchor):
        raise CliError(f"--anchor-cert {anchor_cert}: {describe(anchor, 'certificate')} is not a CA")
    if problem := validity_problem(anchor, now, "anchor"):
        raise CliError(f"--anchor-cert {anchor_cert}: {problem}")
    if not bundle.is_anchor(anchor):
        raise CliError(f"{describe(anchor, 'anchor')} is not in the bundle {bundle_src}; add it first "
                       "(tether identity bundle)")
    ends = now + dt.timedelta(seconds=lifetime)
    if ends > anchor.not_valid_after_utc:
        left = (anchor.not_valid_after_utc - now).total_seconds()
        raise CliError(f"--lifetime: the issuer would end {fmt_time(ends)}, after the anchor "
                       f"({fmt_time(anchor.not_valid_after_utc)}); use at most {int(left // 3600)}h")
    issuer, issuer_key = make_issuer(f"identity.{controller_namespace}.{trust_domain}", anchor, key, now,
                                     dt.timedelta(seconds=lifetime))
    try:
        # The result verifies against the bundle it is written with, or nothing is written.
        chain_to_anchor(issuer, (), bundle, now, "new issuer")
    except CertificateError as e:
        raise OperationFailed(f"the new issuer does not verify: {e}") from None
    path = _mkdir(out)
    for name in ("tls.key", "tls.crt"):
        if (path / name).exists() and not force:
            raise CliError(f"{path / name} exists; pass --force to overwrite")
    # Key before certificate: a reloading identity service sees a mismatched pair at worst, never uses it.
    _write(path / "tls.key", _key_pem(issuer_key), True, force)
    _write(path / "tls.crt", _cert_pem(issuer), False, force)
    _write(path / "ca.crt", bundle.pem(), False, True)
    click.echo(f"wrote {describe(issuer, 'issuer')} to {path / 'tls.crt'}")
    return 0


@identity.command("bundle", short_help="merge trust anchors into one bundle (rotation)")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--remove", multiple=True, metavar="PATH", help="drop the anchors in this file (repeatable)")
@click.option("--drop-expired", is_flag=True, help="also drop anchors that have expired")
@click.option("--out", metavar="PATH", help="write here  [default: stdout]")
def bundle(files: tuple[str, ...], remove: tuple[str, ...], drop_expired: bool, out: str | None) -> int:
    """Merge trust anchors into one bundle, rotation steps 1 and 4: each FILE's anchors are added,
    each --remove FILE's anchors are dropped, duplicates collapse."""
    from tether.core.identity.certs import CertificateError, TrustBundle, certificates_pem, describe, fingerprint

    def read(f: str, flag: str) -> tuple[x509.Certificate, ...]:
        try:
            return TrustBundle.from_pem(_read(f, flag), f).anchors
        except CertificateError as e:
            raise CliError(str(e)) from None

    anchors = [a for f in files for a in read(f, "FILE")]
    removed = {fingerprint(a) for f in remove for a in read(f, "--remove")}
    now = dt.datetime.now(dt.UTC)
    keep = []
    seen: set[str] = set()
    for a in anchors:
        fp = fingerprint(a)
        if fp in seen or fp in removed or (drop_expired and a.not_valid_after_utc <= now):
            continue
        seen.add(fp)
        keep.append(a)
    if not keep:
        raise CliError("the bundle would be empty")
    data = certificates_pem(keep)
    if out:
        try:
            Path(out).write_bytes(data)
        except OSError as e:
            raise OperationFailed(f"--out {out}: cannot write: {e.strerror}") from None
        for a in keep:
            click.echo(f"  {describe(a, 'anchor')}", err=True)
    else:
        sys.stdout.write(data.decode())
    return 0
