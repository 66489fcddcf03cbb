"""What a meshed proxy loads: its control-plane clients ride on tether's own HTTP/2 client.

grpcio costs a meshed proxy ~12 MiB of RSS and 7 threads (measured: 60.9 -> 48.5 MiB, 12 -> 5
threads; docs/notes/issue-16.md); this keeps it from coming back through an import.
"""

from __future__ import annotations

import subprocess
import sys


def test_meshed_proxy_modules_do_not_load_grpcio() -> None:
    code = (
        "import sys; import tether.proxy.app, tether.proxy.identity, tether.proxy.destination, "
        "tether.proxy.grpc_client; print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
