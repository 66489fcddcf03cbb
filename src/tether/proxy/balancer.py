"""The load balancer over one destination's endpoints: P2C on peak-EWMA, with failure accrual.

A :class:`Balancer` is a Service. Each request goes to one endpoint, chosen by power of two
choices among the ready endpoints, comparing peak-EWMA latency times (pending + 1) divided by the
endpoint's weight. Consecutive failures (an exception from the endpoint, a 5xx, or a failing gRPC
status, as linkerd2-proxy classifies responses) eject an endpoint; after its penalty one real
request probes it. When no endpoint is ready a request waits in a bounded queue; if none becomes
ready within the fail-fast timeout the balancer is in fail-fast and requests fail at once with
:class:`FailFastError` (503) until an endpoint is ready again, as linkerd2-proxy's
``FailFast`` layer does.

The decisions live in the pure cores (``tether.core.routing.ewma``, ``p2c``, ``failure_accrual``);
this module only measures time, waits and dispatches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from tether.core.discovery.endpoints import Addr, Endpoint, EndpointDiff, EndpointSet
from tether.core.http.classify import ACCRUAL, parse_grpc_status
from tether.core.routing.ewma import PeakEwma
from tether.core.routing.failure_accrual import (
    READY_STATES,
    AccrualPolicy,
    FailureAccrual,
    Permit,
    State,
)
from tether.core.routing.p2c import choose
from tether.proxy.config import BalancerSettings, ProxyConfig, balancer_settings
from tether.proxy.errors import (
    ConnectError,
    FailFastError,
    LoadShedError,
    ProxyError,
    StreamCapacityError,
    UnavailableError,
    UpstreamError,
)
from tether.proxy.http.body import Body, BodyError, Headers
from tether.proxy.http.message import Request, Response, Service

log = logging.getLogger(__name__)

EndpointFactory = Callable[[Endpoint], Service]

def classify(rsp: Response) -> bool | None:
    """Failure accrual's verdict from the head: True success, False failure, None when only the
    trailers can tell (a streaming gRPC response)."""
    ctype = rsp.header(b"content-type")
    grpc = ctype is not None and ctype.startswith(b"application/grpc")
    status = rsp.header(b"grpc-status") if grpc else None
    return ACCRUAL.head(rsp.status, grpc, parse_grpc_status(status.strip()) if status is not None else None)


_CONNECT_BACKOFF_MIN: Final = 0.1
_CONNECT_BACKOFF_MAX: Final = 10.0


class _Slot:
    """One endpoint in the balancer: its service and its cores."""

    __slots__ = ("accrual", "down_backoff", "down_until", "endpoint", "ewma", "removed", "service")

    def __init__(self, endpoint: Endpoint, service: Service, ewma: PeakEwma, accrual: FailureAccrual) -> None:
        self.endpoint = endpoint
        self.service = service
        self.ewma = ewma
        self.accrual = accrual
        self.removed = False
        # A refused connection makes the endpoint unready at once (like tower's reconnect
        # backoff), independently of failure accrual's count of consecutive failures.
        self.down_until = 0.0
        self.down_backoff = 0.0


class _OutcomeBody(Body):
    """A gRPC response body that reports the call's outcome from its trailers at the end."""

    def __init__(self, inner: Body, report: Callable[[bool | None], None]) -> None:
        self._inner = inner
        self._report: Callable[[bool | None], None] | None = report
        self.length = inner.length

    @property
    def trailers(self) -> Headers | None:
        return self._inner.trailers

    def _done(self, ok: bool | None) -> None:
        report, self._report = self._report, None
        if report is not None:
            report(ok)

    async def read(self) -> bytes:
        try:
            chunk = await self._inner.read()
        except BodyError:
            self._done(False)
            raise
        except BaseException:
            self._done(None)
            raise
        if not chunk:
            self._ended()
        return chunk

    def take(self) -> bytes | None:
        rest = self._inner.take()
        if rest is not None:
            self._ended()  # the rest is all here, its end (the trailers) included
        return rest

    def _ended(self) -> None:
        status: int | None = None
        for k, v in self.trailers or ():
            if k == b"grpc-status":
                status = parse_grpc_status(v.strip())
                break
        # No status at all: the call did not complete, but that is no verdict on the server.
        self._done(True if status is None else ACCRUAL.grpc_ok(status))

    def is_end_known(self) -> bool:
        return self._inner.is_end_known()

    def discard(self) -> None:
        self._inner.discard()
        self._done(None)


