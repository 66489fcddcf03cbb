"""The iptables rules that send a pod's traffic through its proxy (what linkerd-init installs).

Pure: options in, a list of iptables argument lists out. Inbound TCP is REDIRECTed to the inbound
port in PREROUTING; the application's outbound TCP is REDIRECTed to the outbound port in OUTPUT,
except the proxy's own connections (matched by its uid), loopback traffic, and ignored ports.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

INBOUND_CHAIN = "PROXY_INIT_REDIRECT"
OUTBOUND_CHAIN = "PROXY_INIT_OUTPUT"


@dataclass(frozen=True)
class InterceptionOptions:
    inbound_port: int = 4143
    outbound_port: int = 4140
    proxy_uid: int = 2102
    # Ports never redirected inbound (the proxy's own admin/tap ports among them).
    ignore_inbound_ports: tuple[str, ...] = ("4190", "4191")
    ignore_outbound_ports: tuple[str, ...] = ()
    # Linkerd's default skip ports (4567/4568) are added by the caller when wanted.
    skip_subnets: tuple[str, ...] = ()
    # The proxy's connections to the pod's own address go to its inbound listener (a workload calling
    # its own Service). Only for a proxy that reaches the application on 127.0.0.1, as tether's does:
    # one that dials the pod's address (linkerd2-proxy since Linkerd's proxy-init v1.4 dropped this
    # rule) would loop.
    redirect_self_calls: bool = True
    comment: str = "tether"
    extra: dict[str, str] = field(default_factory=dict)


class InterceptionError(ValueError):
    pass


def _check_ports(ports: tuple[str, ...], what: str) -> None:
    for p in ports:
        lo, _, hi = p.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise InterceptionError(f"{what}: {p!r} is not a port or a port range")
        if not 0 < int(lo) <= int(hi or lo) <= 65535:
            raise InterceptionError(f"{what}: {p!r} is out of range 1-65535")


def _check(opts: InterceptionOptions) -> None:
    """Refuse options that would print rules iptables rejects or that redirect to the wrong place."""
    for what, port in (("inbound_port", opts.inbound_port), ("outbound_port", opts.outbound_port)):
        if not 0 < port <= 65535:
            raise InterceptionError(f"{what}: {port} is out of range 1-65535")
    if not 0 <= opts.proxy_uid < 2**32 - 1:
        raise InterceptionError(f"proxy_uid: {opts.proxy_uid} is not a uid")
    _check_ports(opts.ignore_inbound_ports, "ignore_inbound_ports")
    _check_ports(opts.ignore_outbound_ports, "ignore_outbound_ports")
    for net in opts.skip_subnets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise InterceptionError(f"skip_subnets: {net!r} is not a network like 10.0.0.0/8") from None


def _multiport(ports: tuple[str, ...]) -> list[list[str]]:
    # iptables multiport takes at most 15 ports (a range counts double): one rule per port is simpler.
    return [["--dport", p.replace("-", ":")] for p in ports]


def rules(opts: InterceptionOptions) -> list[list[str]]:
    """The iptables invocations (without the binary name), in order."""
    _check(opts)
    c = ["-m", "comment", "--comment", opts.comment]
    out: list[list[str]] = [
        ["-t", "nat", "-N", INBOUND_CHAIN],
    ]
    for dport in _multiport(opts.ignore_inbound_ports):
        out.append(["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", *dport, "-j", "RETURN", *c])
    out += [
        ["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-port", str(opts.inbound_port), *c],
        ["-t", "nat", "-A", "PREROUTING", "-j", INBOUND_CHAIN, *c],
        ["-t", "nat", "-N", OUTBOUND_CHAIN],
    ]
    if opts.redirect_self_calls:
        # The proxy's connections to this pod's own address (the outbound side dialling the pod's IP,
        # which routes over lo) go to the inbound side, as Linkerd's proxy-init did before v1.4.
        out.append(["-t", "nat", "-A", OUTBOUND_CHAIN, "-m", "owner", "--uid-owner", str(opts.proxy_uid),
                    "-o", "lo", "!", "-d", "127.0.0.1/32", "-j", INBOUND_CHAIN, *c])
    out += [
        # The proxy's other connections leave as they are.
        ["-t", "nat", "-A", OUTBOUND_CHAIN, "-m", "owner", "--uid-owner", str(opts.proxy_uid), "-j", "RETURN", *c],
        # Loopback stays local (the app talking to itself, the proxy to the app).
        ["-t", "nat", "-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN", *c],
    ]
    for dport in _multiport(opts.ignore_outbound_ports):
        out.append(["-t", "nat", "-A", OUTBOUND_CHAIN, "-p", "tcp", *dport, "-j", "RETURN", *c])
    for net in opts.skip_subnets:
        out.append(["-t", "nat", "-A", OUTBOUND_CHAIN, "-d", net, "-j", "RETURN", *c])
    out += [
        ["-t", "nat", "-A", OUTBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-port", str(opts.outbound_port), *c],
        ["-t", "nat", "-A", "OUTPUT", "-j", OUTBOUND_CHAIN, *c],
    ]
    return out


def cleanup_rules() -> list[list[str]]:
    """Invocations that remove what :func:`rules` installed (errors ignored by the caller)."""
    return [
        ["-t", "nat", "-D", "PREROUTING", "-j", INBOUND_CHAIN],
        ["-t", "nat", "-D", "OUTPUT", "-j", OUTBOUND_CHAIN],
        ["-t", "nat", "-F", INBOUND_CHAIN],
        ["-t", "nat", "-X", INBOUND_CHAIN],
        ["-t", "nat", "-F", OUTBOUND_CHAIN],
        ["-t", "nat", "-X", OUTBOUND_CHAIN],
    ]
