"""``tether controller <service>``: the control-plane services, one subcommand each.

``identity`` is defined here; the others live in their own modules (``destination`` in
tether.cli.destination_cmd) and are listed in ``SERVICES``, imported only when run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click

from tether import __version__
from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import (
    ADDRESS,
    DNS_LABEL,
    DURATION,
    POSITIVE_DURATION,
    control_plane_options,
    platform_options,
    state_dir_option,
)
from tether.cli.tree import Lazy, LazyGroup

log = logging.getLogger("tether.controller")


SERVICES: dict[str, Lazy] = {
    "destination": Lazy("tether.cli.destination_cmd", "destination",
                        "the destination service: endpoints, profiles, inbound and outbound policy"),
    "injector": Lazy("tether.cli.inject_cmd", "injector",
                     "the admission webhooks: proxy injection and resource validation"),
    "identity": Lazy("tether.cli.controller_cmd", "identity", "the identity service: signs workload certificates"),
}


@click.group("controller", cls=LazyGroup, lazy=SERVICES, short_help="run a control-plane service")
def controller() -> None:
    """Run a control-plane service in the foreground (logs on stderr; SIGTERM stops it)."""


def log_options(f: Any) -> Any:
    """``--log-level`` and ``--log-format``: the proxy's log spec and line formats, for every process."""
    f = click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
                     help="log line format")(f)
    f = click.option("--log-level", default="info", show_default=True, metavar="SPEC",
                     help="log levels: a level and target=level pairs (trace, debug, info, warn, error, off)")(f)
    return f


def configure_logging(level: str, fmt: str) -> None:
    from tether.proxy.logging import LogSpecError
    from tether.proxy.logging import configure_logging as configure

    try:
        configure(level, fmt)
    except LogSpecError as e:
        raise CliError(f"--log-level: {e}") from None


@click.command("identity", short_help="the identity service: signs workload certificates")
@click.option("--addr", type=ADDRESS, default="0.0.0.0:8080", show_default=True, help="gRPC listen address")
@click.option("--admin-addr", type=ADDRESS, default="127.0.0.1:9990", show_default=True,
              help="admin listen address: /metrics, /ready, /live")
@control_plane_options
@click.option("--issuer-dir", type=click.Path(file_okay=False),
              help="directory with tls.crt, tls.key, ca.crt (kubernetes.io/tls) or crt.pem, key.pem (linkerd.io/tls)")
@click.option("--identity-issuer-certificate-file", "--issuer-certificate-file", "issuer_cert", metavar="PATH",
              help="issuer certificate (PEM), instead of --issuer-dir")
@click.option("--identity-issuer-key-file", "--issuer-key-file", "issuer_key", metavar="PATH",
              help="issuer private key (PEM), instead of --issuer-dir")
@click.option("--identity-trust-anchors-file", "--trust-anchors-file", "trust_anchors", metavar="PATH",
              help="trust anchors bundle (PEM)  [default: ca.crt in --issuer-dir]")
@click.option("--issuance-lifetime", type=POSITIVE_DURATION, default="24h", show_default=True,
              help="lifetime of the workload certificates issued")
@click.option("--clock-skew-allowance", type=DURATION, default="20s", show_default=True,
              help="workload certificates start this long in the past")
@click.option("--reload-interval", type=POSITIVE_DURATION, default="5s", show_default=True,
              help="how often the issuer files are checked for changes")
@state_dir_option
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              metavar="PER-SECOND",
              help="Certify calls per second allowed per caller")
@click.option("--burst", type=click.IntRange(min=1), default=20, show_default=True, metavar="COUNT",
              help="Certify calls a caller may make at once above --rate")
@click.option("--tls", is_flag=True,
              help="serve gRPC over TLS with a certificate issued to --identity-service-account "
              "(proxies verify it against their trust anchors)")
@click.option("--identity-service-account", type=DNS_LABEL, default="linkerd-identity", show_default=True,
              help="this service's own service account (its TLS identity)")
@click.option("--accept-plaintext", is_flag=True,
              help="with --tls: also serve plaintext gRPC on --addr, told from TLS by the first byte (proxies of a "
                   "release before control-plane TLS, until an upgrade has replaced them)")
@platform_options
@click.option("--issuer-secret", default="linkerd-identity-issuer", show_default=True, type=DNS_LABEL, metavar="NAME",
              help="with --platform kubernetes: the issuer Secret in --controller-namespace (type kubernetes.io/tls "
                   "or linkerd.io/tls)")
