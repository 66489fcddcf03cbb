"""Every setting, bound and timeout of the proxy, in one object.

Each field can be set by a flag (``--inbound-addr``) or an environment variable
(``TETHER_PROXY_INBOUND_ADDR``); flags win. Defaults follow linkerd2-proxy where it has one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# Fields holding a byte count (accepted and shown as ``64Ki``), and floats that are not durations.
SIZE_FIELDS = frozenset(
    {"detect_peek_bytes", "max_header_bytes", "body_buffer_high", "h2_initial_window"}
)
NOT_DURATIONS = frozenset({"failure_accrual_jitter", "trace_sample_rate"})
# Counts with a floor (a setting below it is refused naming the setting).
INT_MINIMUMS = {
    "identity_tls_session_cache_entries": 1,
    "identity_tls_server_session_cache_entries": 1,
    "identity_tls_verified_chain_cache_entries": 0,
}

# Linkerd's default opaque ports: server-speaks-first protocols that must skip detection.
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})


class ConfigError(ValueError):
    """A setting could not be understood; the message names the setting."""


def parse_addr(text: str, setting: str) -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{setting}: {text!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_ports(text: str, setting: str) -> frozenset[int]:
    """Parse a port list like ``25,587,3306,4000-4010``."""
    ports: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"{setting}: {part!r} is not a port or a port range") from None
        if not (0 < a <= b <= 65535):
            raise ConfigError(f"{setting}: {part!r} is out of range 1-65535")
        ports.update(range(a, b + 1))
    return frozenset(ports)


def parse_size(text: str, setting: str) -> int:
    """Parse a byte count: ``65536``, ``64Ki``, ``1Mi`` (also ``k``/``M``/``G`` for powers of 1000)."""
    t = text.strip()
    factor = 1
    for suffix, f in (("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000), ("M", 10**6), ("G", 10**9)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], f
            break
    if not t.isdigit():
        raise ConfigError(f"{setting}: {text!r} is not a size like 65536, 64Ki or 1Mi")
    return int(t) * factor


def format_size(value: int) -> str:
    """``65536`` -> ``64Ki``: the largest binary unit that divides the value exactly."""
    for suffix, f in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value and value % f == 0:
            return f"{value // f}{suffix}"
    return str(value)


def format_duration(seconds: float) -> str:
    """``10.0`` -> ``10s``, ``0.5`` -> ``500ms``, ``120`` -> ``2m``: the largest exact unit parse_duration reads."""
    ms = round(seconds * 1000, 6)
    for suffix, f in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms and ms % f == 0:
            return f"{int(ms // f)}{suffix}"
    return f"{ms:g}ms"


def parse_duration(text: str, setting: str) -> float:
    """Parse ``100ms``, ``10s``, ``2m``, ``1h`` or a bare number of seconds."""
    t = text.strip()
    num, scale = t, 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            num, scale = t[: -len(suffix)], factor
            break
    try:
        value = float(num) * scale
    except ValueError:
        raise ConfigError(f"{setting}: {text!r} is not a duration like 500ms, 10s or 1m") from None
    if value < 0:
        raise ConfigError(f"{setting}: {text!r} is negative")
    return value


@dataclass(slots=True)
class ProxyConfig:
    # Listeners.
    inbound_addr: tuple[str, int] = ("0.0.0.0", 4143)
    outbound_addr: tuple[str, int] = ("127.0.0.1", 4140)
    admin_addr: tuple[str, int] = ("127.0.0.1", 4191)
    # Where inbound traffic goes when no original destination is known (not redirected).
    inbound_app_addr: tuple[str, int] | None = None
    # Protocol detection.
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    detect_timeout: float = 10.0
    detect_peek_bytes: int = 1024
    # HTTP/1 limits and timeouts.
    max_header_bytes: int = 64 * 1024
    header_read_timeout: float = 10.0
    idle_timeout: float = 90.0
    # A peer that reads nothing we send (TCP backpressure for this long, or an HTTP/2 window left
    # at zero) loses the connection or the stream: buffers never wait on it for ever.
    write_stall_timeout: float = 60.0
    # Upstream.
    outbound_connect_timeout: float = 1.0
    inbound_connect_timeout: float = 0.1 * 10  # 1s: loopback to the app; 100ms is too tight under load
    failfast_timeout: float = 3.0
    response_timeout: float | None = None  # no default per-request timeout
    pool_max_idle_per_endpoint: int = 256
    pool_idle_timeout: float = 60.0
    # Load balancing (linkerd2-proxy defaults).
    ewma_default_rtt: float = 0.030
    ewma_decay: float = 10.0
    failure_accrual_max_failures: int = 7
    failure_accrual_min_penalty: float = 1.0
    failure_accrual_max_penalty: float = 60.0
    failure_accrual_jitter: float = 0.5
    balancer_queue_capacity: int = 10_000  # requests waiting for an endpoint (Linkerd's queue)
    # HTTP/2.
    h2_max_concurrent_streams: int = 100
    h2_max_connections_per_endpoint: int = 16  # more HTTP/2 connections to a peer whose stream limit is reached
    h2_max_resets_per_window: int = 200
    h2_reset_window: float = 10.0
    h2_rapid_reset_age: float = 1.0  # a peer reset of an unanswered stream younger than this is "rapid"
    h2_initial_window: int = 65535
    # CONTINUATION frames allowed after one HEADERS (CVE-2024-27316 and kin): more is GOAWAY.
    h2_max_continuation_frames: int = 16
    # Opaque TCP between two plain sockets moves through os.splice (the bytes never enter Python).
    tcp_zero_copy: bool = True
    # Body buffering.
    body_buffer_high: int = 256 * 1024
    # Stacks: a request whose endpoint refused the connection is tried on up to this many endpoints.
    connect_retry_attempts: int = 3
    # Per-target stacks (a destination's balancer and pools, an inbound port's forwarder) unused for
    # this long are dropped with their connections (linkerd2-proxy's outbound cache idle age).
    cache_max_idle_age: float = 60.0
    # Outbound: HTTP/1 requests to a meshed endpoint (mTLS to its proxy) that the destination hints
    # h2 travel as HTTP/2 with the l5d-orig-proto header, as Linkerd's proxies do between them; the
    # peer proxy gives the application HTTP/1 again. Requests share one multiplexed connection per
    # peer: about half the system calls per request at concurrency. The destination service leaves
    # the hint off for proxies that would not downgrade (tether's before 0.2.0).
    outbound_h2_upgrade: bool = True
    # After an error response, what the client still sends is read and dropped for this long.
    linger_timeout: float = 2.0
    # A metric series nobody counted into for this long is dropped from /metrics (as Linkerd does).
    metrics_retain_idle: float = 600.0
    # How often the event loop's lateness is sampled (tether_event_loop_lag_*); 0 turns it off.
    loop_lag_interval: float = 0.025
    # The survivors of each full cyclic-GC collection are frozen (never examined again); this often,
    # they are given back and collected once, freeing any cycle left among them. 0: never.
    gc_full_interval: float = 900.0
    # Lifecycle.
    shutdown_grace_period: float = 120.0
    enable_admin_shutdown: bool = False
    log_level: str = "warn,tether=info"
    log_format: str = "plain"  # plain | json
    # Static discovery: authority -> endpoints (see tether.proxy.discovery).
    destinations_file: str | None = None
    # The destination service (linkerd2-proxy-api Destination): comma-separated host:port of its
    # replicas, and the context token it gets (JSON; default {"ns": <the identity's namespace>}).
    destination_addrs: str | None = None
    destination_context: str | None = None
    # Inbound policy. With --policy-addrs (the policy service's replicas: tether's destination
    # controller serves it, so usually the same as --destination-addrs; Linkerd's proxy has the two
    # addresses apart too) each inbound port's policy is watched there
    # (InboundServerPolicies.WatchPort) for this workload (JSON {"ns": ..., "pod": ...}; unset: from
    # the context token, else the identity's service account and namespace); without, every port
    # gets --default-inbound-policy. Linkerd's proxy always permits clients on 127.0.0.1 and ::1.
    policy_addrs: str | None = None
    default_inbound_policy: str = "all-unauthenticated"
    cluster_networks: str = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
    policy_workload: str | None = None
    inbound_policy_timeout: float = 3.0  # how long a connection waits for its port's first policy
    inbound_permit_localhost: bool = True
    # Identity (see tether.proxy.identity): with identity_name set the proxy gets a certificate from
    # the identity service and speaks mTLS to meshed peers; unset means plaintext only.
    identity_name: str | None = None  # <sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain>
    identity_token_path: str | None = None
    identity_trust_anchors: str | None = None  # PEM bundle of one or more anchors
    identity_addrs: str | None = None  # comma-separated host:port of identity service replicas
    # The control plane's own identities (Linkerd's LINKERD2_PROXY_{IDENTITY,DESTINATION,POLICY}_SVC_NAME):
    # with a name set, that service is dialled over TLS and must present a certificate for the name
    # (chained to the trust anchors); destination and policy over mutual TLS with the proxy's own
    # certificate. Unset: plaintext (a control plane on loopback, or tests).
    identity_svc_name: str | None = None
    destination_svc_name: str | None = None
    policy_svc_name: str | None = None
    identity_key_path: str | None = None  # write the private key here (default: memory only)
    identity_handshake_timeout: float = 10.0
    identity_bundle_poll_interval: float = 5.0  # how often the trust bundle file is checked
    # TLS 1.3 session resumption between tether proxies (Linkerd's proxy has none): a client offers
    # a session for at most this long after the full handshake that verified the peer, never past
    # either certificate's notAfter, and only with the client context that made it. 0 turns it off
    # on both sides (no tickets issued or accepted). Sessions are kept per (identity, address),
    # at most identity_tls_session_cache_entries of them, least recently used dropped first.
    identity_tls_session_max_age: float = 300.0
    identity_tls_session_cache_entries: int = 256  # ~17 KiB each (the session holds the peer certificate)
    identity_tls_server_session_cache_entries: int = 256  # sessions the inbound side keeps (~11 KiB each)
    # Full handshakes with OpenSSL 3.0 (tlsctl): peer chains already verified are remembered, this
    # many per mesh context (~1.2 KiB each; 0: every handshake verifies in full), and OpenSSL's
    # built-in EC key code does the EC work instead of its providers (false: providers only; never
    # with FIPS properties).
    identity_tls_verified_chain_cache_entries: int = 64
    identity_tls_openssl_legacy_ec: bool = True
    # Tap (io.linkerd.proxy.tap.Tap/Observe on --tap-addr, mTLS): only the identities listed may tap
    # (unset: Linkerd's viz tap identity, tap.linkerd-viz.serviceaccount.identity.<the proxy's
    # control-plane namespace and trust domain>). Off without an identity, or with --tap-disabled.
    tap_addr: tuple[str, int] = ("0.0.0.0", 4190)
    tap_authorized_identities: str | None = None
    tap_disabled: bool = False
    tap_max_observers: int = 16  # taps running at once; one more is refused (RESOURCE_EXHAUSTED)
    tap_max_buffered_events: int = 1000  # events waiting for one tap's client; more are dropped, counted
    # Tracing: spans exported with OTLP to this collector (host:port; config.linkerd.io/trace-collector),
    # over gRPC (4317) or HTTP protobuf (--trace-collector-protocol http: POST /v1/traces).
    trace_collector: str | None = None
    trace_collector_protocol: str = "grpc"  # grpc | http
    trace_service_name: str = "linkerd-proxy"
    trace_attributes: str | None = None  # extra resource attributes, k=v,k=v (pod, namespace)
    # A request with no trace context starts a trace with this probability (one carrying a sampled
    # flag is honoured as it says).
    trace_sample_rate: float = 0.0
    trace_max_buffered_spans: int = 2048  # spans waiting for export; more are dropped, counted
    trace_batch_spans: int = 512  # spans per export request
    trace_export_interval: float = 1.0  # a partial batch is sent after this long
    trace_export_timeout: float = 5.0
    # Access log (config.linkerd.io/access-log: apache | json): one line per HTTP request, written by a
    # writer thread from a bounded queue (lines dropped and counted when it is full). Unset: off.
    access_log: str | None = None
    access_log_path: str | None = None  # default: standard error, as Linkerd's proxy writes it
    access_log_max_buffered_lines: int = 10_000
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProxyConfig:
        """Build a config from TETHER_PROXY_* variables over the defaults."""
        env = os.environ if env is None else env
        cfg = cls()
        for f in dataclasses.fields(cls):
            key = "TETHER_PROXY_" + f.name.upper()
            if key in env:
                cfg.set(f.name, env[key], key)
        return cfg

    def set(self, name: str, text: str, setting: str) -> None:
        """Set one field from its text form; ``setting`` names it in errors."""
        current = getattr(self, name)
        value: object
        if name.endswith("_addr"):
            value = parse_addr(text, setting)
        elif name == "opaque_ports":
            value = parse_ports(text, setting)
        elif name in SIZE_FIELDS:
            value = parse_size(text, setting)
        elif name in NOT_DURATIONS:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{setting}: {text!r} is not a number") from None
        elif isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{setting}: {text!r} is not true or false")
            value = text.lower() in ("true", "1", "yes")
        elif isinstance(current, float) or name.endswith(("_timeout", "_period", "_penalty", "_rtt")):
            value = parse_duration(text, setting)
        elif isinstance(current, int):
            try:
                value = int(text)
            except ValueError:
                raise ConfigError(f"{setting}: {text!r} is not an integer") from None
            if name in INT_MINIMUMS and value < INT_MINIMUMS[name]:
                raise ConfigError(f"{setting}: {text!r} is below the minimum, {INT_MINIMUMS[name]}")
        else:
            value = text
        setattr(self, name, value)

    def env_dict(self) -> dict[str, str]:
        """The effective settings, as /env.json shows them; unset optional settings are left out.

        Each value is in the form its environment variable accepts (``10s``, ``64Ki``, ``true``).
        """
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or f.name == "extra":
                continue
            out["TETHER_PROXY_" + f.name.upper()] = format_value(f.name, v)
        return out


def format_value(name: str, value: object) -> str:
    """A field's value in the text form ``ProxyConfig.set`` reads back (``none`` for unset)."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        host = f"[{value[0]}]" if ":" in str(value[0]) else value[0]
        return f"{host}:{value[1]}"
    if isinstance(value, frozenset):
        return ",".join(str(p) for p in sorted(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in SIZE_FIELDS and isinstance(value, int):
        return format_size(value)
    if isinstance(value, float) and name not in NOT_DURATIONS:
        return format_duration(value)
    return str(value)


# -- what each component reads --------------------------------------------------------------------
# The flags and environment variables above are one flat surface; each component gets only its
# group, built once at start. Attribute names match the flat fields so a setting has one name.


@dataclass(frozen=True, slots=True)
class DetectSettings:
    """Protocol detection on accepted connections."""

    opaque_ports: frozenset[int]
    detect_timeout: float
    detect_peek_bytes: int
    header_read_timeout: float
    linger_timeout: float
    inbound_app_port: int | None  # the application port when traffic is not redirected


@dataclass(frozen=True, slots=True)
class H1ServerSettings:
    """The HTTP/1 server codec."""

    max_header_bytes: int
    header_read_timeout: float
    idle_timeout: float
    body_buffer_high: int
    linger_timeout: float
    write_stall_timeout: float


@dataclass(frozen=True, slots=True)
class H2Settings:
    """The HTTP/2 codec, server and client side."""

    h2_max_concurrent_streams: int
    h2_max_resets_per_window: int
    h2_reset_window: float
    h2_initial_window: int
    max_header_bytes: int
    idle_timeout: float
    shutdown_grace_period: float
    failfast_timeout: float  # how long a client request waits for a stream slot
    h2_rapid_reset_age: float  # a reset of an unanswered stream younger than this counts as rapid
    write_stall_timeout: float  # the peer reads nothing / keeps a window shut this long: closed
    h2_max_continuation_frames: int


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Connections to one endpoint: HTTP/1 keep-alive pool and the HTTP/2 connection."""

    connect_timeout: float
    pool_max_idle_per_endpoint: int
    pool_idle_timeout: float
    max_header_bytes: int
    body_buffer_high: int
    h2: H2Settings
    h2_max_connections_per_endpoint: int
    write_stall_timeout: float  # an upstream that reads none of a request body this long is cut off


@dataclass(frozen=True, slots=True)
class BalancerSettings:
    """A destination's load balancer (defaults: ProxyConfig's, linkerd2-proxy's)."""

    failfast_timeout: float
    balancer_queue_capacity: int
    ewma_default_rtt: float
    ewma_decay: float
    failure_accrual_max_failures: int
    failure_accrual_min_penalty: float
    failure_accrual_max_penalty: float
    failure_accrual_jitter: float


def detect_settings(cfg: ProxyConfig) -> DetectSettings:
    app = cfg.inbound_app_addr
    return DetectSettings(cfg.opaque_ports, cfg.detect_timeout, cfg.detect_peek_bytes, cfg.header_read_timeout,
                          cfg.linger_timeout, app[1] if app is not None else None)


def h1_server_settings(cfg: ProxyConfig) -> H1ServerSettings:
    return H1ServerSettings(cfg.max_header_bytes, cfg.header_read_timeout, cfg.idle_timeout,
                            cfg.body_buffer_high, cfg.linger_timeout, cfg.write_stall_timeout)


def h2_settings(cfg: ProxyConfig) -> H2Settings:
    return H2Settings(cfg.h2_max_concurrent_streams, cfg.h2_max_resets_per_window, cfg.h2_reset_window,
                      cfg.h2_initial_window, cfg.max_header_bytes, cfg.idle_timeout,
                      cfg.shutdown_grace_period, cfg.failfast_timeout, cfg.h2_rapid_reset_age,
                      cfg.write_stall_timeout, cfg.h2_max_continuation_frames)


def client_settings(cfg: ProxyConfig, connect_timeout: float) -> ClientSettings:
    return ClientSettings(connect_timeout, cfg.pool_max_idle_per_endpoint, cfg.pool_idle_timeout,
                          cfg.max_header_bytes, cfg.body_buffer_high, h2_settings(cfg),
                          cfg.h2_max_connections_per_endpoint, cfg.write_stall_timeout)


def balancer_settings(cfg: ProxyConfig) -> BalancerSettings:
    return BalancerSettings(cfg.failfast_timeout, cfg.balancer_queue_capacity, cfg.ewma_default_rtt,
                            cfg.ewma_decay, cfg.failure_accrual_max_failures, cfg.failure_accrual_min_penalty,
                            cfg.failure_accrual_max_penalty, cfg.failure_accrual_jitter)
