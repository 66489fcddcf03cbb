"""The guard around the compiled hot path: stale or missing builds fall back to the sources."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tether import native

MODULES = ("tether.fake.hot", "tether.fake.cold")
C_EXTENSIONS = {"tether.fake._scan": "tether/fake/_scan.c"}


def fake_tree(tmp: Path) -> Path:
    for name, text in (("hot", "X = 1\n"), ("cold", "Y = 2\n")):
        path = native.source_path(f"tether.fake.{name}", tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp / C_EXTENSIONS["tether.fake._scan"]).write_text("int x;\n")
    return tmp


def test_a_fresh_stamp_means_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = fake_tree(tmp_path)
    native.write_stamp(MODULES, root, C_EXTENSIONS)
    assert native.check(MODULES, root, C_EXTENSIONS) == "compiled"


def test_an_edited_source_makes_the_build_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = fake_tree(tmp_path)
    native.write_stamp(MODULES, root, C_EXTENSIONS)
    native.source_path("tether.fake.cold", root).write_text("Y = 3\n")
    assert native.check(MODULES, root, C_EXTENSIONS).startswith("pure: sources changed")


def test_an_edited_c_extension_makes_the_build_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A C extension has no Python source to fall back on: its users load it only when the state is
    # "compiled", which an edited .c beside a stale .so must not be.
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = fake_tree(tmp_path)
    native.write_stamp(MODULES, root, C_EXTENSIONS)
    (root / C_EXTENSIONS["tether.fake._scan"]).write_text("int y;\n")
    assert native.check(MODULES, root, C_EXTENSIONS).startswith("pure: sources changed")


def test_missing_stamp_or_other_module_list_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    root = fake_tree(tmp_path)
    assert native.check(MODULES, root, C_EXTENSIONS).startswith("pure: not built")
    native.write_stamp(MODULES[:1], root, C_EXTENSIONS)
    assert native.check(MODULES, root, C_EXTENSIONS).startswith("pure: built for another module list")


def test_the_environment_variable_forces_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_tree(tmp_path)
    native.write_stamp(MODULES, root, C_EXTENSIONS)
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.check(MODULES, root, C_EXTENSIONS) == f"pure: {native.PURE_ENV} is set"


def _imported_from(env_pure: bool) -> list[str]:
    env = dict(os.environ)
    env.pop(native.PURE_ENV, None)
    if env_pure:
        env[native.PURE_ENV] = "1"
    code = (
        "import tether.native as n, importlib\n"
        "for m in n.NATIVE_MODULES: importlib.import_module(m)\n"
        "print(n.state); print(len(n.loaded_compiled()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


def test_pure_mode_imports_every_listed_module_from_its_source() -> None:
    state, compiled, _ = _imported_from(env_pure=True)
    assert state == f"pure: {native.PURE_ENV} is set"
    assert compiled == "0"


def test_the_test_run_exercises_the_compiled_hot_path() -> None:
    # scripts/setup builds the extensions; if this fails the suite ran the interpreted code only.
    state, compiled, _ = _imported_from(env_pure=False)
    assert state == "compiled", state
    assert compiled == str(len(native.NATIVE_MODULES))


def test_the_build_cache_is_keyed_by_the_interpreter_and_its_compiler_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """A venv made again from another python3.11 (pyenv's, Debian's) must not reuse modules compiled
    against the previous one's headers, runtime path and flags (scripts/native_build.py)."""
    import importlib.util
    import sysconfig

    spec = importlib.util.spec_from_file_location(
        "native_build", Path(__file__).resolve().parents[2] / "scripts" / "native_build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    here = build.interpreter_key()
    assert here == build.interpreter_key()  # stable for one interpreter
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda name: real(name) + " -fno-stack-protector" if name == "CFLAGS" else real(name))
    assert build.interpreter_key() != here
    monkeypatch.setattr(sysconfig, "get_config_var", real)
    monkeypatch.setattr(sys, "base_prefix", "/root/.pyenv/versions/3.11.7")
    assert build.interpreter_key() != here
