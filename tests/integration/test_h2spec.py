"""HTTP/2 conformance: h2spec (RFC 7540/9113 and RFC 7541 cases) against real proxy listeners.

The application behind the proxy is nghttpd (nghttp2's server, h2c), so every stream h2spec opens
is proxied end to end; h2spec judges the frames the proxy sends back.
"""

from __future__ import annotations

import re
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.testing.procs import Proc, ProxyProc, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def h2spec_path() -> Path:
    out = subprocess.run([str(ROOT / "scripts/tools/build-go-tools.sh"), "--print-path", "h2spec"],
                         capture_output=True, text=True)
    path = Path(out.stdout.strip())
    if out.returncode != 0 or not path.is_file():
        pytest.skip("h2spec is not built: run scripts/tools/build-go-tools.sh (needs Go and the module proxy)")
    return path


@pytest.fixture
def nghttpd(tmp_path: Path) -> Iterator[int]:
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from nghttpd\n")
    port = free_port()
    proc = Proc(["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(www), str(port)], tmp_path / "nghttpd.log")
    try:
        wait_for(lambda: _accepting(port), 10, what="nghttpd listening")
        yield port
    finally:
        proc.stop()


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("listener", ["inbound", "outbound"])
def test_h2spec_passes_every_case(tmp_path: Path, nghttpd: int, listener: str) -> None:
    h2spec = h2spec_path()
    outbound_port = free_port()
    dst = tmp_path / "destinations.yaml"
    # h2spec's :authority is the address it dials: route it to nghttpd.
    dst.write_text(f'destinations: {{"127.0.0.1:{outbound_port}": ["127.0.0.1:{nghttpd}"]}}\n')
    proxy = ProxyProc(tmp_path, name="proxy", outbound_port=outbound_port, destinations_file=str(dst),
                      inbound_app_addr=f"127.0.0.1:{nghttpd}", log_level="warn")
    try:
        proxy.wait_ready()
        port = proxy.inbound_port if listener == "inbound" else proxy.outbound_port
        report = tmp_path / "h2spec.xml"
        argv = [str(h2spec), "-h", "127.0.0.1", "-p", str(port), "-o", "5", "--strict", "-j", str(report)]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        failed = []
        total = 0
        # h2spec copies raw frame bytes (PING payloads) into its report: drop what XML forbids.
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "?", report.read_text(errors="replace"))
        for case in ET.fromstring(text).iter("testcase"):
            total += 1
            if case.find("failure") is not None or case.find("error") is not None or case.find("skipped") is not None:
                failed.append(f"{case.get('package', '')} {case.get('classname', '')}: {case.get('name', '')}")
        assert total >= 146, run.stdout[-3000:]  # every case, the strict ones included
        assert not failed, "\n".join(failed) + "\n" + run.stdout[-3000:]
        assert "0 failed" in run.stdout, run.stdout[-3000:]
        # Bad input is answered with GOAWAY/RST_STREAM, never an exception reaching the loop.
        log = proxy.log()
        assert "Traceback" not in log and "Exception in callback" not in log, log[-5000:]
    finally:
        proxy.stop()
