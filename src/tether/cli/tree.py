"""The ``tether`` command tree (click), commands loaded lazily; ``tether.cli.main`` runs it.

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
from typing import Any, NamedTuple

import click

from tether import __version__
from tether.cli.errors import OutputClosed

__all__ = ["COMMANDS", "cli"]

class Lazy(NamedTuple):
    module: str
    attr: str  # a click command, or a function returning one
    help: str  # the one-line help `tether --help` lists (a test checks it is the command's own)


# Running a command imports only its module, so one command does not carry the libraries of the
# others, and `tether --help` imports none (`tether proxy` with valid flags does not even import
# click: see tether.cli.main).
COMMANDS: dict[str, Lazy] = {
    "apply": Lazy("tether.cli.resources_cmd", "apply", "create or update resources in the local store from YAML"),
    "authz": Lazy("tether.cli.authz_cmd", "authz", "list the authorizations that apply to each port of a workload"),
    "check": Lazy("tether.cli.check", "check", "check the installation and, with --proxy, the data plane"),
    "completion": Lazy("tether.cli.completion_cmd", "completion",
                       "print the shell completion script for bash, zsh or fish"),
    "controller": Lazy("tether.cli.controller_cmd", "controller", "run a control-plane service"),
    "delete": Lazy("tether.cli.resources_cmd", "delete", "delete the resources named in YAML from the local store"),
    "demo": Lazy("tether.cli.demo_cmd", "demo",
                 "run a local two-proxy mesh with a demo app and show its golden metrics"),
    "down": Lazy("tether.cli.local_cmd", "down", "stop the local mesh and remove everything it made"),
    "exec": Lazy("tether.cli.local_cmd", "exec_", "run a command in a local pod's network namespace"),
    "diagnostics": Lazy("tether.cli.diagnostics_cmd", "diagnostics",
                        "inspect what the control plane serves, and the proxies' and controllers' metrics"),
    "get": Lazy("tether.cli.resources_cmd", "get", "list the resources of a kind in the local store"),
    "inject": Lazy("tether.cli.inject_cmd", "inject",
                   "add the proxy to Kubernetes YAML (offline), or mark it for the injector"),
    "install": Lazy("tether.cli.install_cmd", "install",
                    "print the control plane's manifests (or, with --crds, the CRDs)"),
    "join": Lazy("tether.cli.local_cmd", "join", "join this host's pods to another host's local mesh"),
    "logs": Lazy("tether.cli.local_cmd", "logs", "print a local pod's application or proxy log"),
    "rm": Lazy("tether.cli.local_cmd", "rm", "stop a local workload's pods and remove it"),
    "run": Lazy("tether.cli.local_cmd", "run", "start a workload as pods in the local mesh"),
    "scale": Lazy("tether.cli.local_cmd", "scale", "change how many pods a local workload has"),
    "status": Lazy("tether.cli.local_cmd", "status", "show the local mesh's components, their health, and the pods"),
    "uninject": Lazy("tether.cli.inject_cmd", "uninject", "remove the proxy from Kubernetes YAML"),
    "uninstall": Lazy("tether.cli.install_cmd", "uninstall",
                      "print what to delete to remove the control plane and the CRDs"),
    "up": Lazy("tether.cli.local_cmd", "up", "start the local control plane (identity, destination) on this host"),
    "identity": Lazy("tether.cli.identity_cmd", "identity", "show a proxy's certificate; create and rotate CAs"),
    "profile": Lazy("tether.cli.profile_cmd", "profile",
                    "print a ServiceProfile from an OpenAPI file, from live traffic, or a template"),
    "proxy": Lazy("tether.cli.proxy_cmd", "command", "run the sidecar proxy"),
    "proxy-await": Lazy("tether.cli.inject_cmd", "proxy_await",
                        "wait until the pod's proxy is ready (the injected postStart hook)"),
    "proxy-init": Lazy("tether.cli.proxy_init_cmd", "proxy_init",
                       "install iptables rules redirecting a pod's TCP through its proxy"),
    "upgrade": Lazy("tether.cli.install_cmd", "upgrade", "print the upgraded control plane's manifests"),
    "viz": Lazy("tether.cli.viz_cmd", "viz",
                "see the mesh: Prometheus, stat, routes, top, edges, tap, alerts and dashboards"),
    "version": Lazy("tether.cli.version_cmd", "version", "print the client, control-plane and proxy versions"),
    "workload": Lazy("tether.cli.workload_cmd", "workload",
                     "register, list and remove local workloads and their bootstrap tokens"),
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

    def __init__(self, *args: Any, lazy: dict[str, Lazy] | None = None, **kwargs: Any) -> None:
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
            module, attr, _ = self.lazy[cmd_name]
            cmd = getattr(importlib.import_module(module), attr)
            if not isinstance(cmd, click.Command) and callable(cmd):
                cmd = cmd()
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{module}.{attr} is not a click command")
            return cmd
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the table: help does not import every command's module."""
        rows = [(name, entry.help) for name, entry in sorted(self.lazy.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


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


