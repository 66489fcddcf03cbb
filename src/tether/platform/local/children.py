"""A supervised child process: started, restarted with backoff when it exits, stopped on request.

The child runs in its own session (process group), so stopping it reaches what it started too:
SIGTERM to the group, then SIGKILL after the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("tether.supervisor")

MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0
# A child that ran this long before exiting restarts at the minimum backoff again.
STABLE_AFTER = 10.0


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class Supervised:
    """One child, kept running until :meth:`request_stop`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: str | None = None, grace: float = 10.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace = grace
        self.restarts = 0
        self.pid: int | None = None
        self.last_exit: int | None = None
        self.started_at: float | None = None
        self._stop = asyncio.Event()
        self.done = asyncio.Event()  # set once run() has returned: stopped for good

    @property
    def running(self) -> bool:
        return self.pid is not None

    def request_stop(self) -> None:
        self._stop.set()

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            return await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True)
        finally:
            out.close()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.done.set()

    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        while not self._stop.is_set():
            try:
                proc = await self._spawn()
            except OSError as e:
                log.error("%s: cannot start %s: %s", self.name, self.argv[0], e)
                self.last_exit = -1
            else:
                self.pid, self.started_at = proc.pid, time.time()
                began = time.monotonic()
                async with asyncio.TaskGroup() as tg:
                    exited = tg.create_task(proc.wait())
                    stopping = tg.create_task(self._stop.wait())
                    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if not exited.done():
                        await terminate(proc, self.grace)
                    stopping.cancel()
                self.pid, self.last_exit = None, proc.returncode
                if self._stop.is_set():
                    break
                log.warning("%s exited with %s; restarting in %.1fs", self.name, proc.returncode,
                            MIN_BACKOFF if time.monotonic() - began > STABLE_AFTER else backoff)
                if time.monotonic() - began > STABLE_AFTER:
                    backoff = MIN_BACKOFF
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, MAX_BACKOFF)


async def http_status(host: str, port: int, path: str, timeout: float = 1.0) -> int:
    """The status code of ``GET path`` (HTTP/1.0), or 0 when nothing answers in time."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
