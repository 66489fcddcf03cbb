"""A small client of the Prometheus HTTP API (``/api/v1/query``, ``/api/v1/targets``, ``/-/ready``)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT = 10.0


class PrometheusError(Exception):
    """Prometheus could not be reached or refused a query; the message says which and why."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


class Prometheus:
    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT, at: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.at = at  # queries without their own time are evaluated at this instant (None: Prometheus's now)

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        full = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(full, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = json.loads(e.read()).get("error", "")
            except (ValueError, OSError, AttributeError):
                pass
            raise PrometheusError(f"Prometheus at {self.url} answered {e.code}: {detail or e.reason}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url}: {path} did not answer JSON") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            err = doc.get("error", "unknown error") if isinstance(doc, dict) else "not an object"
            raise PrometheusError(f"Prometheus at {self.url}: {err}")
        return doc.get("data")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=self.timeout) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def reload(self) -> bool:
        """Ask Prometheus to re-read its configuration and rules (needs --web.enable-lifecycle)."""
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout * 10) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def snapshot(self) -> Prometheus:
        """This Prometheus with every query evaluated at one instant, Prometheus's own now (asked
        for, so a client whose clock differs still reads the latest samples). The numbers of one
        command then come from the same scrapes: a scrape landing between two of its queries would
        otherwise show, for one, requests the other does not count yet."""
        now = self.query("time()")
        return Prometheus(self.url, self.timeout, now[0].value if now else None)

    def query(self, promql: str, time: float | None = None) -> list[Sample]:
        """An instant query; a vector or scalar result as samples (NaN values kept)."""
        params = {"query": promql}
        if time is None:
            time = self.at
        if time is not None:
            params["time"] = f"{time:.3f}"
        data = self._get("/api/v1/query", params)
        kind = data.get("resultType")
        if kind == "scalar":
            return [Sample({}, _float(data["result"][1]))]
        if kind != "vector":
            raise PrometheusError(f"query {promql!r}: a {kind} result, not a vector")
        return [Sample(dict(r.get("metric", {})), _float(r["value"][1])) for r in data["result"]]

    def targets(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/targets", {"state": "active"})
        return list(data.get("activeTargets", []))

    def rules(self) -> list[dict[str, Any]]:
        data = self._get("/api/v1/rules")
        return list(data.get("groups", []))


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan
