"""How every deployment runs the sidecar proxy's interpreter: optimisation level 2 (no docstrings, no
asserts) and no column ranges in code objects. Together they take ~1 MiB off a meshed proxy's idle
RSS (docs/notes/issue-16-idlemem2.md); nothing the proxy does reads a docstring or relies on an assert.

Every deployment passes the settings as flags, on the proxy's process only: the Kubernetes proxy
container (the injector and the chart) runs ``python -OO -X no_debug_ranges -m tether proxy`` with the
image's interpreter, local mode and the test harness the same with theirs. (As environment variables
they would reach every tether command run in the container, and click's help texts are docstrings.)
The benchmarks set ``PYTHON_ENV`` on the proxies they start, the same settings. The bytecode caches for
level 2 are made where tether is installed (``scripts/setup``, the image), or every start would compile
the sources again.
"""

from __future__ import annotations

import sys

__all__ = ["IMAGE_PYTHON", "PYTHON_ENV", "PYTHON_FLAGS", "python_argv", "runtime_labels"]

# The settings as command-line flags (`python -OO -X no_debug_ranges -m tether proxy`) ...
PYTHON_FLAGS: tuple[str, ...] = ("-OO", "-X", "no_debug_ranges")
# ... and as environment variables (the benchmarks' proxies).
PYTHON_ENV: dict[str, str] = {"PYTHONOPTIMIZE": "2", "PYTHONNODEBUGRANGES": "1"}
# The tether image's interpreter: its venv's, first on the image's PATH (Containerfile).
IMAGE_PYTHON = "python"


def python_argv(python: str = sys.executable) -> list[str]:
    """The command that runs ``tether`` as the sidecar runs it; append ``proxy`` and its flags."""
    return [python, *PYTHON_FLAGS, "-m", "tether"]


def runtime_labels() -> dict[str, str]:
    """This interpreter's settings as ``proxy_build_info`` labels: what an operator checks to see that
    a proxy runs as deployed (``python_optimize="2"``, ``python_debug_ranges="false"``)."""
    positions = next(iter(compile("0", "<runtime>", "eval").co_positions()))
    return {
        "python_optimize": str(sys.flags.optimize),
        "python_debug_ranges": "false" if positions[2] is None else "true",
    }
