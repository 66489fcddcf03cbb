"""Steady background load for tests: sequential keep-alive requests, every outcome counted."""

from __future__ import annotations

import http.client
import threading
from collections import Counter


class SteadyLoad:
    """Sends GET requests one after another over a keep-alive connection until stopped.

    ``outcomes`` counts status codes (and exception names); a request that fails for any reason
    counts as a failure. Bounded: it stops by itself after ``max_requests``.
    """

    def __init__(self, host: str, port: int, authority: str, path: str = "/", max_requests: int = 200_000,
                 interval: float = 0.005) -> None:
        self.host, self.port, self.authority, self.path = host, port, authority, path
        self.max_requests = max_requests
        self.interval = interval
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="steady-load")

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        return self.outcomes["200"]

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        for _ in range(self.max_requests):
            if self._stop.wait(self.interval):
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", self.path, headers={"Host": self.authority})
                resp = conn.getresponse()
                resp.read()
                self.outcomes[str(resp.status)] += 1
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self.outcomes[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
