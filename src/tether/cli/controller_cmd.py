"""`tether controller <service>`: the control-plane services. Each service adds one subcommand here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from tether.cli.main import CliError
from tether.proxy.config import ConfigError, parse_addr, parse_duration


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("controller", help="run a control-plane service")
    sub = p.add_subparsers(dest="controller", metavar="SERVICE", required=True)
    _register_identity(sub)
    from tether.cli.destination_cmd import register_controller

    register_controller(sub)


def _register_identity(sub: Any) -> None:
    p = sub.add_parser(
        "identity",
        help="the identity service: signs workload certificates",
        description="Sign workload CSRs after validating the workload's token. The issuer is read from "
        "files (or a kubernetes.io/tls-style directory) and reloaded when they change.",
    )
    p.add_argument("--addr", default="0.0.0.0:8080", help="gRPC listen address (default 0.0.0.0:8080)")
    p.add_argument("--admin-addr", default="127.0.0.1:9990", help="/metrics, /ready (127.0.0.1:9990)")
    p.add_argument("--identity-trust-domain", "--trust-domain", dest="trust_domain", default="cluster.local")
    p.add_argument("--controller-namespace", default="linkerd", help="control-plane namespace in identity names")
    p.add_argument(
        "--issuer-dir",
        help="dir with tls.crt, tls.key, ca.crt (kubernetes.io/tls) or crt.pem, key.pem (linkerd.io/tls)",
    )
    p.add_argument("--identity-issuer-certificate-file", "--issuer-certificate-file", dest="issuer_cert")
    p.add_argument("--identity-issuer-key-file", "--issuer-key-file", dest="issuer_key")
    p.add_argument("--identity-trust-anchors-file", "--trust-anchors-file", dest="trust_anchors")
    p.add_argument("--issuance-lifetime", default="24h", help="leaf lifetime (default 24h)")
    p.add_argument("--clock-skew-allowance", default="20s", help="leaf start backdating (default 20s)")
    p.add_argument("--reload-interval", default="5s", help="how often issuer files are checked (default 5s)")
    p.add_argument("--state-dir", default=".tether", help="local state (workload registry) directory")
    p.add_argument("--rate", type=float, default=10.0, help="Certify calls/s per caller (default 10)")
    p.add_argument("--burst", type=int, default=20, help="Certify burst per caller (default 20)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve gRPC over TLS with a certificate issued to --identity-service-account (proxies verify "
        "it against their trust anchors)",
    )
    p.add_argument("--identity-service-account", default="linkerd-identity", help="this service's own SA")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_run_identity)


def _identity_config(args: argparse.Namespace) -> Any:
    from tether.control.identity.credentials import CredentialPaths
    from tether.control.identity.server import IdentityServerConfig

    if args.issuer_dir:
        if args.issuer_cert or args.issuer_key:
            raise CliError("use either --issuer-dir or the --identity-issuer-*-file flags, not both")
        paths = CredentialPaths.from_dir(args.issuer_dir, args.trust_anchors)
    elif args.issuer_cert and args.issuer_key and args.trust_anchors:
        paths = CredentialPaths(Path(args.issuer_cert), Path(args.issuer_key), Path(args.trust_anchors))
    else:
        raise CliError(
            "no issuer: pass --issuer-dir DIR, or --identity-issuer-certificate-file, "
            "--identity-issuer-key-file and --identity-trust-anchors-file "
            "(try `tether identity create-ca --out DIR` to make some)"
        )
    try:
        return IdentityServerConfig(
            addr=parse_addr(args.addr, "--addr"),
            admin_addr=parse_addr(args.admin_addr, "--admin-addr"),
            trust_domain=args.trust_domain,
            control_plane_ns=args.controller_namespace,
            paths=paths,
            state_dir=args.state_dir,
            issuance_lifetime=parse_duration(args.issuance_lifetime, "--issuance-lifetime"),
            clock_skew=parse_duration(args.clock_skew_allowance, "--clock-skew-allowance"),
            reload_interval=max(0.05, parse_duration(args.reload_interval, "--reload-interval")),
            rate=args.rate,
            burst=args.burst,
            tls=args.tls,
            service_account=args.identity_service_account,
        )
    except ConfigError as e:
        raise CliError(str(e)) from None


def _run_identity(args: argparse.Namespace) -> int:
    from tether.control.identity.server import IdentityController
    from tether.core.identity.certs import CertificateError
    from tether.core.identity.names import IdentityNameError, check_label, check_trust_domain

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = _identity_config(args)
    try:
        check_trust_domain(cfg.trust_domain)
        check_label(cfg.control_plane_ns, "--controller-namespace")
    except IdentityNameError as e:
        raise CliError(str(e)) from None
    try:
        controller = IdentityController(cfg)
    except (CertificateError, ValueError) as e:
        print(f"tether controller identity: refusing to start: {e}", file=sys.stderr)
        return 1

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await controller.run(stop)

    try:
        asyncio.run(main())
    except (OSError, RuntimeError) as e:
        # grpc reports a port it cannot bind as RuntimeError.
        print(f"tether controller identity: {e}", file=sys.stderr)
        return 1
    return 0
