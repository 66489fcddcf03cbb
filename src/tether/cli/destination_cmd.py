"""`tether controller destination`: discovery, profiles and policies from the store, as gRPC streams.

Registered under `tether controller` by tether.cli.controller_cmd. The CLI is where the platform is
wired in: here the local store (a resources directory and the workload registry).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
from typing import Any

from tether.cli.main import CliError
from tether.proxy.config import ConfigError, parse_addr

POLICIES = (
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "cluster-unauthenticated",
    "deny",
    "audit",
)


def register_controller(sub: Any) -> None:
    p = sub.add_parser(
        "destination",
        help="the destination service: endpoints, profiles, inbound and outbound policy",
        description="Serve io.linkerd.proxy.destination.Destination (Get, GetProfile), "
        "io.linkerd.proxy.outbound.OutboundPolicies and io.linkerd.proxy.inbound.InboundServerPolicies "
        "from the local store: a directory of YAML resources (picked up within a second of an edit) and "
        "the local workload registry. Run several over the same directory for HA.",
    )
    p.add_argument("--addr", default="0.0.0.0:8086", help="gRPC listen address (default 0.0.0.0:8086)")
    p.add_argument("--admin-addr", default="127.0.0.1:9996", help="/metrics, /ready, /store-errors.json")
    p.add_argument("--resources-dir", default=".tether/resources", help="the store's YAML directory")
    p.add_argument("--state-dir", default=".tether", help="local state (workload registry) directory")
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--identity-trust-domain", "--trust-domain", dest="trust_domain", default="cluster.local")
    p.add_argument("--controller-namespace", default="linkerd", help="control-plane namespace in identity names")
    p.add_argument("--default-policy", default="all-unauthenticated", choices=POLICIES)
    p.add_argument("--cluster-networks", default="10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8")
    p.add_argument("--stream-queue-limit", type=int, default=1000, help="updates a stream may fall behind (1000)")
    p.add_argument("--poll-interval", default="250ms", help="how often the resources directory is checked")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tether.control.destination.server import DestinationConfig, DestinationController
    from tether.control.destination.translate import Settings
    from tether.platform.local.store import LocalStore
    from tether.proxy.config import parse_duration

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        nets = tuple(n.strip() for n in args.cluster_networks.split(",") if n.strip())
        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise CliError(f"--cluster-networks: {n!r} is not a CIDR") from None
        if args.stream_queue_limit < 1:
            raise CliError("--stream-queue-limit: must be at least 1")
        cfg = DestinationConfig(
            addr=parse_addr(args.addr, "--addr"),
            admin_addr=parse_addr(args.admin_addr, "--admin-addr"),
            settings=Settings(
                cluster_domain=args.cluster_domain,
                trust_domain=args.trust_domain,
                control_plane_ns=args.controller_namespace,
                default_policy=args.default_policy,
                cluster_networks=nets,
            ),
            queue_limit=args.stream_queue_limit,
        )
        poll = parse_duration(args.poll_interval, "--poll-interval")
    except ConfigError as e:
        raise CliError(str(e)) from None
    store = LocalStore(args.resources_dir, args.state_dir, poll_interval=max(0.01, poll), queue_limit=100_000)
    for err in store.source_errors():
        for line in err.errors:
            logging.getLogger("tether.store").error("%s (not loaded)", line)
    controller = DestinationController(store, cfg)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await controller.run(stop)

    asyncio.run(main())
    return 0
