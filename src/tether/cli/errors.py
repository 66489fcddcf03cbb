"""Exit codes and the errors every command raises; ``tether.cli.main`` turns them into one line.

Exit codes (the same for every command, documented in ``tether --help``):

    0    ok
    1    a check failed, or an operation failed (a file could not be read, a peer not reached)
    2    usage: an unknown flag, a bad flag value, a missing argument
    130  interrupted (Ctrl-C)
    141  stdout closed early (``tether ... | head``): nothing more is printed
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130
    BROKEN_PIPE = 141


class CliError(Exception):
    """A bad flag value or argument, found after parsing: one line naming the flag or file; exit 2."""

    code = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # The command path ("tether identity create-issuer") when raised inside a click command.
        self.command_path = ""
        click = sys.modules.get("click")
        if click is not None:
            ctx = click.get_current_context(silent=True)
            self.command_path = ctx.command_path if ctx is not None else ""


class OutputClosed(Exception):
    """Whoever read stdout went away (``| head``). Not an OSError, so click does not swallow it."""


class OperationFailed(CliError):
    """The command was used correctly but could not do its work (unreachable, unreadable); exit 1."""

    code = ExitCode.FAILED
