"""``tether proxy``: run the sidecar proxy.

Every ProxyConfig field is a flag (``--inbound-addr``) and an environment variable
(``TETHER_PROXY_INBOUND_ADDR``); flags win over the environment, which wins over defaults.
"""

from __future__ import annotations

import argparse
import dataclasses

from tether.cli.main import CliError
from tether.proxy.config import ConfigError, ProxyConfig

_HIDDEN = {"extra"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser(
        "proxy",
        help="run the sidecar proxy",
        description="Run the tether sidecar proxy (inbound, outbound and admin listeners).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = ProxyConfig()
    for f in dataclasses.fields(ProxyConfig):
        if f.name in _HIDDEN:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, tuple):
            shown = f"{default[0]}:{default[1]}"
        elif isinstance(default, frozenset):
            shown = ",".join(str(x) for x in sorted(default))
        else:
            shown = str(default)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest="cfg_" + f.name,
            metavar="VALUE",
            default=None,
            help=f"env TETHER_PROXY_{f.name.upper()} (default: {shown})",
        )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    try:
        cfg = ProxyConfig.from_env()
        for f in dataclasses.fields(ProxyConfig):
            value = getattr(args, "cfg_" + f.name, None)
            if value is not None:
                cfg.set(f.name, value, "--" + f.name.replace("_", "-"))
    except ConfigError as e:
        raise CliError(str(e)) from None
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from tether.proxy import logging as proxy_logging

    try:
        control = proxy_logging.configure_logging(cfg.log_level, cfg.log_format)
    except ValueError as e:
        raise CliError(f"--log-level/--log-format: {e}") from None
    from tether.proxy.app import run as run_proxy
    from tether.proxy.discovery import DiscoveryError

    try:
        return run_proxy(cfg, control)
    except DiscoveryError as e:
        raise CliError(f"--destinations-file: {e}") from None
    except ConfigError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        # Most often a listener address already in use.
        raise CliError(f"cannot start the proxy: {e}") from None
