"""The tether command tree, walked programmatically: every test over "all commands" uses this."""

from __future__ import annotations

from collections.abc import Iterator

import click

from tether.cli.tree import cli


def walk(cmd: click.Command = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command and group below (and including) ``cmd``, with its path of names."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name="tether")
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name} but cannot load it"
            yield from walk(sub, (*path, name))


def command_paths() -> list[tuple[str, ...]]:
    return [p for p, _ in walk()]


def ids(paths: list[tuple[str, ...]]) -> list[str]:
    return [" ".join(("tether", *p)) for p in paths]
