"""The `kube` tier: one real control plane (etcd, kube-apiserver, controllers, scheduler, kwok) per session.

The binaries are built from Go modules by scripts/kube/build.sh. When kube tests are selected and the
binaries are missing, the build runs once at the end of collection (outside any per-test timeout;
a cold build takes tens of minutes on two cores). Only a missing Go toolchain skips the tier.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from tether.testing import kubecluster
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from tether.testing import kubecluster
from tether.testing.procs import Proc

NO_GO_REASON = (
    "kube tier skipped: the Go toolchain (go >= 1.26) is not on PATH, so scripts/kube/build.sh cannot "
    "build etcd/kube-apiserver/kwok; install Go to run these tests"
)


def _selected_kube_items(session: pytest.Session) -> bool:
    return any(item.get_closest_marker("kube") is not None for item in session.items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control plane before any test runs, so the build is not charged to a test's timeout."""
    if not _selected_kube_items(session) or kubecluster.go_toolchain() is None:
        return
    if session.config.option.collectonly:
        return
    if kubecluster.missing_binaries(kubecluster.default_bin_dir()):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("kube tier: building the control plane with scripts/kube/build.sh ...")
        kubecluster.build_binaries()


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[kubecluster.KubeCluster]:
    """A started cluster: .kubeconfig, .server, .api (HTTPS JSON client), .bin_dir, .kubectl(), .helm()."""
    if kubecluster.go_toolchain() is None:
        pytest.skip(NO_GO_REASON)
    bin_dir = kubecluster.default_bin_dir()
    if kubecluster.missing_binaries(bin_dir):
        bin_dir = kubecluster.build_binaries()
    with kubecluster.KubeCluster(bin_dir=bin_dir) as cluster:
        yield cluster


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts (control-plane services, proxies), stopped afterwards."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
