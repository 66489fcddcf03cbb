"""`tether controller destination` and `tether diagnostics` as the command tree sees them: defaults
that agree with the service's own, and the service's module loaded only when it is run."""

from __future__ import annotations

import subprocess
import sys

import click

from tether.cli.controller_cmd import SERVICES, controller
from tether.cli.destination_cmd import (
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_CLUSTER_NETWORKS,
    DEFAULT_POLICY,
    POLICIES,
    destination,
)
from tether.control.destination.translate import Settings


def test_the_flags_defaults_are_the_services_own() -> None:
    ctx = destination.make_context("destination", [])
    settings = Settings()
    assert ctx.params["cluster_domain"] == DEFAULT_CLUSTER_DOMAIN == settings.cluster_domain
    assert ctx.params["cluster_networks"] == settings.cluster_networks
    assert DEFAULT_CLUSTER_NETWORKS.split(",") == list(settings.cluster_networks)
    assert ctx.params["default_policy"] == DEFAULT_POLICY == settings.default_policy
    assert ctx.params["controller_namespace"] == settings.control_plane_ns
    assert ctx.params["trust_domain"] == settings.trust_domain
    assert settings.default_policy in POLICIES


def test_the_controller_list_is_each_services_own_short_help() -> None:
    ctx = click.Context(controller, info_name="controller")
    assert controller.list_commands(ctx) == ["destination", "identity", "injector"]
    for name, entry in SERVICES.items():
        cmd = controller.get_command(ctx, name)
        assert cmd is not None and cmd.get_short_help_str(limit=200) == entry.help, name


def test_each_service_imports_only_its_own_module() -> None:
    code = ("import sys; from tether.cli.main import main; main(['controller', 'identity', '--help']); "
            "print([m for m in ('tether.cli.destination_cmd', 'tether.control.destination.server') "
            "if m in sys.modules], file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "[]", r.stderr
