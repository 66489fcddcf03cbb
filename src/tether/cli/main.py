"""The ``tether`` command: one console script, one click command tree, commands loaded lazily.

Adding a command: write ``tether/cli/<group>_cmd.py`` defining a ``click.Command`` (or a
``click.Group`` for a command group), add one line to ``COMMANDS`` below, and refresh the help
goldens (``TETHER_UPDATE_GOLDEN=1 pytest tests/unit/test_cli_help.py``). Use the shared pieces:
``tether.cli.output`` (``-o table|wide|json|yaml``, tables), ``tether.cli.params`` (flag types,
``--state-dir``, control-plane flags) and ``tether.cli.errors`` (``CliError``: one line, exit 2;
``OperationFailed``: exit 1). The walk in tests/unit/test_cli_commands.py covers a new command
(``--help``, no arguments, bad arguments) without being told.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from tether import __version__
from tether.cli.errors import CliError, ExitCode, OperationFailed, OutputClosed

__all__ = ["COMMANDS", "CliError", "OperationFailed", "cli", "main"]

# name -> (module, attribute). Running a command imports only its module, so the sidecar
# (`tether proxy`) does not carry the control plane's and the CLI's libraries in its memory.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("tether.cli.check", "check"),
    "completion": ("tether.cli.completion_cmd", "completion"),
    "controller": ("tether.cli.controller_cmd", "controller"),
    "demo": ("tether.cli.demo_cmd", "demo"),
    "identity": ("tether.cli.identity_cmd", "identity"),
    "proxy": ("tether.cli.proxy_cmd", "proxy"),
    "proxy-init": ("tether.cli.proxy_init_cmd", "proxy_init"),
    "version": ("tether.cli.version_cmd", "version"),
    "workload": ("tether.cli.workload_cmd", "workload"),
}

EPILOG = """\b
Exit status: 0 ok; 1 a check or operation failed; 2 usage error (bad flag or argument);
130 interrupted; 141 output closed early (e.g. piped to head).
Every command takes -h/--help. Shell completion: tether completion bash|zsh|fish."""

CONTEXT_SETTINGS: dict[str, Any] = {
    "help_option_names": ["-h", "--help"],
    # A fixed width: help reads the same in every terminal, and the goldens stay stable.
    "max_content_width": 100,
    "terminal_width": 100,
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when invoked (or listed by help/completion)."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OutputClosed, BrokenPipeError):
            raise OutputClosed() from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name]
            cmd = getattr(importlib.import_module(module), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{module}.{attr} is not a click command")
            return cmd
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings=CONTEXT_SETTINGS,
    epilog=EPILOG,
    no_args_is_help=True,
)
@click.version_option(__version__, "--version", prog_name="tether", message="%(prog)s version %(version)s",
                      help="print the client version and exit")
def cli() -> None:
    """tether: a Linkerd-compatible service mesh.

    Run the sidecar proxy and the control plane, manage workload identities, and check that the
    installation is healthy.
    """


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see tether.cli.errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args, prog_name="tether", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        # A group run without a subcommand: its help, then the usage status.
        click.echo(e.ctx.get_help() if e.ctx else "", err=True)
        return ExitCode.USAGE
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "tether"
        hint = f" (see '{where} --help')"
        click.echo(f"{where}: {_one_line(e.format_message())}{hint}", err=True)
        return ExitCode.USAGE
    except click.ClickException as e:
        click.echo(f"tether: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except CliError as e:
        click.echo(f"{e.command_path}: {_one_line(str(e))}", err=True)
        return e.code
    except (KeyboardInterrupt, click.Abort):
        click.echo("", err=True)
        return ExitCode.INTERRUPTED
    except (OutputClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    if rv is None:
        return ExitCode.OK
    return int(rv)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
