"""The proxy's counters, counted into on every request and connection (compiled with mypyc).

Each is bound to one label set by :class:`tether.proxy.metrics.MetricsRegistry`, which also renders
them; here is only what the hot path touches: an attribute increment, a histogram bucket, the
response class of a status. Compiled, a request's counting costs a few hundred instructions.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

# linkerd2-proxy's response_latency_ms bounds (milliseconds, inclusive), then +Inf.
# Floats, as the observed values are: bisect then compares float to float (an int bound costs a
# conversion per comparison).
LATENCY_BOUNDS_MS: Final[tuple[float, ...]] = tuple(float(b) for b in (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1_000, 2_000, 3_000, 4_000, 5_000, 10_000, 20_000, 30_000, 40_000, 50_000,
))  # fmt: skip
LE: Final = (*(f"{b:g}" for b in LATENCY_BOUNDS_MS), "+Inf")
NBUCKETS: Final = len(LE)
NBOUNDS: Final = len(LATENCY_BOUNDS_MS)

SUCCESS: Final = "success"
FAILURE: Final = "failure"


def escape_label(value: str) -> str:
    """Escape a label value for the Prometheus text format."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def classify(status: int | None, grpc_status: int | None = None, error: str | None = None) -> str:
    """Linkerd's response class: an error, a 5xx or a non-OK grpc-status is a failure."""
    if error is not None:
        return FAILURE
    if grpc_status is not None:
        return SUCCESS if grpc_status == 0 else FAILURE
    if status is None or status >= 500:
        return FAILURE
    return SUCCESS


class Histogram:
    """Latency in milliseconds over LATENCY_BOUNDS_MS; counts are per bucket, not cumulative."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        # The first bound >= ms, as bisect_left finds it. Most latencies fall in the first few
        # buckets, so a compiled scan from the start stops after a compare or two; calling bisect
        # cost about 1k instructions (a C call with a boxed float).
        i: i64 = 0
        while i < NBOUNDS and LATENCY_BOUNDS_MS[i] < ms:
            i += 1
        self.counts[i] += 1
        self.sum_ms += ms


class ResponseClass:
    """response_total for one (status_code, classification, grpc_status, error)."""

    __slots__ = ("count", "label")

    def __init__(self, label: str) -> None:
        self.count = 0
        self.label = label


class StatusMetrics:
    """The latency histogram of one status code and its response classes."""

    __slots__ = ("_success", "classes", "label", "latency")

    def __init__(self, label: str) -> None:
        self.label = label
        self.latency = Histogram()
        self.classes: dict[tuple[str, int | None, str | None], ResponseClass] = {}
        # classes[(SUCCESS, None, None)] once looked up: nearly every response counts into it, and
        # the key's tuple and dict lookup cost about 500 instructions a request.
        self._success: ResponseClass | None = None

    def response(
        self, classification: str, grpc_status: int | None = None, error: str | None = None
    ) -> ResponseClass:
        """The response_total counter of one class (created on first use)."""
        plain = grpc_status is None and error is None and classification == SUCCESS
        if plain and self._success is not None:
            return self._success
        key = (classification, grpc_status, error)
        rc = self.classes.get(key)
        if rc is None:
            label = f',classification="{classification}"'
            if grpc_status is not None:
                label += f',grpc_status="{grpc_status}"'
            if error is not None:
                label += f',error="{escape_label(error)}"'
            rc = self.classes[key] = ResponseClass(label)
        if plain:
            self._success = rc
        return rc


class HttpMetrics:
    """request_total, response_total and response_latency_ms of one label set.

    Hot path: ``m.requests += 1`` on a request; ``m.status(code).latency.observe(ms)`` at the
    response headers; ``m.status(code).response(cls, grpc_status).count += 1`` at its end.
    """

    __slots__ = ("_idle_since", "_seen", "by_status", "label", "requests")

    def __init__(self, label: str) -> None:
        self.label = label
        self.requests = 0
        self.by_status: dict[int | None, StatusMetrics] = {}
        self._seen = -1
        self._idle_since = 0.0

    def copy(self, label: str | None = None) -> HttpMetrics:
        """A series of its own holding this one's counts so far (it then counts on its own)."""
        m = HttpMetrics(self.label if label is None else label)
        m.requests = self.requests
        for code, st in self.by_status.items():
            mine = m.by_status[code] = StatusMetrics(st.label)
            mine.latency.counts = list(st.latency.counts)
            mine.latency.sum_ms = st.latency.sum_ms
            for key, rc in st.classes.items():
                c = mine.classes[key] = ResponseClass(rc.label)
                c.count = rc.count
        return m

    def status(self, code: int | None) -> StatusMetrics:
        """The metrics of one status code (None: no response head, e.g. an upstream error)."""
        st = self.by_status.get(code)
        if st is None:
            st = self.by_status[code] = StatusMetrics("" if code is None else f',status_code="{code}"')
        return st


class TcpMetrics:
    """tcp_* counters of one label set.

    ``opened()`` when a connection is accepted or connected, ``read_bytes += n`` and
    ``write_bytes += n`` as bytes move, ``closed(error)`` when it ends (error None: success).
    """

    __slots__ = ("_idle_since", "_seen", "closes", "label", "open_total", "read_bytes", "write_bytes")

    def __init__(self, label: str) -> None:
        self.label = label
        self.open_total = 0
        self.read_bytes = 0
        self.write_bytes = 0
        # (classification, error) -> count
        self.closes: dict[tuple[str, str | None], int] = {}
        self._seen = -1
        self._idle_since = 0.0

    def opened(self) -> None:
        self.open_total += 1

    def closed(self, error: str | None = None) -> None:
        key = (SUCCESS, None) if error is None else (FAILURE, error)
        self.closes[key] = self.closes.get(key, 0) + 1

    @property
    def open_connections(self) -> int:
        return self.open_total - sum(self.closes.values())
