"""``tether controller destination``: discovery, profiles and policies from the store, as gRPC streams.

Listed under ``tether controller`` by tether.cli.controller_cmd. The CLI is where the platform is
wired in: here the local store (a resources directory and the workload registry).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import click

from tether.cli.controller_cmd import configure_logging, log_options
from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import (
    ADDRESS,
    CIDRS,
    DNS_LABEL,
    POSITIVE_DURATION,
    TRUST_DOMAIN,
    control_plane_options,
    platform_options,
    resources_dir_option,
    state_dir_option,
)

# The defaults of tether.control.destination.translate.Settings, written out so that `--help` does
# not import the service (tests/unit/test_cli_destination.py checks they agree).
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_NETWORKS = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
DEFAULT_POLICY = "all-unauthenticated"
POLICIES = (
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "cluster-unauthenticated",
    "deny",
    "audit",
)


@click.command("destination", short_help="the destination service: endpoints, profiles, inbound and outbound policy")
@click.option("--addr", type=ADDRESS, default="0.0.0.0:8086", show_default=True, help="gRPC listen address")
@click.option("--admin-addr", type=ADDRESS, default="127.0.0.1:9996", show_default=True,
              help="admin listen address: /metrics, /ready, /live, /store-errors.json")
@resources_dir_option
@state_dir_option
@control_plane_options
@click.option("--cluster-domain", type=TRUST_DOMAIN, default=DEFAULT_CLUSTER_DOMAIN, show_default=True,
              help="DNS suffix of service names (NAME.NAMESPACE.svc.DOMAIN)")
@click.option("--default-policy", type=click.Choice(POLICIES), default=DEFAULT_POLICY, show_default=True,
              metavar="POLICY", help="inbound policy of a port no Server selects: " + ", ".join(POLICIES))
@click.option("--cluster-networks", type=CIDRS, default=DEFAULT_CLUSTER_NETWORKS, show_default=True,
              help="networks of the cluster's workloads, for the cluster-* policies (comma-separated CIDRs)")
@click.option("--probe-networks", type=CIDRS, default="0.0.0.0/0,::/0", show_default=True,
              help="networks the kubelet's probes come from: a workload's probe paths are authorized from "
              "them on ports without routes of their own (comma-separated CIDRs; empty: none)")
@click.option("--stream-queue-limit", type=click.IntRange(min=1), default=1000, show_default=True, metavar="COUNT",
              help="updates a stream may fall behind before it is reset (the proxy reconnects for a fresh snapshot)")
@click.option("--poll-interval", type=POSITIVE_DURATION, default="250ms", show_default=True,
              help="how often --resources-dir and the workload registry are checked for changes")
@click.option("--allow-l5d-request-headers", is_flag=True,
              help="let clients override a route's retries and timeouts per request with l5d-retry-* and "
                   "l5d-timeout headers (off by default, as in Linkerd)")
@click.option("--global-egress-network-namespace", type=DNS_LABEL, default="linkerd-egress", show_default=True,
              metavar="NAMESPACE", help="EgressNetworks in this namespace apply to clients in every namespace "
              "that has none of its own (as Linkerd's policy controller)")
@click.option("--identity-addrs", metavar="HOST:PORT,...",
              help="serve --addr over mutual TLS only, with a certificate for --service-account from these identity "
                   "service replicas (dialled over TLS); proxies verify it by name and present their own")
@click.option("--identity-token-path", metavar="PATH",
              help="with --identity-addrs: this service's token for the identity service (a projected service "
                   "account token, or the local mesh's control-plane token)")
@click.option("--identity-trust-anchors-file", metavar="PATH",
              help="with --identity-addrs: the trust anchors (PEM); reloaded when the file changes")
@click.option("--service-account", type=DNS_LABEL, default="linkerd-destination", show_default=True,
              help="this service's own service account, in --controller-namespace: its TLS identity")
@click.option("--identity-service-account", type=DNS_LABEL, default="linkerd-identity", show_default=True,
              help="the identity service's service account, in --controller-namespace: the name its certificate "
                   "must carry")
@click.option("--plaintext-addr", type=ADDRESS,
              help="with --identity-addrs: also serve plaintext here, for operators on the same host "
                   "(tether diagnostics); keep it on loopback")
@click.option("--accept-plaintext", is_flag=True,
              help="with --identity-addrs: also serve plaintext gRPC on --addr, told from TLS by the first byte "
                   "(proxies of a release before control-plane TLS, until an upgrade has replaced them)")
@platform_options
@click.option("--sync-timeout", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="with --platform kubernetes: how long the first list of every resource may take before the "
                   "service gives up (it serves only once it has the whole picture)")
@log_options
def destination(addr: tuple[str, int], admin_addr: tuple[str, int], resources_dir: str, state_dir: str,
                controller_namespace: str, trust_domain: str, cluster_domain: str, default_policy: str,
                cluster_networks: tuple[str, ...], probe_networks: tuple[str, ...], stream_queue_limit: int,
                poll_interval: float, allow_l5d_request_headers: bool, global_egress_network_namespace: str,
                identity_addrs: str | None, identity_token_path: str | None,
                identity_trust_anchors_file: str | None, service_account: str, identity_service_account: str,
                plaintext_addr: tuple[str, int] | None, accept_plaintext: bool, platform: str, kubeconfig: str | None,
                kube_context: str | None, sync_timeout: float, log_level: str, log_format: str) -> int:
    """The destination service: what proxies learn about the services they call and serve.

    Serves io.linkerd.proxy.destination.Destination (Get, GetProfile),
    io.linkerd.proxy.outbound.OutboundPolicies and io.linkerd.proxy.inbound.InboundServerPolicies
    from the local store: the YAML resources in --resources-dir (an edit is served within a second;
    a file that does not validate is logged and its last good version kept) and the workload
    registry in --state-dir. Run several over the same directory for high availability: proxies
    dial them all and fail over.

    With --platform kubernetes the store is the API server instead: Services, Pods (ready as their
    EndpointSlices say), Namespaces and the mesh's CRDs, listed once before serving, then watched.
    """
    from tether.control.destination.server import DestinationConfig, DestinationController
    from tether.control.destination.translate import Settings
    from tether.platform.local.store import LocalStore

    configure_logging(log_level, log_format)
    cfg = DestinationConfig(
        addr=addr,
        admin_addr=admin_addr,
        settings=Settings(
            cluster_domain=cluster_domain,
            trust_domain=trust_domain,
            control_plane_ns=controller_namespace,
            default_policy=default_policy,
            cluster_networks=cluster_networks,
            allow_l5d_request_headers=allow_l5d_request_headers,
            probe_networks=probe_networks,
            global_egress_ns=global_egress_network_namespace,
        ),
        queue_limit=stream_queue_limit,
        plaintext_addr=plaintext_addr,
        accept_plaintext=accept_plaintext,
    )
    own_cert = _own_certificate(identity_addrs, identity_token_path, identity_trust_anchors_file, service_account,
                                identity_service_account, controller_namespace, trust_domain, plaintext_addr,
                                accept_plaintext)
    if platform == "kubernetes":
        return _run_kubernetes(cfg, own_cert, kubeconfig, kube_context, sync_timeout)
    store = LocalStore(resources_dir, state_dir, poll_interval=max(0.01, poll_interval), queue_limit=100_000)
    for err in store.source_errors():
        for line in err.errors:
            logging.getLogger("tether.store").error("%s (not loaded)", line)
    controller = DestinationController(store, cfg, own_cert)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await controller.run(stop)

    try:
        asyncio.run(run())
    except* (OSError, RuntimeError) as eg:
        # grpc reports a port it cannot bind as RuntimeError.
        raise OperationFailed(f"cannot serve: {eg.exceptions[0]}") from None
    return 0


def _own_certificate(identity_addrs: str | None, token_path: str | None, anchors: str | None, service_account: str,
                     identity_service_account: str, controller_namespace: str, trust_domain: str,
                     plaintext_addr: tuple[str, int] | None, accept_plaintext: bool) -> Any:
    """The OwnCertificate --identity-addrs asks for (None: plaintext on --addr)."""
    if not identity_addrs:
        for flag, given in (("--plaintext-addr", plaintext_addr is not None), ("--accept-plaintext", accept_plaintext)):
            if given:
                raise CliError(f"{flag} needs --identity-addrs (without it --addr already serves plaintext)")
        return None
    missing = [f for f, v in (("--identity-token-path", token_path), ("--identity-trust-anchors-file", anchors))
               if not v]
    if missing:
        raise CliError(f"--identity-addrs is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                       "not")
    assert token_path and anchors
    addrs = [a.strip() for a in identity_addrs.split(",") if a.strip()]
    for a in addrs:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--identity-addrs: {a!r} is not HOST:PORT")
    from tether.control.owncert import NotCertified, OwnCertConfig, OwnCertificate
    from tether.core.identity.certs import CertificateError
    from tether.core.identity.names import WorkloadIdentity

    own = WorkloadIdentity(service_account, controller_namespace, controller_namespace, trust_domain)
    server = WorkloadIdentity(identity_service_account, controller_namespace, controller_namespace, trust_domain)
    try:
        return OwnCertificate(OwnCertConfig(own, tuple(addrs), server.dns_name, token_path, anchors))
    except (CertificateError, NotCertified, ValueError) as e:
        raise OperationFailed(f"refusing to start: --identity-trust-anchors-file: {e}") from None


def _run_kubernetes(cfg: Any, own_cert: Any, kubeconfig: str | None, context: str | None,
                    sync_timeout: float) -> int:
    from tether.control.destination.server import DestinationController
    from tether.platform.kubernetes.client import KubeClient, KubeConfigError, KubeError
    from tether.platform.kubernetes.store import KubeStore

    try:
        client = KubeClient.connect(kubeconfig, context)
    except KubeConfigError as e:
        raise CliError(f"--kubeconfig/--context: {e}") from None
    log = logging.getLogger("tether.store")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with client:
            store = KubeStore(client)
            began = loop.time()
            try:
                await store.sync(sync_timeout)
            except TimeoutError:
                raise OperationFailed(f"refusing to serve: the API server {client.server} did not list every "
                                      f"resource within --sync-timeout {sync_timeout:g}s") from None
            except KubeError as e:
                raise OperationFailed(f"refusing to serve: {e}") from None
            log.info("listed the cluster's resources from %s in %.2fs", client.server, loop.time() - began)
            for err in store.source_errors():
                for line in err.errors:
                    log.warning("%s", line)
            await DestinationController(store, cfg, own_cert).run(stop)

    try:
        asyncio.run(run())
    except* OperationFailed as eg:
        raise eg.exceptions[0] from None
    except* (OSError, RuntimeError) as eg:
        # grpc reports a port it cannot bind as RuntimeError.
        raise OperationFailed(f"cannot serve: {eg.exceptions[0]}") from None
    return 0
