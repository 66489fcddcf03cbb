"""Flag value types and the flags several commands share (state directory, control plane names).

Each type turns bad input into a usage error that names the flag (click adds "Invalid value for
'--flag'"), and durations and sizes read the same forms everywhere: ``500ms``, ``10s``, ``2m``,
``1h``; ``65536``, ``64Ki``, ``1Mi``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tether.core.identity.names import DEFAULT_CONTROL_PLANE_NS, DEFAULT_TRUST_DOMAIN

F = TypeVar("F", bound=Callable[..., Any])
def user_state_dir() -> str:
    """The user's state directory for tether: $XDG_STATE_HOME/tether, else ~/.local/state/tether
    (the XDG base directory convention), so every command finds the same mesh wherever it runs."""
    import os

    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "tether")


DEFAULT_STATE_DIR_SHOWN = "$XDG_STATE_HOME/tether, else ~/.local/state/tether"


class Duration(click.ParamType):
    """A duration in seconds (float) from ``500ms``, ``10s``, ``2m``, ``1h`` or a bare number of seconds."""

    name = "duration"

    def __init__(self, minimum: float = 0.0, positive: bool = False) -> None:
        self.minimum, self.positive = minimum, positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        from tether.proxy.config import ConfigError, parse_duration

        try:
            seconds = parse_duration(str(value), "duration")
        except ConfigError:
            # Go's compound form too (24h0m0s: Linkerd's values and `kubectl` print durations so).
            from tether.core.durations import parse_duration as parse_go_duration

            try:
                seconds = parse_go_duration(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a duration like 500ms, 10s, 2m or 1h", param, ctx)
        if self.positive and seconds <= 0:
            self.fail(f"{value!r}: must be more than zero", param, ctx)
        return seconds


class Address(click.ParamType):
    """``host:port`` (``[v6]:port``) as a (host, port) tuple."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        from tether.proxy.config import ConfigError, parse_addr

        try:
            return parse_addr(str(value), "address")
        except ConfigError:
            self.fail(f"{value!r} is not host:port (port 0-65535)", param, ctx)


class PortList(click.ParamType):
    """Comma-separated ports and ranges (``4190,4191,5000-5010``), each 1-65535, as strings."""

    name = "ports"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        out = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                self.fail(f"{part!r} is not a port or a port range like 5000-5010", param, ctx)
            if not 0 < int(lo) <= int(hi or lo) <= 65535:
                self.fail(f"{part!r} is out of range 1-65535", param, ctx)
            out.append(part)
        return tuple(out)


class CidrList(click.ParamType):
    """Comma-separated networks (``10.0.0.0/8,fd00::/8``), each a valid CIDR, as strings."""

    name = "cidrs"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        out = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            try:
                out.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                self.fail(f"{part!r} is not a network like 10.0.0.0/8", param, ctx)
        return tuple(out)


class DnsLabel(click.ParamType):
    """An RFC 1123 label (namespaces, names, service accounts)."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from tether.core.identity.names import IdentityNameError, check_label

        try:
            return check_label(str(value), "name")
        except IdentityNameError:
            self.fail(f"{value!r} is not a DNS label (1-63 of a-z, 0-9, '-')", param, ctx)


class TrustDomain(click.ParamType):
    name = "domain"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from tether.core.identity.names import IdentityNameError, check_trust_domain

        try:
            return check_trust_domain(str(value))
        except IdentityNameError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()
POSITIVE_DURATION = Duration(positive=True)
ADDRESS = Address()
PORTS = PortList()
CIDRS = CidrList()
DNS_LABEL = DnsLabel()
TRUST_DOMAIN = TrustDomain()


def state_dir_option(f: F) -> F:
    """``--state-dir``: the local platform's state (workload registry, control-plane records)."""
    return click.option(
        "--state-dir", default=user_state_dir, show_default=DEFAULT_STATE_DIR_SHOWN, envvar="TETHER_STATE_DIR",
        show_envvar=True,
        type=click.Path(file_okay=False), help="local state directory: workload registry and control-plane records",
    )(f)


def _default_resources_dir() -> str:
    import os

    return os.path.join(os.environ.get("TETHER_STATE_DIR") or user_state_dir(), "resources")


def resources_dir_option(f: F) -> F:
    """``--resources-dir``: the local store, a directory of YAML resources (any file names, multi-document)."""
    return click.option(
        # Under $TETHER_STATE_DIR when that is set: where `tether up --state-dir` keeps its store.
        "--resources-dir", default=_default_resources_dir,
        show_default="$TETHER_STATE_DIR/resources, else the default state directory's resources",
        envvar="TETHER_RESOURCES_DIR",
        show_envvar=True, type=click.Path(file_okay=False),
        help="the local store: a directory of YAML resource files (any names, multi-document)",
    )(f)


def control_plane_options(f: F) -> F:
    """``--controller-namespace`` and ``--identity-trust-domain``: the two parts of every identity name."""
    f = click.option(
        "--identity-trust-domain", "--trust-domain", "trust_domain", default=DEFAULT_TRUST_DOMAIN,
        show_default=True, type=TRUST_DOMAIN, envvar="TETHER_TRUST_DOMAIN", show_envvar=True,
        help="trust domain of identity names and SPIFFE ids",
    )(f)
    f = click.option(
        "-L", "--controller-namespace", "controller_namespace", default=DEFAULT_CONTROL_PLANE_NS, show_default=True,
        type=DNS_LABEL, envvar="TETHER_CONTROLLER_NAMESPACE", show_envvar=True,
        help="control-plane namespace, part of every identity name",
    )(f)
    return f


def namespace_option(f: F) -> F:
    return click.option(
        "-n", "--namespace", default="default", show_default=True, type=DNS_LABEL, help="the workload's namespace"
    )(f)


PLATFORMS = ("local", "kubernetes")


def kube_options(f: F) -> F:
    """``--kubeconfig`` and ``--context``, as kubectl's (default: $KUBECONFIG, ~/.kube/config, or in-cluster)."""
    f = click.option("--context", "kube_context", metavar="NAME", default=None,
                     help="kubeconfig context to use (default: the current context)")(f)
    f = click.option("--kubeconfig", metavar="PATH", default=None, type=click.Path(dir_okay=False),
                     help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the in-cluster account)")(f)
    return f


def platform_options(f: F) -> F:
    """``--platform local|kubernetes`` plus the Kubernetes connection flags."""
    f = kube_options(f)
    f = click.option("--platform", type=click.Choice(PLATFORMS), default="local", show_default=True,
                     envvar="TETHER_PLATFORM", show_envvar=True,
                     help="where the mesh's resources, workloads and tokens come from: the local store, or "
                          "the Kubernetes API server")(f)
    return f
