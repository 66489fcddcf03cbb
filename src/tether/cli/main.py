"""The ``tether`` command: one console script, subcommands registered by their modules."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes ``register(subparsers)``, adding its subcommand(s) with
# ``set_defaults(func=...)``; ``func(args) -> int`` is the exit status.
COMMAND_MODULES = [
    "tether.cli.proxy_cmd",
    "tether.cli.proxy_init_cmd",
    "tether.cli.demo_cmd",
    "tether.cli.identity_cmd",
    "tether.cli.controller_cmd",
    "tether.cli.check",
    "tether.cli.resources_cmd",
    "tether.cli.diagnostics_cmd",
]


# The module of each top-level command: running one command imports only its module, so the
# sidecar (`tether proxy`) does not carry the control plane's and CLI's libraries in its memory.
COMMAND_OWNERS = {
    "proxy": "tether.cli.proxy_cmd",
    "proxy-init": "tether.cli.proxy_init_cmd",
    "demo": "tether.cli.demo_cmd",
    "identity": "tether.cli.identity_cmd",
    "controller": "tether.cli.controller_cmd",
    "check": "tether.cli.check",
    "apply": "tether.cli.resources_cmd",
    "delete": "tether.cli.resources_cmd",
    "get": "tether.cli.resources_cmd",
    "diagnostics": "tether.cli.diagnostics_cmd",
}


class CliError(Exception):
    """A user error: printed as one line naming what was wrong, exit status 2."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with ``only`` that module's commands."""
    parser = argparse.ArgumentParser(prog="tether", description="tether service mesh")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(COMMAND_OWNERS.get(argv[0]) if argv else None)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except CliError as e:
        print(f"tether: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
