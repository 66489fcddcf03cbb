"""``tether completion bash|zsh|fish``: the shell completion script (click's)."""

from __future__ import annotations

import click

SHELLS = ("bash", "zsh", "fish")


@click.command("completion", short_help="print the shell completion script for bash, zsh or fish")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> int:
    """Print the completion script for SHELL. Load it in the current shell or install it:

    \b
      bash:  source <(tether completion bash)
             tether completion bash > /etc/bash_completion.d/tether
      zsh:   tether completion zsh > "${fpath[1]}/_tether"
      fish:  tether completion fish > ~/.config/fish/completions/tether.fish
    """
    from click.shell_completion import get_completion_class

    from tether.cli.tree import cli

    cls = get_completion_class(shell)
    if cls is None:  # click knows all three; kept for a click without one
        raise click.UsageError(f"no completion for {shell}")
    click.echo(cls(cli, {}, "tether", "_TETHER_COMPLETE").source())
    return 0
