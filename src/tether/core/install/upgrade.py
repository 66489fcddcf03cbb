"""Whether an installed control plane may be upgraded (or downgraded) to this version (pure)."""

from __future__ import annotations

import re

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


class UpgradeRefused(ValueError):
    """The step is not allowed; the message says why and what to do instead."""


def _series(version: str) -> tuple[int, int]:
    """The release series whose upgrades may break compatibility: the major, or the minor of a 0.x."""
    m = _VERSION.match(version)
    if m is None:
        raise UpgradeRefused(f"the installed version {version!r} is not a version like 1.2.3")
    major, minor = int(m.group(1)), int(m.group(2))
    return (0, minor) if major == 0 else (major, 0)


def check_step(installed: str, target: str) -> None:
    """Raise UpgradeRefused when going from ``installed`` to ``target`` skips a major version."""
    a, b = _series(installed), _series(target)
    lo, hi = sorted((a, b))
    if lo[0] == hi[0] == 0:
        gap, skipped = hi[1] - lo[1], f"0.{lo[1] + 1}"
    elif lo[0] == 0:
        gap, skipped = hi[0], "1.x"  # the last 0.x to 1.x is one step
    else:
        gap, skipped = hi[0] - lo[0], f"{lo[0] + 1}.x"
    if gap > 1:
        direction = "upgrading" if b > a else "downgrading"
        raise UpgradeRefused(
            f"the control plane runs {installed}; {direction} to {target} skips {skipped}: each major version's "
            f"upgrade migrates what the next one expects (resources, values, the proxies' API), so step through "
            f"one major version at a time")
