"""``tether proxy``: run the sidecar proxy.

Every ProxyConfig field is a flag (``--inbound-addr``) and an environment variable
(``TETHER_PROXY_INBOUND_ADDR``); flags win over the environment, which wins over defaults. The
help line, unit and metavar of each flag live in ``FLAGS`` below (a test fails when a new
ProxyConfig field has no entry). Values are checked by ``ProxyConfig.set`` itself, at parse time,
so a bad value is a usage error naming the flag before anything is bound.

This module does not import click at the top: ``parse_fast`` reads a valid command line without
it, so the sidecar does not carry the CLI framework in its memory (``command()`` builds the click
command for help, completion and every error).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

from tether.cli.errors import CliError
from tether.proxy.config import ConfigError, ProxyConfig, format_value

if TYPE_CHECKING:
    import click


class Flag(NamedTuple):
    metavar: str  # the unit: DURATION (500ms, 10s, 2m), SIZE (64Ki), HOST:PORT, ...
    help: str


FLAGS: dict[str, Flag] = {
    "inbound_addr": Flag("HOST:PORT", "inbound listener: meshed and redirected inbound connections"),
    "outbound_addr": Flag("HOST:PORT", "outbound listener: the application's outgoing connections"),
    "admin_addr": Flag("HOST:PORT", "admin server: /metrics, /ready, /live, /env.json, /proxy-log-level"),
    "inbound_app_addr": Flag(
        "HOST:PORT", "the local application, for inbound connections without an original destination "
        "(not redirected by iptables)"),
    "opaque_ports": Flag("PORTS", "ports whose traffic skips protocol detection (server-speaks-first protocols)"),
    "detect_timeout": Flag("DURATION", "wait this long for a connection's first bytes, then treat it as TCP"),
    "detect_peek_bytes": Flag("SIZE", "bytes read to detect a connection's protocol"),
    "max_header_bytes": Flag("SIZE", "largest HTTP/1 message head; a larger request gets 431"),
    "header_read_timeout": Flag("DURATION", "time allowed to receive a request's headers"),
    "idle_timeout": Flag("DURATION", "close a client connection idle this long"),
    "write_stall_timeout": Flag("DURATION", "close a connection (or reset an HTTP/2 stream) whose peer reads "
                                "nothing sent to it for this long"),
    "loop_lag_interval": Flag("DURATION", "how often the event loop's lag is sampled for "
                              "tether_event_loop_lag_* (0: not sampled)"),
    "gc_full_interval": Flag("DURATION", "how often the objects frozen after full garbage collections are "
                             "collected once more (0: never; each such collection pauses the proxy "
                             "~15 ms per 1,000 open connections)"),
    "outbound_connect_timeout": Flag("DURATION", "time allowed to connect to an upstream endpoint"),
    "inbound_connect_timeout": Flag("DURATION", "time allowed to connect to the local application"),
    "failfast_timeout": Flag("DURATION", "a request waiting this long for an available endpoint fails with 503"),
    "response_timeout": Flag("DURATION", "time allowed for a response's headers (unset: no limit)"),
    "pool_max_idle_per_endpoint": Flag("COUNT", "idle upstream connections kept per endpoint"),
    "pool_idle_timeout": Flag("DURATION", "close an upstream connection idle this long"),
    "ewma_default_rtt": Flag("DURATION", "latency assumed for an endpoint not yet measured (peak-EWMA)"),
    "ewma_decay": Flag("DURATION", "peak-EWMA decay time"),
    "failure_accrual_max_failures": Flag("COUNT", "consecutive failures that take an endpoint out of balancing"),
    "failure_accrual_min_penalty": Flag("DURATION", "first backoff of an endpoint taken out"),
    "failure_accrual_max_penalty": Flag("DURATION", "longest backoff of an endpoint taken out"),
    "failure_accrual_jitter": Flag("FRACTION", "random jitter added to each backoff, as a fraction of it"),
    "balancer_queue_capacity": Flag("COUNT", "requests that may wait for an endpoint; more are refused"),
    "h2_max_concurrent_streams": Flag("COUNT", "HTTP/2 streams a peer may open at once per connection"),
    "h2_max_resets_per_window": Flag(
        "COUNT", "stream resets per --h2-reset-window before the connection is closed (rapid reset)"),
    "h2_reset_window": Flag("DURATION", "window over which stream resets are counted"),
    "h2_initial_window": Flag("SIZE", "HTTP/2 initial flow-control window"),
    "h2_max_continuation_frames": Flag("COUNT", "CONTINUATION frames allowed after one HEADERS frame; more "
                                       "ends the connection (CONTINUATION flood)"),
    "h2_max_connections_per_endpoint": Flag("COUNT", "HTTP/2 connections opened to one endpoint when each is at "
                                            "the peer's concurrent-stream limit"),
    "h2_rapid_reset_age": Flag("DURATION", "a peer's reset of a stream unanswered for less than this counts "
                               "toward rapid-reset protection"),
    "tcp_zero_copy": Flag("BOOL", "move opaque TCP between plain sockets with splice(2), never through Python"),
    "body_buffer_high": Flag("SIZE", "body bytes buffered per message before reading from the sender pauses"),
    "connect_retry_attempts": Flag("COUNT", "endpoints a request is tried on when connecting is refused"),
    "cache_max_idle_age": Flag("DURATION", "drop a destination's balancer and connections unused this long"),
    "linger_timeout": Flag("DURATION", "after an error response, read and drop what the client still sends "
                           "for this long"),
    "metrics_retain_idle": Flag("DURATION", "drop a metric series nothing was counted into for this long"),
    "shutdown_grace_period": Flag("DURATION", "on SIGTERM, time in-flight requests get to finish"),
    "enable_admin_shutdown": Flag("BOOL", "allow POST /shutdown on the admin server (from loopback only)"),
    "tap_addr": Flag("HOST:PORT", "tap server (io.linkerd.proxy.tap.Tap, mTLS): live requests for authorized "
                     "clients"),
    "tap_authorized_identities": Flag("NAME,...", "identities allowed to tap, comma-separated (unset: "
                                      "tap.linkerd-viz.serviceaccount.identity.<this proxy's control plane>)"),
    "tap_disabled": Flag("BOOL", "do not serve tap"),
    "tap_max_observers": Flag("COUNT", "taps running at once; one more is refused"),
    "tap_max_buffered_events": Flag("COUNT", "events waiting for one tap client; more are dropped and counted"),
    "trace_collector": Flag("HOST:PORT", "OTLP collector that receives the proxy's spans (unset: no tracing)"),
    "trace_collector_protocol": Flag("PROTO", "OTLP transport: grpc (ExportTraceServiceRequest) or http "
                                     "(POST /v1/traces, protobuf)"),
    "trace_service_name": Flag("NAME", "service.name resource attribute of the proxy's spans"),
    "trace_attributes": Flag("K=V,...", "extra resource attributes of the proxy's spans"),
    "trace_sample_rate": Flag("FRACTION", "probability a request without trace context starts a sampled trace"),
    "trace_max_buffered_spans": Flag("COUNT", "spans waiting for export; more are dropped and counted"),
    "trace_batch_spans": Flag("COUNT", "spans per export request"),
    "trace_export_interval": Flag("DURATION", "a partial batch of spans is exported after this long"),
    "trace_export_timeout": Flag("DURATION", "time allowed for one export request"),
    "access_log": Flag("FORMAT", "access log per HTTP request: apache or json (unset: off)"),
    "access_log_path": Flag("PATH", "file the access log is appended to (unset: standard error)"),
    "access_log_max_buffered_lines": Flag("COUNT", "access log lines waiting to be written; more are dropped "
                                          "and counted"),
    "log_level": Flag("SPEC", "log levels: a level and target=level pairs (trace, debug, info, warn, error, off)"),
    "log_format": Flag("FORMAT", "log line format: plain or json"),
    "destinations_file": Flag("PATH", "static discovery: a YAML file of authorities and endpoints, reloaded "
                              "when it changes"),
    "destination_addrs": Flag("HOST:PORT,...", "the destination service's replicas: endpoints of every "
                              "destination come from it (the proxy dials them in turn and fails over)"),
    "destination_context": Flag("JSON", 'who this proxy is, for the destination service (unset: '
                                '{"ns": the identity\'s namespace})'),
    "policy_addrs": Flag("HOST:PORT,...", "the inbound policy service's replicas (tether's destination controller "
                         "serves it): each inbound port's policy is watched there (unset: "
                         "--default-inbound-policy for every port)"),
    "default_inbound_policy": Flag("POLICY", "the policy of every inbound port without a control plane: "
                                   "all-unauthenticated, all-authenticated, cluster-authenticated, "
                                   "cluster-unauthenticated, deny or audit"),
    "cluster_networks": Flag("CIDR,...", "the cluster's networks, for the cluster-* default policies"),
    "policy_workload": Flag("JSON", 'this proxy\'s workload for the inbound policy service, {"ns": ..., "pod": ...} '
                            "(unset: from --destination-context, else the identity's service account)"),
    "inbound_policy_timeout": Flag("DURATION", "how long an inbound connection waits for its port's first "
                                   "policy before it is denied"),
    "inbound_permit_localhost": Flag("BOOL", "always permit inbound clients on 127.0.0.1 and ::1 (as Linkerd)"),
    "identity_name": Flag("NAME", "this proxy's identity, <sa>.<ns>.serviceaccount.identity.<cp-ns>.<trust-domain> "
                          "(unset: no certificate, no mTLS)"),
    "identity_token_path": Flag("PATH", "the workload's bootstrap token, sent to the identity service"),
    "identity_trust_anchors": Flag("PATH", "PEM bundle of trust anchors, reloaded when it changes"),
    "identity_addrs": Flag("HOST:PORT,...", "identity service replicas"),
    "outbound_h2_upgrade": Flag("BOOL", "send HTTP/1 requests to meshed endpoints the destination hints h2 over "
                                "one HTTP/2 connection per peer proxy (l5d-orig-proto, as Linkerd's proxies do)"),
    "identity_svc_name": Flag("NAME", "the identity service's own identity: dial it over TLS and require a "
                              "certificate for this name (unset: plaintext)"),
    "destination_svc_name": Flag("NAME", "the destination service's identity: dial it over mutual TLS with this "
                                 "proxy's certificate and require one for this name (unset: plaintext)"),
    "policy_svc_name": Flag("NAME", "the inbound policy service's identity, as --destination-svc-name"),
    "identity_key_path": Flag("PATH", "write the private key here too (unset: memory only)"),
    "identity_handshake_timeout": Flag("DURATION", "time allowed for a call to the identity service"),
    "identity_bundle_poll_interval": Flag("DURATION", "how often the trust anchors file is checked for changes"),
    "identity_tls_session_max_age": Flag("DURATION", "how long a client proxy may resume a TLS session with a peer "
                                         "proxy after verifying it (0: no resumption)"),
    "identity_tls_session_cache_entries": Flag("COUNT", "TLS sessions kept per client certificate, one per peer "
                                               "identity and address"),
    "identity_tls_server_session_cache_entries": Flag("COUNT", "TLS sessions the inbound side keeps for its "
                                                      "clients to resume (the oldest go first)"),
    "identity_tls_verified_chain_cache_entries": Flag("COUNT", "peer certificate chains each mesh TLS context "
                                                      "remembers as verified, so a full handshake with a peer met "
                                                      "before skips their signature checks (0: verify every time)"),
    "identity_tls_openssl_legacy_ec": Flag("BOOL", "with OpenSSL 3.0, let its built-in EC key code decode, sign and "
                                           "verify instead of its providers (faster full handshakes; never with "
                                           "FIPS properties)"),
}
# Set in code or by tests, never from the command line.
HIDDEN = frozenset({"extra"})


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return "TETHER_PROXY_" + field.upper()


def check_value(field: str, text: str) -> str:
    """Check a flag's text with the config's own parser (ConfigError naming the flag); returns it."""
    ProxyConfig().set(field, text, flag_name(field))
    if field == "log_level":
        from tether.proxy.logging import LogSpecError, parse_spec

        try:
            parse_spec(text)
        except LogSpecError as e:
            raise ConfigError(f"{flag_name(field)}: {e}") from None
    if field == "destination_context":
        import json

        try:
            json.loads(text)
        except ValueError:
            raise ConfigError(f"{flag_name(field)}: {text!r} is not JSON") from None
    if field == "default_inbound_policy":
        from tether.core.policy.authz import DEFAULT_POLICIES

        if text not in DEFAULT_POLICIES:
            raise ConfigError(f"{flag_name(field)}: {text!r} is not one of {', '.join(DEFAULT_POLICIES)}")
    if field == "cluster_networks":
        from tether.core.policy.authz import PolicyError, networks

        try:
            networks(c.strip() for c in text.split(",") if c.strip())
        except PolicyError as e:
            raise ConfigError(f"{flag_name(field)}: {e}") from None
    if field == "policy_workload":
        import json

        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not doc.get("ns") or not doc.get("pod"):
            raise ConfigError(f'{flag_name(field)}: {text!r} is not JSON like {{"ns": "NS", "pod": "NAME"}}')
    if field == "log_format" and text not in ("plain", "json"):
        raise ConfigError(f"{flag_name(field)}: {text!r} is not plain or json")
    return text


_BY_FLAG = {flag_name(f): f for f in FLAGS}


def parse_fast(argv: list[str]) -> dict[str, str] | None:
    """``--flag VALUE`` / ``--flag=VALUE`` pairs, all known and valid, as {field: text}; None for
    anything else (help, an unknown flag, a bad value), which click then parses and reports."""
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        field = _BY_FLAG.get(flag)
        if field is None:
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        i += 1
        try:
            values[field] = check_value(field, value)
        except ConfigError:
            return None
    return values


def command() -> click.Command:
    """The click command: the same flags, for --help, completion and errors."""
    import click

    class ConfigValue(click.ParamType):
        def __init__(self, field: str) -> None:
            self.field = field
            self.name = FLAGS[field].metavar.lower()

        def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
            try:
                return check_value(self.field, str(value))
            except ConfigError as e:
                # The config's message starts with the flag name, which click prints already.
                self.fail(str(e).removeprefix(flag_name(self.field) + ": "), param, ctx)

    defaults = ProxyConfig()
    params: list[click.Parameter] = []
    for f in dataclasses.fields(ProxyConfig):
        if f.name in HIDDEN:
            continue
        flag = FLAGS[f.name]
        default = getattr(defaults, f.name)
        shown = [f"env var: {env_name(f.name)}"]
        if default is not None:
            shown.append(f"default: {format_value(f.name, default)}")
        params.append(click.Option(
            [flag_name(f.name), f.name], type=ConfigValue(f.name), metavar=flag.metavar, default=None,
            help=f"{flag.help} [{'; '.join(shown)}]",
        ))
    return click.Command(
        "proxy",
        callback=lambda **values: run(values),
        params=params,
        help="Run the sidecar proxy: inbound, outbound and admin listeners.\n\n"
        "Every flag can also be set by its environment variable; flags win. Durations read 500ms, 10s, 2m, 1h; "
        "sizes 65536, 64Ki, 1Mi; ports 25,587,4000-4010.",
        short_help="run the sidecar proxy",
    )


def config_from_flags(values: dict[str, str | None]) -> ProxyConfig:
    """Defaults, then TETHER_PROXY_* variables, then the flags given."""
    try:
        cfg = ProxyConfig.from_env()
        for name, text in values.items():
            if text is not None:
                cfg.set(name, text, flag_name(name))
    except ConfigError as e:
        raise CliError(str(e)) from None
    return cfg


def run(values: dict[str, Any]) -> int:
    """Build the config (defaults, environment, flags) and run the proxy until it stops."""
    cfg = config_from_flags(values)
    from tether.proxy import logging as proxy_logging

    try:
        control = proxy_logging.configure_logging(cfg.log_level, cfg.log_format)
    except ValueError as e:
        raise CliError(f"TETHER_PROXY_LOG_LEVEL/TETHER_PROXY_LOG_FORMAT: {e}") from None
    from tether.proxy.app import run as run_proxy
    from tether.proxy.discovery import DiscoveryError

    try:
        return run_proxy(cfg, control)
    except DiscoveryError as e:
        raise CliError(f"--destinations-file: {e}") from None
    except ConfigError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        from tether.cli.errors import OperationFailed

        # Most often a listener address already in use.
        raise OperationFailed(f"cannot start the proxy: {e}") from None
