"""A pod's linkerd.io/proxy-version read as a tether release (tether.core.releases)."""

from __future__ import annotations

import pytest

from tether.core.releases import FIRST_CONTROL_PLANE_TLS, before, tether_release


@pytest.mark.parametrize(("version", "release"), [
    ("0.1.0", (0, 1, 0)),
    ("v0.2.0", (0, 2, 0)),
    ("0.2.0-rc.1", (0, 2, 0)),
    ("1.10.3+build.7", (1, 10, 3)),
    (" 0.1.0\n", (0, 1, 0)),
    ("stable-2.14.10", None),  # Linkerd's versions
    ("edge-24.11.8", None),
    ("0.2", None),
    ("", None),
    ("sha256:abc", None),
])
def test_a_proxy_version_names_a_release_or_nothing(version: str, release: tuple[int, int, int] | None) -> None:
    assert tether_release(version) == release


def test_before_counts_only_older_tether_releases() -> None:
    assert before("0.1.0", FIRST_CONTROL_PLANE_TLS) and before("v0.1.9", FIRST_CONTROL_PLANE_TLS)
    assert not before("0.2.0", FIRST_CONTROL_PLANE_TLS) and not before("0.10.0", FIRST_CONTROL_PLANE_TLS)
    # Linkerd's proxies and unknown versions speak TLS to the control plane: never "before".
    assert not before("stable-2.14.10", FIRST_CONTROL_PLANE_TLS) and not before("", FIRST_CONTROL_PLANE_TLS)
