"""Real processes for integration tests and the demo: proxies and backends on loopback.

Every wait has a deadline; every process is terminated (then killed) on exit.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tether.core import sidecar

# Ports handed out by free_port, never handed out again by this process (their process may not have
# bound them yet).
_handed_out: set[int] = set()
_rng = random.Random()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on, for a process about to bind it.

    Picked below the kernel's ephemeral range when there is room: a port the kernel chose (binding
    port 0) is the kind it also gives to other processes' outgoing connections, and one of those
    could take it before our process binds it."""
    low = _ephemeral_low()
    if low > 12_000:
        for _ in range(200):
            port = _rng.randrange(10_000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port


def wait_for(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> object:
    """Poll ``cond`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # the condition may fail until the thing is up
            last_exc = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last: {last_exc})" if last_exc else ""))


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Proc:
    """A child process with its output captured to a file."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 netns: str | None = None) -> None:
        full = list(args)
        if netns is not None:
            full = ["ip", "netns", "exec", netns, *full]
        self.args = full
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(full, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


class ProxyProc(Proc):
    """A ``tether proxy`` child process, ready when its admin /ready answers 200.

    Ports left at 0 are picked free; if another process grabs one before the proxy binds it,
    :meth:`wait_ready` restarts the proxy on new ports (up to three times).
    """

    def __init__(self, workdir: Path, name: str = "proxy", netns: str | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", **flags: Any) -> None:
        self._fixed = {k: int(flags.pop(k, 0)) for k in ("admin_port", "outbound_port", "inbound_port")}
        self._inbound_host = str(flags.pop("inbound_host", host))
        self.host = host
        self.name = name
        self._workdir = workdir
        self._flags = flags
        self._netns = netns
        self._env = env
        self._launch()

    def _launch(self) -> None:
        self.admin_port = self._fixed["admin_port"] or free_port()
        self.outbound_port = self._fixed["outbound_port"] or free_port()
        self.inbound_port = self._fixed["inbound_port"] or free_port()
        args = [
            # As every deployment runs the sidecar (-OO, no debug ranges): tests exercise that build.
            *sidecar.python_argv(), "proxy",
            "--admin-addr", f"{self.host}:{self.admin_port}",
            "--outbound-addr", f"{self.host}:{self.outbound_port}",
            "--inbound-addr", f"{self._inbound_host}:{self.inbound_port}",
        ]
        for k, v in self._flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        # (Also the locale every deployment gives the proxy: sidecar.LOCALE_ENV.)
        env = {**(self._env or {}), **sidecar.LOCALE_ENV}
        super().__init__(args, self._workdir / f"{self.name}.log", env=env, netns=self._netns)

    @property
    def admin(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def outbound(self) -> str:
        return f"http://{self.host}:{self.outbound_port}"

    @property
    def inbound(self) -> str:
        return f"http://{self.host}:{self.inbound_port}"

    def wait_ready(self, timeout: float = 15.0) -> ProxyProc:
        for _ in range(3):
            try:
                return self._wait_ready_once(timeout)
            except RuntimeError:
                if "address already in use" not in self.log().lower() or any(self._fixed.values()):
                    raise
                self._log.close()
                self._launch()
        return self._wait_ready_once(timeout)

    def _wait_ready_once(self, timeout: float) -> ProxyProc:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"proxy {self.name} exited with {self.popen.returncode}:\n{self.log()}")
            try:
                if http_get(self.admin + "/ready", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"proxy {self.name} not ready after {timeout}s; log:\n{self.log()}")

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()
