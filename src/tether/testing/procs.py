"""Real processes for integration tests and the demo: proxies and backends on loopback.

Every wait has a deadline; every process is terminated (then killed) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    """A ``tether proxy`` child process, ready when its admin /ready answers 200."""

    def __init__(self, workdir: Path, name: str = "proxy", netns: str | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", **flags: str | int | float) -> None:
        self.admin_port = int(flags.pop("admin_port", 0)) or free_port()
        self.outbound_port = int(flags.pop("outbound_port", 0)) or free_port()
        self.inbound_port = int(flags.pop("inbound_port", 0)) or free_port()
        self.host = host
        args = [
            sys.executable, "-m", "tether", "proxy",
            "--admin-addr", f"{host}:{self.admin_port}",
            "--outbound-addr", f"{host}:{self.outbound_port}",
            "--inbound-addr", f"{flags.pop('inbound_host', host)}:{self.inbound_port}",
        ]
        for k, v in flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        super().__init__(args, workdir / f"{name}.log", env=env, netns=netns)
        self.name = name

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
        def ready() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"proxy {self.name} exited with {self.popen.returncode}:\n{self.log()}")
            return http_get(self.admin + "/ready", timeout=1)[0] == 200

        try:
            wait_for(ready, timeout, what=f"proxy {self.name} ready")
        except TimeoutError:
            raise TimeoutError(f"proxy {self.name} not ready; log:\n{self.log()}") from None
        return self

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()