@click.option("--trust-anchors-configmap", default="linkerd-identity-trust-roots", show_default=True, metavar="NAME",
              help="with --platform kubernetes: the ConfigMap holding the trust anchors (key ca-bundle.crt); "
                   "empty: the issuer Secret's ca.crt")
@click.option("--token-audience", "token_audiences", multiple=True, default=("identity.l5d.io",), show_default=True,
              metavar="AUDIENCE", help="with --platform kubernetes: the audience workload tokens must carry "
                                       "(TokenReview); repeat for several")
@log_options
def identity(addr: tuple[str, int], admin_addr: tuple[str, int], controller_namespace: str, trust_domain: str,
             issuer_dir: str | None, issuer_cert: str | None, issuer_key: str | None, trust_anchors: str | None,
             issuance_lifetime: float, clock_skew_allowance: float, reload_interval: float, state_dir: str,
             rate: float, burst: int, tls: bool, identity_service_account: str, accept_plaintext: bool, platform: str,
             kubeconfig: str | None, kube_context: str | None, issuer_secret: str, trust_anchors_configmap: str,
             token_audiences: tuple[str, ...], log_level: str, log_format: str) -> int:
    """The identity service: sign workload CSRs after validating the workload's token.

    The issuer is read from files (--issuer-dir, or the three --identity-*-file flags) and reloaded
    when they change. Workload tokens are checked against the local registry in --state-dir
    (`tether workload register`). While it serves, the service records its addresses in
    STATE_DIR/control-plane/, where `tether check` and `tether version` find it.

    With --platform kubernetes, workload tokens are projected service-account tokens checked by
    TokenReview (audience identity.l5d.io), and the issuer comes from --issuer-secret with the trust
    anchors from --trust-anchors-configmap, both watched: a rotated issuer is used without restart.
    """
    if accept_plaintext and not tls:
        raise CliError("--accept-plaintext needs --tls (without it --addr serves plaintext only)")
    if platform == "kubernetes":
        if issuer_dir or issuer_cert or issuer_key or trust_anchors:
            raise CliError("--platform kubernetes reads the issuer from --issuer-secret: "
                           "drop --issuer-dir and the --identity-*-file flags")
        configure_logging(log_level, log_format)
        return _identity_kubernetes(
            addr=addr, admin_addr=admin_addr, controller_namespace=controller_namespace, trust_domain=trust_domain,
            issuance_lifetime=issuance_lifetime, clock_skew=clock_skew_allowance, rate=rate, burst=burst, tls=tls,
            service_account=identity_service_account, accept_plaintext=accept_plaintext, kubeconfig=kubeconfig,
            context=kube_context,
            secret=issuer_secret, roots=trust_anchors_configmap or None, audiences=token_audiences,
        )
    from tether.control.identity.credentials import CredentialPaths
    from tether.control.identity.server import IdentityController, IdentityServerConfig
    from tether.core.identity.certs import CertificateError
    from tether.platform.local.tokens import LocalTokenValidator
    from tether.platform.local.workloads import WorkloadRegistry

    configure_logging(log_level, log_format)
    if issuer_dir:
        if issuer_cert or issuer_key:
            raise CliError("use either --issuer-dir or the --identity-issuer-*-file flags, not both")
        paths = CredentialPaths.from_dir(issuer_dir, trust_anchors)
    elif issuer_cert and issuer_key and trust_anchors:
        paths = CredentialPaths(Path(issuer_cert), Path(issuer_key), Path(trust_anchors))
    else:
        raise CliError(
            "no issuer: pass --issuer-dir DIR, or --identity-issuer-certificate-file, "
            "--identity-issuer-key-file and --identity-trust-anchors-file "
            "(try `tether identity create-ca --out DIR` to make some)"
        )
    cfg = IdentityServerConfig(
        addr=addr, admin_addr=admin_addr, trust_domain=trust_domain, control_plane_ns=controller_namespace,
        paths=paths, state_dir=state_dir, issuance_lifetime=issuance_lifetime, clock_skew=clock_skew_allowance,
        reload_interval=max(0.05, reload_interval), rate=rate, burst=burst, tls=tls,
        service_account=identity_service_account, accept_plaintext=accept_plaintext,
    )
    try:
        service = IdentityController(cfg, LocalTokenValidator(WorkloadRegistry(cfg.state_dir),
                                                              controller_namespace))
    except (CertificateError, ValueError) as e:
        raise OperationFailed(f"refusing to start: {e}") from None
    _warn_on_name_mismatch(service.issuer.current.issuer.certificate, controller_namespace, trust_domain)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(service.run(stop))
            serving = tg.create_task(service.serving.wait())
            await asyncio.wait({task, serving}, return_when=asyncio.FIRST_COMPLETED)
            record = _record(service, cfg) if service.serving.is_set() else None
            try:
                await task
            finally:
                serving.cancel()
                if record is not None:
                    record.unlink(missing_ok=True)

    try:
        asyncio.run(run())
    except* (OSError, RuntimeError) as eg:
        # grpc reports a port it cannot bind as RuntimeError.
        raise OperationFailed(f"cannot serve: {eg.exceptions[0]}") from None
    return 0