class Balancer:
    """A Service that spreads requests over a changing set of endpoints.

    ``make_endpoint(endpoint)`` builds the Service that talks to one endpoint (a connection
    pool); it is called once per address added and, if the service has ``aclose()``, that is
    awaited when the endpoint is removed and its in-flight requests have their response heads.
    """

    def __init__(
        self,
        make_endpoint: EndpointFactory,
        cfg: BalancerSettings | None = None,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        cfg = cfg if cfg is not None else balancer_settings(ProxyConfig())
        self.name = name
        self.failfast_timeout = cfg.failfast_timeout
        self.queue_capacity = cfg.balancer_queue_capacity
        self._make = make_endpoint
        self._clock = clock
        self._shared_clock = clock is time.monotonic  # a metrics layer's Request.started is on this clock
        self._rng = rng if rng is not None else random.Random()
        self._random = self._rng.random
        self._policy = AccrualPolicy(
            max_failures=cfg.failure_accrual_max_failures,
            min_penalty=cfg.failure_accrual_min_penalty,
            max_penalty=cfg.failure_accrual_max_penalty,
            jitter=cfg.failure_accrual_jitter,
        )
        self._default_rtt = cfg.ewma_default_rtt
        self._decay = cfg.ewma_decay
        self._slots: dict[Addr, _Slot] = {}
        self._ready: list[_Slot] = []
        self._dirty = False
        self._next_change = math.inf  # the earliest end of a penalty among unready endpoints
        self._waiters: dict[asyncio.Future[None], None] = {}  # FIFO with O(1) removal
        self._unavailable_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closing: set[asyncio.Task[None]] = set()
        self._unclosed: list[Service] = []  # retired outside a running loop: closed by aclose()
        self._closed = False
        # Plain counters, rendered at scrape time (Outbound.balancer_lines).
        self.failfast_total = 0
        self.loadshed_total = 0
        self.ejections_total = 0

    # -- discovery ---------------------------------------------------------------------------------
    def update(self, add: Iterable[Endpoint] = (), remove: Iterable[Addr] = ()) -> None:
        """Remove addresses, then add (or update) endpoints. Call it on the event loop's thread."""
        if self._closed:
            return
        now = self._clock()
        for addr in remove:
            slot = self._slots.pop(addr, None)
            if slot is not None:
                self._retire(slot)
        added = False
        for ep in add:
            old = self._slots.get(ep.addr)
            if old is not None:
                if old.endpoint == ep:
                    continue
                if old.endpoint.same_connection(ep):
                    old.endpoint = ep  # weight or labels: keep the connections and the estimates
                    continue
                del self._slots[ep.addr]
                self._retire(old)
            try:
                service = self._make(ep)
            except Exception:
                log.exception("balancer %s: cannot build a client for endpoint %s; skipped", self.name, ep)
                continue
            self._slots[ep.addr] = _Slot(
                ep,
                service,
                PeakEwma(now, self._default_rtt, self._decay),
                FailureAccrual(self._policy, self._rng.random),
            )
            added = True
        self._dirty = True
        if added:
            self._notify()

    def apply(self, diff: EndpointDiff) -> None:
        """Apply a discovery diff."""
        self.update(diff.add, diff.remove)

    def replace(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the endpoint set exactly ``endpoints`` (a discovery snapshot)."""
        self.apply(self.endpoints.diff(EndpointSet(endpoints)))

    @property
    def endpoints(self) -> EndpointSet:
        return EndpointSet(s.endpoint for s in self._slots.values())

    # -- metrics -----------------------------------------------------------------------------------
    @property
    def endpoints_ready(self) -> int:
        """outbound_http_balancer_endpoints{endpoint_state="ready"}."""
        self._refresh(self._clock())
        return len(self._ready)

    @property
    def endpoints_pending(self) -> int:
        """outbound_http_balancer_endpoints{endpoint_state="pending"}: in penalty or probing."""
        return len(self._slots) - self.endpoints_ready

    @property
    def queue_length(self) -> int:
        """Requests waiting for an endpoint."""
        return len(self._waiters)

    @property
    def in_failfast(self) -> bool:
        since = self._unavailable_since
        return since is not None and self._clock() >= since + self.failfast_timeout

    def endpoint_stats(self) -> list[dict[str, Any]]:
        """Per endpoint: address, breaker state, latency estimate (s), pending requests, weight."""
        now = self._clock()
        return [
            {
                "addr": str(s.endpoint),
                "state": s.accrual.poll(now).value,
                "ewma": s.ewma.estimate,
                "pending": s.ewma.pending,
                "weight": s.endpoint.weight,
            }
            for s in self._slots.values()
        ]

    # -- the service -------------------------------------------------------------------------------
    async def __call__(self, req: Request, /) -> Response:
        t0 = req.started
        if t0 >= 0.0 and self._shared_clock:
            req.started = -1.0  # taken once: a retry of this request reads the clock itself
        else:
            t0 = self._clock()
        picked = self._pick(t0)
        if picked is None:
            picked = await self._wait()
            t0 = self._clock()
        slot, permit = picked
        slot.ewma.start()
        try:
            rsp = await slot.service(req)
        except asyncio.CancelledError:
            self._settle(slot, permit, None, self._finish(slot, t0))
            raise
        except BodyError:
            # The request body failed (the client's side): no verdict on the endpoint.
            self._settle(slot, permit, None, self._finish(slot, t0))
            raise
        except ConnectError:
            now = self._finish(slot, t0)
            self._settle(slot, permit, False, now)
            slot.down_backoff = min(_CONNECT_BACKOFF_MAX, max(_CONNECT_BACKOFF_MIN, slot.down_backoff * 2))
            slot.down_until = now + slot.down_backoff
            self._dirty = True
            raise
        except StreamCapacityError:
            # Busy (every HTTP/2 connection at the peer's stream limit), not failing: no verdict.
            self._settle(slot, permit, None, self._finish(slot, t0))
            raise
        except ProxyError:
            self._settle(slot, permit, False, self._finish(slot, t0))
            raise
        except Exception as e:
            self._settle(slot, permit, False, self._finish(slot, t0))
            raise UpstreamError(f"endpoint {slot.endpoint}: {e or type(e).__name__}") from e
        now = self._finish(slot, t0)
        slot.down_backoff = 0.0
        ok = classify(rsp)
        if ok is None:
            rsp.body = _OutcomeBody(rsp.body, lambda ok: self._settle(slot, permit, ok, self._clock()))
        else:
            self._settle(slot, permit, ok, now)
        return rsp

    # -- choosing ----------------------------------------------------------------------------------
    def _refresh(self, now: float) -> None:
        if not self._dirty and now < self._next_change:
            return
        ready: list[_Slot] = []
        next_change = math.inf
        for s in self._slots.values():
            acc = s.accrual
            if s.down_until > now:
                next_change = min(next_change, s.down_until)
            elif acc.ready(now):
                ready.append(s)
            elif acc.state is State.PENALTY:
                next_change = min(next_change, acc.until)
        self._ready = ready
        self._next_change = next_change
        self._dirty = False

    def _pick(self, now: float) -> tuple[_Slot, Permit] | None:
        self._refresh(now)
        ready = self._ready
        n = len(ready)
        if n == 0:
            return None
        # One ready endpoint needs no choice (as choose decides): no closure, no bound method.
        slot = ready[0] if n == 1 else ready[self._p2c(ready, now)]
        permit = slot.accrual.dispatch(now)
        if permit.probe:
            self._dirty = True  # the probe slot is taken: not ready until its outcome
            log.debug("balancer %s: probing endpoint %s", self.name, slot.endpoint)
        self._unavailable_since = None
        return slot, permit

    def _p2c(self, ready: list[_Slot], now: float) -> int:
        def cost(j: int) -> float:
            return ready[j].ewma.cost(now) / ready[j].endpoint.weight

        i = choose(len(ready), cost, self._randrange)
        assert i is not None, "choose found no candidate among two or more"
        return i

    def _randrange(self, n: int) -> int:
        # random.Random.randrange costs three Python frames; this is one (uniform enough for P2C).
        return int(self._random() * n)

    async def _wait(self) -> tuple[_Slot, Permit]:
        loop = asyncio.get_running_loop()
        now = self._clock()
        if self._unavailable_since is None:
            self._unavailable_since = now
        deadline = self._unavailable_since + self.failfast_timeout
        expired = False
        while True:
            if self._closed:
                raise UnavailableError(f"{self._label()}balancer is closed")
            picked = self._pick(now)
            if picked is not None:
                return picked
            if expired or now >= deadline:
                # In fail-fast until an endpoint is ready: later requests fail without waiting.
                self._unavailable_since = min(deadline, now) - self.failfast_timeout
                self.failfast_total += 1
                raise FailFastError(self._failfast_reason())
            if len(self._waiters) >= self.queue_capacity:
                self.loadshed_total += 1
                raise LoadShedError(
                    f"{self._label()}balancer queue is full ({self.queue_capacity} requests waiting)"
                )
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters[fut] = None
            self._arm_timer(now)
            try:
                async with asyncio.timeout(deadline - now):
                    await fut
            except TimeoutError:
                expired = True  # the wait itself measured the deadline (whatever the clock says)
            finally:
                self._waiters.pop(fut, None)
            now = self._clock()

    def _label(self) -> str:
        return f"{self.name}: " if self.name else ""

    def _failfast_reason(self) -> str:
        n = len(self._slots)
        why = "no endpoints" if n == 0 else f"all {n} endpoints unavailable"
        return f"{self._label()}service in fail-fast ({why} for {self.failfast_timeout:g}s)"

    # -- outcomes ----------------------------------------------------------------------------------
    def _finish(self, slot: _Slot, t0: float) -> float:
        """Record the time to response headers; return now."""
        now = self._clock()
        slot.ewma.finish(now, now - t0)
        if slot.removed and slot.ewma.pending == 0:
            self._close_service(slot.service)
        return now

    def _settle(self, slot: _Slot, permit: Permit, ok: bool | None, now: float) -> None:
        acc = slot.accrual
        before = acc.state
        if ok is None:
            acc.cancel(permit, now)
        elif ok:
            acc.success(permit, now)
        else:
            acc.failure(permit, now)
        after = acc.state
        if after is before or slot.removed:
            return
        self._dirty = True
        if after is State.PENALTY:
            self.ejections_total += 1
            log.info(
                "balancer %s: endpoint %s ejected for %.1fs after %s",
                self.name,
                slot.endpoint,
                acc.until - now,
                "a failed probe" if before is State.PROBING else f"{self._policy.max_failures} failures",
            )
            if self._waiters:
                self._arm_timer(now)
        elif after in READY_STATES:
            if after is State.HEALTHY:
                log.info("balancer %s: endpoint %s is healthy again", self.name, slot.endpoint)
            self._notify()

    # -- waking waiters ----------------------------------------------------------------------------
    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    def _arm_timer(self, now: float) -> None:
        """Wake the waiters when the earliest penalty ends."""
        self._refresh(now)
        at = self._next_change
        if at == math.inf or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(at - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._dirty = True
        self._notify()
        if self._waiters:
            self._arm_timer(self._clock())

    # -- closing -----------------------------------------------------------------------------------
    def _retire(self, slot: _Slot) -> None:
        slot.removed = True
        self._dirty = True
        if slot.ewma.pending == 0:
            self._close_service(slot.service)

    def _close_service(self, service: Service) -> None:
        aclose = getattr(service, "aclose", None)
        if aclose is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._unclosed.append(service)
            return
        task = loop.create_task(self._run_close(service))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _run_close(self, service: Service) -> None:
        try:
            await service.aclose()  # type: ignore[attr-defined]
        except Exception:
            log.warning("balancer %s: closing an endpoint client failed", self.name, exc_info=True)

    async def aclose(self) -> None:
        """Close every endpoint client and fail the waiting requests (503)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._notify()
        for slot in list(self._slots.values()):
            self._retire(slot)
        self._slots.clear()
        self._ready = []
        pending, self._unclosed = self._unclosed, []
        for service in pending:
            await self._run_close(service)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
