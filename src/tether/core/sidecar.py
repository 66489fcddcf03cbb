"""How every deployment runs the sidecar proxy's interpreter: optimisation level 2 (no docstrings, no
asserts) and no column ranges in code objects. Together they take ~1 MiB off a meshed proxy's idle
RSS (docs/notes/issue-16-idlemem2.md); nothing the proxy does reads a docstring or relies on an assert.

Every deployment passes the settings as flags, on the proxy's process only: the Kubernetes proxy
container (the injector and the chart) runs ``python -OO -X no_debug_ranges -m tether proxy`` with the
image's interpreter, local mode and the test harness the same with theirs. (As environment variables
they would reach every tether command run in the container, and click's help texts are docstrings.)
The benchmarks set ``PYTHON_ENV`` on the proxies they start, the same settings. The locale
(``LOCALE_ENV``) can only be an environment setting: every deployment sets it on the proxy. The bytecode caches for
level 2 are made where tether is installed (``scripts/setup``, the image), or every start would compile
the sources again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["IMAGE_PYTHON", "LOCALE_ENV", "PYTHON_ENV", "PYTHON_FLAGS", "proxy_env", "python_argv", "runtime_labels"]

# The settings as command-line flags (`python -OO -X no_debug_ranges -m tether proxy`) ...
PYTHON_FLAGS: tuple[str, ...] = ("-OO", "-X", "no_debug_ranges")
# The proxy's locale, which only the environment can set (the interpreter loads it before any code
# runs): C, so no locale file is mapped. With LANG=C.UTF-8, or Python's coercion of the C locale
# to it, the interpreter maps C.UTF-8's LC_CTYPE (120 KiB of RSS on Debian 12). In the C locale
# Python runs in UTF-8 mode (PEP 540): files, standard streams and file names are UTF-8 as before.
# Harmless to any other tether command run in the proxy's container.
LOCALE_ENV: dict[str, str] = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0"}
# ... and as environment variables (the benchmarks' proxies).
PYTHON_ENV: dict[str, str] = {"PYTHONOPTIMIZE": "2", "PYTHONNODEBUGRANGES": "1", **LOCALE_ENV}
# The tether image's interpreter: its venv's, first on the image's PATH (Containerfile).
IMAGE_PYTHON = "python"


def python_argv(python: str = sys.executable) -> list[str]:
    """The command that runs ``tether`` as the sidecar runs it; append ``proxy`` and its flags."""
    return [python, *PYTHON_FLAGS, "-m", "tether"]


def proxy_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a proxy started from ``base`` (default: this process's): with LOCALE_ENV."""
    return {**(os.environ if base is None else base), **LOCALE_ENV}


def runtime_labels() -> dict[str, str]:
    """This interpreter's settings as ``proxy_build_info`` labels: what an operator checks to see that
    a proxy runs as deployed (``python_optimize="2"``, ``python_debug_ranges="false"``,
    ``python_locale="C"``) and which Python runs it (``python_version="3.11.7"``: a proxy user that
    cannot read the interpreter's own libraries gets the system's instead)."""
    import _locale  # (built in: the locale module would bring re and its compiled patterns)

    positions = next(iter(compile("0", "<runtime>", "eval").co_positions()))
    return {
        "python_optimize": str(sys.flags.optimize),
        "python_debug_ranges": "false" if positions[2] is None else "true",
        "python_locale": _locale.setlocale(_locale.LC_CTYPE),
        "python_version": python_version(),
    }


def python_version() -> str:
    """This interpreter's version, as ``proxy_build_info`` names it."""
    v = sys.version_info
    return f"{v.major}.{v.minor}.{v.micro}"