def _identity_kubernetes(*, addr: tuple[str, int], admin_addr: tuple[str, int], controller_namespace: str,
                         trust_domain: str, issuance_lifetime: float, clock_skew: float, rate: float, burst: int,
                         tls: bool, service_account: str, accept_plaintext: bool, kubeconfig: str | None,
                         context: str | None, secret: str, roots: str | None, audiences: tuple[str, ...]) -> int:
    from tether.control.identity.server import IdentityController, IdentityServerConfig, issuance_policy, utcnow
    from tether.core.identity.certs import CertificateError
    from tether.platform.kubernetes.client import KubeClient, KubeConfigError, KubeError
    from tether.platform.kubernetes.identity import SecretIssuer, TokenReviewValidator

    cfg = IdentityServerConfig(
        addr=addr, admin_addr=admin_addr, trust_domain=trust_domain, control_plane_ns=controller_namespace,
        issuance_lifetime=issuance_lifetime, clock_skew=clock_skew, rate=rate, burst=burst, tls=tls,
        service_account=service_account, accept_plaintext=accept_plaintext,
    )
    try:
        client = KubeClient.connect(kubeconfig, context)
    except KubeConfigError as e:
        raise CliError(f"--kubeconfig/--context: {e}") from None

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with client:
            try:
                issuer = await SecretIssuer.load(client, controller_namespace, secret, roots,
                                                 policy=issuance_policy(cfg), now=utcnow)
            except CertificateError as e:
                raise OperationFailed(f"refusing to start: {e}") from None
            except KubeError as e:
                raise OperationFailed(f"refusing to start: cannot read the issuer: {e}") from None
            service = IdentityController(cfg, TokenReviewValidator(client, audiences), issuer=issuer)
            _warn_on_name_mismatch(issuer.current.issuer.certificate, controller_namespace, trust_domain)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(issuer.run(stop))
                await service.run(stop)

    try:
        asyncio.run(run())
    except* OperationFailed as eg:
        raise eg.exceptions[0] from None
    except* (OSError, RuntimeError) as eg:
        raise OperationFailed(f"cannot serve: {eg.exceptions[0]}") from None
    return 0


def _warn_on_name_mismatch(issuer: Any, namespace: str, trust_domain: str) -> None:
    """Linkerd names the issuer identity.<cp-ns>.<trust-domain>; another name usually means the
    issuer was made for another control plane than the one this service names its workloads in."""
    from cryptography.x509.oid import NameOID

    expected = f"identity.{namespace}.{trust_domain}"
    names = [a.value for a in issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if expected not in names:
        log.warning(
            "the issuer is named %s, not %s: it was made for another control-plane namespace or trust domain "
            "than --controller-namespace %s --identity-trust-domain %s; proxies expecting the other names "
            "will not trust the identities issued",
            ",".join(str(n) for n in names) or "(no CN)", expected, namespace, trust_domain,
        )


def _record(service: Any, cfg: Any) -> Path | None:
    from tether.platform.local.controlplane import ControlPlaneRecord, write_record

    host, admin_host = cfg.addr[0], cfg.admin_addr[0]
    paths = cfg.paths
    rec = ControlPlaneRecord(
        component="identity", pid=os.getpid(), version=__version__,
        addr=f"{'127.0.0.1' if host == '0.0.0.0' else host}:{service.grpc_port}",
        admin_addr=f"{'127.0.0.1' if admin_host == '0.0.0.0' else admin_host}:{service.admin_port}",
        controller_namespace=cfg.control_plane_ns, trust_domain=cfg.trust_domain,
        issuer_certificate=str(Path(paths.issuer_cert).resolve()),
        trust_anchors=str(Path(paths.trust_anchors).resolve()),
    )
    with contextlib.suppress(OSError):
        return write_record(cfg.state_dir, rec)
    log.warning("cannot record the identity service in %s/control-plane", cfg.state_dir)
    return None
