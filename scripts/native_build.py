"""Build the compiled hot-path modules; run by scripts/build-native (see tether.native)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from tether import native  # noqa: E402

GROUP = "tether_native"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tether" / "native"
SHIM_LINK_ARGS = "-Wl,-z,noseparate-code"
LAYOUT = "shims2"  # in the cache key: a change of link layout must not reuse an older build


def mypy_version() -> str:
    import mypy.version

    return mypy.version.__version__


def interpreter_key() -> str:
    """What the compiled code depends on besides its sources and mypy: the interpreter it is built
    against (its version and installation: headers, runtime path) and the compiler and flags its
    build uses (sysconfig's CC and CFLAGS: Debian's add -fstack-protector-strong, pyenv's do not).
    A venv made again from another python3.11 must not reuse modules built for the previous one."""
    import hashlib
    import sysconfig

    parts = [sys.version, sys.base_prefix, *(str(sysconfig.get_config_var(v)) for v in ("CC", "CFLAGS", "LDSHARED"))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def built_files() -> list[Path]:
    return sorted([*SRC.glob(f"{GROUP}__mypyc*.so"), *(SRC / "tether").rglob("*.so")])


def remove_built() -> None:
    for f in built_files():
        f.unlink()
    native.STAMP.unlink(missing_ok=True)


def compile_into(out: Path) -> None:
    """mypyc the modules in a scratch copy of src/ and collect the extension files in ``out``."""
    with tempfile.TemporaryDirectory(prefix="tether-native-") as tmp:
        work = Path(tmp)
        shutil.copytree(SRC / "tether", work / "tether", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        sources = [str(native.source_path(m).relative_to(SRC)) for m in native.NATIVE_MODULES]
        sources += ["--config-file", str(ROOT / "pyproject.toml")]  # the project's mypy settings
        (work / "setup.py").write_text(
            "from setuptools import setup\n"
            "from mypyc.build import mypycify\n"
            "from setuptools import Extension\n"
            f"exts = mypycify({sources!r}, opt_level='3', group_name={GROUP!r}, debug_level='0')\n"
            # Each module's shim (a few hundred bytes calling into the group library) is linked as one
            # read-execute and one read-write segment: with the linker's default separate-code layout
            # every shim maps five pages, 20 KiB of RSS per compiled module loaded (34 of them).
            f"for e in exts:\n"
            f"    if not e.name.startswith({GROUP + '__mypyc'!r}):\n"
            f"        e.extra_link_args = [*e.extra_link_args, {SHIM_LINK_ARGS!r}]\n"
            # The hand-written C extensions (native.C_EXTENSIONS), compiled beside them.
            f"exts += [Extension(m, [s], extra_compile_args=['-O2', '-Wall'], extra_link_args=[{SHIM_LINK_ARGS!r}]) "
            f"for m, s in {sorted(native.C_EXTENSIONS.items())!r}]\n"
            "setup(name='tether-native', ext_modules=exts)\n"
        )
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"build-native: mypyc failed (exit {proc.returncode}); tether will run interpreted")
        out.mkdir(parents=True, exist_ok=True)
        for so in [*work.glob("*.so"), *(work / "tether").rglob("*.so")]:
            dest = out / so.relative_to(work)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, dest)


def main() -> int:
    ap = argparse.ArgumentParser(description="compile tether's hot-path modules with mypyc")
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules (run interpreted)")
    args = ap.parse_args()
    if args.clean:
        remove_built()
        print("build-native: removed; tether runs interpreted")
        return 0
    digest = native.digest()
    if native.check() == "compiled" and built_files():
        return 0
    key = f"{digest[:24]}-mypy{mypy_version()}-{LAYOUT}-py{interpreter_key()}"
    cached = CACHE / key
    if not (cached / ".complete").exists():
        print(f"build-native: compiling {len(native.NATIVE_MODULES)} modules with mypyc (about a minute)")
        # Built aside and renamed into place, so a concurrent build or reader never sees half a cache.
        tmp = CACHE / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        compile_into(tmp)
        (tmp / ".complete").touch()
        shutil.rmtree(cached, ignore_errors=True)  # an incomplete leftover
        try:
            os.replace(tmp, cached)
        except OSError:  # another build finished first: use its result
            shutil.rmtree(tmp, ignore_errors=True)
    remove_built()
    for so in cached.rglob("*.so"):
        dest = SRC / so.relative_to(cached)
        shutil.copy2(so, dest)
    native.write_stamp()
    print(f"build-native: ok ({len(native.NATIVE_MODULES)} modules compiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
