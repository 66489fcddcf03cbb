"""``tether proxy-init``: install the iptables redirect rules in the current network namespace."""

from __future__ import annotations

import argparse
import shutil
import subprocess

from tether.cli.main import CliError
from tether.core.interception import InterceptionError, InterceptionOptions, cleanup_rules, rules


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser("proxy-init", help="install iptables rules redirecting a pod's TCP through its proxy")
    p.add_argument("--incoming-proxy-port", type=int, default=4143)
    p.add_argument("--outgoing-proxy-port", type=int, default=4140)
    p.add_argument("--proxy-uid", type=int, default=2102)
    p.add_argument("--inbound-ports-to-ignore", default="4190,4191", help="comma-separated ports/ranges")
    p.add_argument("--outbound-ports-to-ignore", default="", help="comma-separated ports/ranges")
    p.add_argument("--subnets-to-ignore", default="", help="comma-separated CIDRs")
    p.add_argument("--iptables-mode", choices=["legacy", "nft", "auto"], default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the iptables commands, change nothing")
    p.add_argument("--cleanup", action="store_true", help="remove tether's rules instead")
    p.set_defaults(func=run)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _binary(mode: str) -> str:
    names = {"legacy": ["iptables-legacy"], "nft": ["iptables-nft"], "auto": ["iptables"]}[mode]
    for n in names:
        path = shutil.which(n)
        if path:
            return path
    raise CliError(f"--iptables-mode {mode}: {names[0]} is not installed (apt-get install iptables)")


def run(args: argparse.Namespace) -> int:
    opts = InterceptionOptions(
        inbound_port=args.incoming_proxy_port,
        outbound_port=args.outgoing_proxy_port,
        proxy_uid=args.proxy_uid,
        ignore_inbound_ports=_split(args.inbound_ports_to_ignore),
        ignore_outbound_ports=_split(args.outbound_ports_to_ignore),
        skip_subnets=_split(args.subnets_to_ignore),
    )
    try:
        cmds = cleanup_rules() if args.cleanup else rules(opts)
    except InterceptionError as e:
        raise CliError(str(e)) from None
    binary = "iptables" if args.dry_run else _binary(args.iptables_mode)
    for cmd in cmds:
        if args.dry_run:
            print(" ".join([binary, *cmd]))
            continue
        r = subprocess.run([binary, "-w", "5", *cmd], capture_output=True, text=True)
        if r.returncode != 0 and not args.cleanup:
            raise CliError(f"{binary} {' '.join(cmd)} failed: {r.stderr.strip()}")
    return 0
