"""The ``tether`` console script: runs the command tree (tether.cli.tree) and maps every error to
one line on stderr and an exit status (tether.cli.errors).

``tether proxy`` with valid flags starts without importing click: the sidecar keeps its start-up
time and memory (docs/notes/issue-9.md has the figures). Anything else about it (``--help``, a bad
flag or value) goes through click, so help and errors are click's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tether.cli.errors import CliError, ExitCode, OperationFailed, OutputClosed

__all__ = ["CliError", "OperationFailed", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see tether.cli.errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["proxy"]:
        # Before the proxy's modules are imported: their dataclasses' methods from shared code
        # (~0.2 MiB of a meshed proxy's idle RSS; see tether.core.dataclass_methods).
        from tether.core import dataclass_methods

        dataclass_methods.install()
        from tether.cli import proxy_cmd

        values = proxy_cmd.parse_fast(args[1:])
        if values is not None:
            return _guarded(lambda: proxy_cmd.run(values), "tether proxy")
    return _guarded(lambda: _run_tree(args), "tether")


def _run_tree(args: list[str]) -> int | None:
    import click

    from tether.cli.tree import cli

    try:
        rv = cli.main(args, prog_name="tether", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        # A group run without a subcommand: its help, then the usage status.
        click.echo(e.ctx.get_help() if e.ctx else "", err=True)
        return ExitCode.USAGE
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx else "tether"
        click.echo(f"{where}: {_one_line(e.format_message())} (see '{where} --help')", err=True)
        return ExitCode.USAGE
    except click.ClickException as e:
        click.echo(f"tether: {_one_line(e.format_message())}", err=True)
        return e.exit_code
    except click.Abort:
        raise KeyboardInterrupt from None
    return None if rv is None else int(rv)


def _guarded(run: Callable[[], Any], where: str) -> int:
    try:
        rv = run()
    except CliError as e:
        print(f"{e.command_path or where}: {_one_line(str(e))}", file=sys.stderr)
        return e.code
    except ExceptionGroup as eg:
        # A CLI error raised in an ``except*`` clause (a server that cannot bind its port) arrives
        # wrapped: report it as itself. Anything else in the group is a bug: re-raised whole.
        errors = [e for e in _leaves(eg) if isinstance(e, CliError)]
        if not errors:
            raise
        print(f"{errors[0].command_path or where}: {_one_line(str(errors[0]))}", file=sys.stderr)
        return errors[0].code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return ExitCode.INTERRUPTED
    except (OutputClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly; point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    return ExitCode.OK if rv is None else int(rv)


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
