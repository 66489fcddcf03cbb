"""HTTP/2 conformance: h2spec against the proxy's inbound listener, nghttpd as the application."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tether.testing.procs import Proc, free_port, wait_for

# Built by scripts/tools/build-go-tools.sh into ~/.cache/tether/tools/h2spec-<version>/h2spec.
_TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tether" / "tools"
H2SPEC = max(_TOOLS.glob("h2spec-*/h2spec"), default=_TOOLS / "h2spec-missing" / "h2spec")
SUMMARY = re.compile(rb"(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed")

pytestmark = pytest.mark.skipif(
    not H2SPEC.is_file() or shutil.which("nghttpd") is None, reason="needs h2spec and nghttpd"
)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_h2spec(port: int, strict: bool) -> tuple[bytes, tuple[int, int, int, int]]:
    args = [str(H2SPEC), "-h", "127.0.0.1", "-p", str(port), "-o", "3"]
    if strict:
        args.append("--strict")
    out = subprocess.run(args, capture_output=True, timeout=300).stdout
    m = SUMMARY.search(out)
    assert m is not None, out.decode(errors="replace")[-3000:]
    total, passed, skipped, failed = (int(g) for g in m.groups())
    return out, (total, passed, skipped, failed)


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_h2spec_inbound(proxies, tmp_path: Path, strict: bool) -> None:  # type: ignore[no-untyped-def]
    docroot = tmp_path / "www"
    docroot.mkdir()
    (docroot / "index.html").write_bytes(b"hello from nghttpd\n" * 64)
    app_port = free_port()
    app = Proc(["nghttpd", "--no-tls", "-d", str(docroot), str(app_port)], tmp_path / "nghttpd.log")
    try:
        wait_for(lambda: _listening(app_port), what="nghttpd listening")
        proxy = proxies(inbound_app_addr=f"127.0.0.1:{app_port}")
        out, (total, passed, skipped, failed) = _run_h2spec(proxy.inbound_port, strict)
        text = out.decode(errors="replace")
        assert failed == 0 and skipped == 0, text[-5000:]
        assert passed == total and total >= 145, text[-5000:]
        # Bad input is answered with GOAWAY/RST_STREAM, never an exception reaching the loop.
        log = proxy.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log[-5000:]
    finally:
        app.stop()
