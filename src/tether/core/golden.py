"""Golden signals (success rate, request rate, latency percentiles) from Prometheus text.

Pure: exposition text in, numbers out. Percentiles are estimated from the cumulative
``response_latency_ms`` buckets by linear interpolation inside the bucket, as PromQL's
``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (comments skipped)."""
    out: list[Sample] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                  for k, v in _LABEL.findall(m.group(2) or "")}
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The q-quantile from cumulative (upper bound, count) buckets; NaN when empty."""
    bs = sorted(buckets)
    if not bs or bs[-1][1] == 0:
        return math.nan
    total = bs[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return bs[-1][0]


@dataclass(frozen=True)
class Golden:
    requests: float
    successes: float
    failures: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @property
    def success_rate(self) -> float:
        done = self.successes + self.failures
        return self.successes / done if done else math.nan


def golden(samples: list[Sample], match: Callable[[dict[str, str]], bool]) -> Golden:
    """Golden signals over the series whose labels satisfy ``match``."""
    requests = sum(v for n, lb, v in samples if n == "request_total" and match(lb))
    ok = sum(v for n, lb, v in samples
             if n == "response_total" and match(lb) and lb.get("classification") == "success")
    bad = sum(v for n, lb, v in samples
              if n == "response_total" and match(lb) and lb.get("classification") == "failure")
    per_le: dict[float, float] = {}
    for n, lb, v in samples:
        if n == "response_latency_ms_bucket" and match(lb):
            le = float(lb.get("le", "+Inf"))
            per_le[le] = per_le.get(le, 0.0) + v
    b = list(per_le.items())
    return Golden(requests, ok, bad, histogram_quantile(0.5, b), histogram_quantile(0.95, b),
                  histogram_quantile(0.99, b))
