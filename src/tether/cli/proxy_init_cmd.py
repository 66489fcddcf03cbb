"""``tether proxy-init``: install the iptables redirect rules in the current network namespace."""

from __future__ import annotations

import shutil
import subprocess

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import CIDRS, PORTS
from tether.core.interception import InterceptionError, InterceptionOptions, cleanup_rules, rules

PORT = click.IntRange(1, 65535)
# The binary each --iptables-mode runs (auto: whatever `iptables` is on this host).
BINARIES = {"legacy": "iptables-legacy", "nft": "iptables-nft", "auto": "iptables"}


def _binary(mode: str, dry_run: bool) -> str:
    name = BINARIES[mode]
    if dry_run:
        return name
    path = shutil.which(name)
    if path is None:
        raise OperationFailed(f"--iptables-mode {mode}: {name} is not installed (apt-get install iptables)")
    return path


@click.command("proxy-init", short_help="install iptables rules redirecting a pod's TCP through its proxy")
@click.option("--incoming-proxy-port", type=PORT, default=4143, show_default=True,
              help="port of the proxy's inbound listener; inbound TCP is redirected to it")
@click.option("--outgoing-proxy-port", type=PORT, default=4140, show_default=True,
              help="port of the proxy's outbound listener; the application's outbound TCP is redirected to it")
@click.option("--proxy-uid", type=click.IntRange(0, 2**32 - 2), default=2102, show_default=True,
              help="uid the proxy runs as; its own connections are not redirected")
@click.option("--inbound-ports-to-ignore", type=PORTS, default="4190,4191", show_default=True,
              help="inbound ports and ranges left alone (comma-separated)")
@click.option("--outbound-ports-to-ignore", type=PORTS, default="", help="outbound ports and ranges left alone")
@click.option("--subnets-to-ignore", type=CIDRS, default="",
              help="destination networks left alone (comma-separated CIDRs)")
@click.option("--redirect-self-calls/--no-redirect-self-calls", default=True, show_default=True,
              help="send the proxy's connections to the pod's own address (a workload calling its own Service) "
                   "to its inbound listener; off for a proxy that dials the application on the pod's address "
                   "(linkerd2-proxy), which would loop")
@click.option("--iptables-mode", type=click.Choice(list(BINARIES)), default="auto", show_default=True,
              help="which iptables to run: iptables-legacy, iptables-nft, or the host's iptables")
@click.option("--dry-run", is_flag=True, help="print the iptables commands, change nothing")
@click.option("--cleanup", is_flag=True, help="remove tether's rules instead")
def proxy_init(
    incoming_proxy_port: int,
    outgoing_proxy_port: int,
    proxy_uid: int,
    inbound_ports_to_ignore: tuple[str, ...],
    outbound_ports_to_ignore: tuple[str, ...],
    subnets_to_ignore: tuple[str, ...],
    redirect_self_calls: bool,
    iptables_mode: str,
    dry_run: bool,
    cleanup: bool,
) -> int:
    """Install the iptables rules that send a pod's TCP through its proxy (what linkerd-init does).

    Inbound TCP goes to the proxy's inbound port and the application's outbound TCP to its outbound
    port, except the proxy's own connections (by uid), loopback, and the ports and networks ignored.
    Needs CAP_NET_ADMIN in the pod's network namespace; --dry-run needs nothing.
    """
    opts = InterceptionOptions(
        inbound_port=incoming_proxy_port,
        outbound_port=outgoing_proxy_port,
        proxy_uid=proxy_uid,
        ignore_inbound_ports=inbound_ports_to_ignore,
        ignore_outbound_ports=outbound_ports_to_ignore,
        skip_subnets=subnets_to_ignore,
        redirect_self_calls=redirect_self_calls,
    )
    try:
        cmds = cleanup_rules() if cleanup else rules(opts)
    except InterceptionError as e:
        raise CliError(str(e)) from None
    binary = _binary(iptables_mode, dry_run)
    for cmd in cmds:
        if dry_run:
            click.echo(" ".join([binary, *cmd]))
            continue
        r = subprocess.run([binary, "-w", "5", *cmd], capture_output=True, text=True, timeout=30)
        if r.returncode != 0 and not cleanup:
            raise OperationFailed(f"{binary} {' '.join(cmd)} failed: {r.stderr.strip()}")
    return 0
