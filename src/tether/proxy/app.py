"""The proxy process: binds the listeners, runs the background tasks, drains on shutdown.

A connection's whole path belongs to its direction: :mod:`tether.proxy.outbound.stack` and
:mod:`tether.proxy.inbound.stack` read top to bottom (accept, TLS, detect, the HTTP stack, the TCP
stack). This module only wires them to sockets. SIGTERM stops the listeners, lets in-flight
requests finish within the grace period, closes idle keep-alive connections, sends GOAWAY on
HTTP/2, and exits 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tether import native
from tether.proxy.admin import AdminServer
from tether.proxy.config import ConfigError, ProxyConfig, parse_addr
from tether.proxy.discovery import StaticDiscovery
from tether.proxy.gcpolicy import GcPolicy
from tether.proxy.inbound.authorize import Authorizer
from tether.proxy.inbound.policy_source import PolicySource, StaticPolicy
from tether.proxy.inbound.stack import Inbound
from tether.proxy.layers.access_log import FORMATS as ACCESS_LOG_FORMATS
from tether.proxy.layers.access_log import AccessLogWriter
from tether.proxy.listen import listening_socket
from tether.proxy.logging import LogControl
from tether.proxy.looplag import LoopLagMonitor
from tether.proxy.malloc import trim_malloc, tune_malloc
from tether.proxy.metrics import MetricsRegistry
from tether.proxy.outbound.stack import Outbound
from tether.proxy.tap import TapHub, TapServer
from tether.proxy.tracing import tracer_from

if TYPE_CHECKING:
    from tether.proxy.discovery import Discovery
    from tether.proxy.grpc_client import ChannelTls
    from tether.proxy.identity import IdentityClient, IdentityClientConfig

log = logging.getLogger(__name__)


class Proxy:
    def __init__(self, cfg: ProxyConfig, log_control: LogControl | None = None,
                 discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.log_control = log_control or LogControl(cfg.log_level)
        self.metrics = MetricsRegistry(retain_idle=cfg.metrics_retain_idle)
        self.identity = identity_client(cfg)
        if discovery is None:
            discovery = discovery_from(cfg, self.identity)
        self.discovery = discovery
        if self.identity is not None:
            self.metrics.add_source(self.identity.metrics_lines)
        lines = getattr(discovery, "metrics_lines", None)
        if callable(lines):
            self.metrics.add_source(lines)
        self.tap = TapHub(cfg.tap_max_observers, cfg.tap_max_buffered_events)  # shared by both directions' tap layers
        self.metrics.add_source(self.tap.lines)
        self.tap_server: TapServer | None = None
        self.tracer = tracer_from(cfg)  # spans to the OTLP collector (None: tracing off, no layer pushed)
        if self.tracer is not None:
            self.metrics.add_source(self.tracer.lines)
        self.outbound = Outbound(cfg, self.metrics, discovery, self.identity, {cfg.outbound_addr, cfg.inbound_addr},
                                 tap=self.tap, tracer=self.tracer)
        self.policies = policy_source_from(cfg, self.identity)
        self.authorizer = Authorizer(self.policies)
        self.access_log = access_log_from(cfg)
        if self.access_log is not None:
            self.metrics.add_source(self.access_log.lines)
        self.inbound = Inbound(cfg, self.metrics, self.identity, self.authorizer, tap=self.tap,
                               access_log=self.access_log, tracer=self.tracer)
        self.metrics.add_source(self.authorizer.lines)
        self.metrics.add_source(self.policies.metrics_lines)
        self.metrics.add_source(self._cache_lines)
        self.metrics.add_source(self.outbound.balancer_lines)
        self.metrics.add_source(self.outbound.route_metrics.lines)
        self.metrics.add_source(self.outbound.policy_metrics.lines)
        self.gc = GcPolicy(cfg.gc_full_interval)  # installed by run(): see gcpolicy
        self.metrics.add_source(self.gc.lines)
        self.loop_lag = LoopLagMonitor(cfg.loop_lag_interval) if cfg.loop_lag_interval > 0 else None
        if self.loop_lag is not None:
            self.metrics.add_source(self.loop_lag.lines)
        self.admin: AdminServer | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.discovery is not None:
            self._spawn(self.discovery.run())
        if self.identity is not None:
            self._spawn(self.identity.run())
        self._spawn(self.outbound.logicals.run())  # drop stacks of destinations idle too long
        self._spawn(self.inbound.targets.run())
        if self.access_log is not None:
            self.access_log.start()  # its writer thread
        if self.tracer is not None:
            self._spawn(self.tracer.run())  # span export in batches
        if self.loop_lag is not None:
            self._spawn(self.loop_lag.run())  # tether_event_loop_lag_*: how long callbacks block the loop
        out = await _serve(loop, self.outbound.accept, self.cfg.outbound_addr)
        self._servers.append(out)
        host, port = out.sockets[0].getsockname()[:2]
        log.info("outbound listener on %s:%d", host, port)
        if self.identity is not None:
            host, port = self.inbound.listen_mesh(self.cfg.inbound_addr)
            log.info("inbound listener on %s:%d (mesh mTLS as %s)", host, port, self.identity.identity.dns_name)
            log.info("mesh TLS full handshakes: %s; OpenSSL's EC keys: %s", _chains_text(self.identity.config),
                     "built-in code" if self.identity.legacy_ec_keys else "providers")
        else:
            inb = await _serve(loop, self.inbound.accept, self.cfg.inbound_addr)
            self._servers.append(inb)
            host, port = inb.sockets[0].getsockname()[:2]
            log.info("inbound listener on %s:%d", host, port)
        if self.identity is not None and not self.cfg.tap_disabled:
            tap_server = TapServer(self.cfg, self.tap, self.identity)
            try:
                host, port = tap_server.start()
            except OSError as e:
                # Tap is an observer: traffic must not depend on it, so the proxy serves without.
                log.error("tap listener on %s:%d cannot start: %s; tap is off", *self.cfg.tap_addr, e)
            else:
                self.tap_server = tap_server
                log.info("tap listener on %s:%d (mTLS; authorized: %s)", host, port,
                         ", ".join(sorted(tap_server.authorized)) or "nobody")
        else:
            why = "--tap-disabled" if self.cfg.tap_disabled else "no identity: tap needs mTLS"
            log.info("tap server off (%s)", why)
        if native.state == "compiled":
            log.info("hot path compiled (mypyc): %d modules", len(native.NATIVE_MODULES))
        else:
            log.warning("hot path interpreted (%s): about half the throughput", native.state[len("pure: "):])
        self.admin = AdminServer(
            self.cfg, self.metrics, self.log_control, ready=self._is_ready, shutdown=self.request_stop,
            identity=self.identity.identity_json if self.identity is not None else None,
        )
        admin_host, admin_port = await self.admin.start()
        log.info("admin listener on %s:%d", admin_host, admin_port)
        self.ready = True

    def _is_ready(self) -> bool:
        # Not ready until the first certificate: meshed peers could not talk to us yet.
        return self.ready and (self.identity is None or self.identity.ready)

    def _cache_lines(self) -> list[str]:
        # tether's own gauge: how many per-target stacks each direction holds (idle ones are dropped).
        out = ["# HELP tether_stack_cache_entries Per-target stacks held (dropped once idle).",
               "# TYPE tether_stack_cache_entries gauge"]
        for direction, cache in (("outbound", self.outbound.logicals), ("inbound", self.inbound.targets)):
            out.append(f'tether_stack_cache_entries{{direction="{direction}"}} {len(cache)}')
        return out

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or an admin /shutdown), then drain and return."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        # Start-up's objects are collected once and frozen; so are the survivors of every later
        # full collection (a full collection then costs what is new, not what is alive).
        self.gc.settle()
        self._spawn(self.gc.run())
        # Start-up's temporaries (module loading, config, the first stacks) leave free pages in the
        # heap that glibc keeps below its 2 MiB trim threshold: ~0.7 MiB of an idle proxy's RSS.
        trim_malloc()
        # So once a burst of destinations (or inbound targets) has gone idle and been dropped.
        self.outbound.logicals.after_bulk_drop = trim_malloc
        self.inbound.targets.after_bulk_drop = trim_malloc
        if self.identity is not None:
            # After a burst of mTLS handshakes, the heap's free pages go back (tlstransport).
            from tether.proxy.tlstransport import on_handshake_burst_end

            on_handshake_burst_end(trim_malloc)
            self._spawn(_trim_when_certified(self.identity))
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        grace = self.cfg.shutdown_grace_period
        log.info("shutting down: draining connections for up to %gs", grace)
        self.ready = False
        deadline = time.monotonic() + grace
        for server in self._servers:
            server.close()
        self.inbound.close_listener()
        if self.tap_server is not None:
            await self.tap_server.aclose()  # running taps end (UNAVAILABLE)
        sides = (self.outbound.connections, self.inbound.connections)
        drains: list[Coroutine[Any, Any, object]] = [d for side in sides for d in side.drains(grace)]
        results = await asyncio.gather(*drains, return_exceptions=True)
        for side in sides:
            await side.drain_tcp(deadline)
        unclean = [r for r in results if r is False or isinstance(r, BaseException)]
        if unclean:
            log.warning("%d connection groups did not drain within %gs", len(unclean), grace)
        await self.outbound.aclose()
        await self.inbound.aclose()
        close = getattr(self.discovery, "aclose", None)
        if close is not None:
            await close()
        await self.policies.aclose()
        for side in sides:
            side.cancel_tasks()
        for task in list(self._tasks):
            task.cancel()
        if self.tracer is not None:
            try:
                async with asyncio.timeout(self.tracer.timeout):
                    await self.tracer.flush()  # the spans of the last requests
            except TimeoutError:
                pass
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)
        if self.admin is not None:
            await self.admin.close()
        self.gc.uninstall()
        log.info("shutdown complete")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _serve(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.BaseProtocol],
                 addr: tuple[str, int]) -> asyncio.Server:
    """A listener on ``addr``: bound by us for an IP literal (see ``listen``), else by the loop."""
    sock = listening_socket(addr, _BACKLOG)
    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=_BACKLOG)
    return await loop.create_server(factory, *addr, reuse_address=True, backlog=_BACKLOG)


_BACKLOG = 1024


def control_tls(cfg: ProxyConfig, identity: IdentityClient | None, flag: str, name: str | None) -> ChannelTls | None:
    """Mutual TLS to a control-plane service named ``name`` (None: plaintext)."""
    if not name:
        return None
    from tether.proxy.grpc_client import ChannelTls

    labels = name.split(".")
    if len(name) > 253 or not all(0 < len(x) <= 63 and x.isascii() and x.replace("-", "").isalnum()
                                  and x[0] != "-" and x[-1] != "-" for x in labels):
        raise ConfigError(f"{flag}: {name!r} is not a DNS name (the identity in the service's certificate)")
    if identity is None:
        raise ConfigError(f"{flag} is set but --identity-name is not: mutual TLS to the control plane needs "
                          "the proxy's own certificate")
    return ChannelTls(name, identity.control_context)


def discovery_from(cfg: ProxyConfig, identity: IdentityClient | None = None) -> Discovery | None:
    """The source of endpoints the config names: the static file or the destination service."""
    if cfg.destinations_file and cfg.destination_addrs:
        raise ConfigError("--destinations-file and --destination-addrs are both set: choose one source of endpoints")
    if cfg.destinations_file:
        return StaticDiscovery(cfg.destinations_file)
    if not cfg.destination_addrs:
        return None
    # Imported here: protobuf and the API messages cost memory a proxy without a control plane does not need.
    from tether.proxy.destination import DestinationDiscovery, DestinationSettings, context_token

    addrs = tuple(a.strip() for a in cfg.destination_addrs.split(",") if a.strip())
    for a in addrs:
        parse_addr(a, "--destination-addrs")  # ConfigError naming the flag and the value
    token = cfg.destination_context
    if token is None:
        parts = (cfg.identity_name or "").split(".")
        token = context_token(parts[1] if len(parts) > 2 else "default")
    else:
        try:
            json.loads(token)
        except ValueError:
            raise ConfigError(f"--destination-context: {token!r} is not JSON") from None
    tls = control_tls(cfg, identity, "--destination-svc-name", cfg.destination_svc_name)
    nets = tuple(ipaddress.ip_network(n, strict=False) for n in _cluster_networks(cfg))
    return DestinationDiscovery(DestinationSettings(addrs, token, tls=tls, profile_networks=nets))


def access_log_from(cfg: ProxyConfig) -> AccessLogWriter | None:
    """The access log writer --access-log asks for, or None (off, the default)."""
    if not cfg.access_log:
        return None
    if cfg.access_log not in ACCESS_LOG_FORMATS:
        raise ConfigError(f"--access-log: {cfg.access_log!r} is not one of {', '.join(ACCESS_LOG_FORMATS)}")
    return AccessLogWriter(cfg.access_log, cfg.access_log_path, cfg.access_log_max_buffered_lines)


def _cluster_networks(cfg: ProxyConfig) -> tuple[str, ...]:
    from tether.core.policy.authz import PolicyError, networks

    nets = tuple(c.strip() for c in cfg.cluster_networks.split(",") if c.strip())
    try:
        networks(nets)
    except PolicyError as e:
        raise ConfigError(f"--cluster-networks: {e}") from None
    return nets


def policy_workload(cfg: ProxyConfig) -> str:
    """PortSpec.workload: --policy-workload, else the context token's ns and pod, else the identity's."""
    if cfg.policy_workload:
        return cfg.policy_workload
    if cfg.destination_context:
        try:
            doc = json.loads(cfg.destination_context)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("ns") and doc.get("pod"):
            return json.dumps({"ns": doc["ns"], "pod": doc["pod"]}, separators=(",", ":"))
    parts = (cfg.identity_name or "").split(".")
    if len(parts) > 2:
        # A local workload is named after its service account unless told otherwise.
        return json.dumps({"ns": parts[1], "pod": parts[0]}, separators=(",", ":"))
    raise ConfigError("--policy-addrs is set but the proxy's workload is unknown: set --policy-workload "
                      '(JSON {"ns": ..., "pod": ...}), a --destination-context with "pod", or --identity-name')


def policy_source_from(cfg: ProxyConfig, identity: IdentityClient | None = None) -> PolicySource:
    """Inbound policy from the control plane when the config names one, else the default policy."""
    from tether.core.policy.authz import DEFAULT_POLICIES

    if cfg.default_inbound_policy not in DEFAULT_POLICIES:
        raise ConfigError(f"--default-inbound-policy: {cfg.default_inbound_policy!r} is not one of "
                          f"{', '.join(DEFAULT_POLICIES)}")
    nets = _cluster_networks(cfg)
    if not cfg.policy_addrs:
        log.info("inbound policy: %s on every port (no --policy-addrs)", cfg.default_inbound_policy)
        return StaticPolicy(cfg.default_inbound_policy, nets, cfg.inbound_permit_localhost)
    from tether.proxy.inbound.policy_watch import PolicyWatch, PolicyWatchSettings

    addrs = tuple(a.strip() for a in cfg.policy_addrs.split(",") if a.strip())
    for a in addrs:
        parse_addr(a, "--policy-addrs")
    tls = control_tls(cfg, identity, "--policy-svc-name", cfg.policy_svc_name)
    return PolicyWatch(PolicyWatchSettings(addrs, policy_workload(cfg), cfg.inbound_policy_timeout,
                                           cfg.inbound_permit_localhost, tls=tls))


def identity_client(cfg: ProxyConfig) -> IdentityClient | None:
    """The identity client the config asks for, or None (plaintext only)."""
    if not cfg.identity_name:
        return None
    missing = [flag for flag, value in (
        ("--identity-token-path", cfg.identity_token_path),
        ("--identity-trust-anchors", cfg.identity_trust_anchors),
        ("--identity-addrs", cfg.identity_addrs),
    ) if not value]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"--identity-name is set but {', '.join(missing)} {verb} not")
    assert cfg.identity_token_path and cfg.identity_trust_anchors and cfg.identity_addrs
    # Imported here: cryptography and protobuf cost ~15 MiB of RSS a plaintext proxy does not need.
    from tether.core.identity.certview import CertificateError
    from tether.proxy.identity import IdentityClient, IdentityClientConfig

    try:
        return IdentityClient(IdentityClientConfig(
            identity=cfg.identity_name,
            token_path=cfg.identity_token_path,
            trust_anchors_path=cfg.identity_trust_anchors,
            identity_addrs=[a.strip() for a in cfg.identity_addrs.split(",") if a.strip()],
            identity_server_name=cfg.identity_svc_name or None,
            key_path=cfg.identity_key_path,
            bundle_poll_interval=cfg.identity_bundle_poll_interval,
            session_max_age=cfg.identity_tls_session_max_age,
            session_cache_entries=cfg.identity_tls_session_cache_entries,
            server_session_cache_entries=cfg.identity_tls_server_session_cache_entries,
            verified_chain_cache_entries=cfg.identity_tls_verified_chain_cache_entries,
            legacy_ec_keys=cfg.identity_tls_openssl_legacy_ec,
        ))
    except (ValueError, CertificateError) as e:
        raise ConfigError(f"identity: {e}") from None


def _chains_text(config: IdentityClientConfig) -> str:
    from tether.proxy import tlsctl

    entries = config.verified_chain_cache_entries
    if entries and tlsctl.verified_chain_cache_available():
        return f"peer chains verified once, {entries} remembered per context"
    return "every peer chain verified" + ("" if not entries else " (no verified-chain cache here)")


async def _trim_when_certified(identity: IdentityClient) -> None:
    # The first certificate's work after the start-up trim (the key generator's pipes, the Certify
    # call, the chain's check handshakes) leaves ~0.2 MiB of free heap pages behind for good.
    await identity.ready_event.wait()
    trim_malloc()


async def serve(cfg: ProxyConfig, log_control: LogControl | None = None) -> int:
    proxy = Proxy(cfg, log_control)
    await proxy.run()
    return 0


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now in force.

    Every client connection, its upstream and each pooled connection hold a descriptor: the usual
    soft limit of 1024 would refuse connections long before memory or CPU runs out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def run(cfg: ProxyConfig, log_control: LogControl | None = None) -> int:
    """Run the proxy on uvloop until signalled; the process exit status."""
    import uvloop

    tune_malloc()
    raise_fd_limit()
    return uvloop.run(serve(cfg, log_control))
