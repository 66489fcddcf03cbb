"""Trace layer: a span per proxied request, the trace context passed on with this hop's span id.

Pushed only when the proxy has a trace collector (tracing off costs nothing). A request carrying a
sampled context (W3C ``traceparent``, B3 ``b3`` or ``x-b3-*``) gets a span: a new span id, the
caller's span as its parent, and the forwarded headers name the new span as the next hop's parent,
in the format the request came with. A context marked not sampled is forwarded untouched, with no
span. A request without context starts a trace with probability ``--trace-sample-rate`` (W3C).
The span ends when the response head comes back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

from tether.core.tracecontext import W3C, TraceContext, extract, inject
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.tracing import Tracer


class TraceLayer:
    """Layer: spans for sampled requests, context propagated with this hop's span id."""

    __slots__ = ("direction", "inner", "kind", "tracer")

    def __init__(self, inner: Service, tracer: Tracer, kind: int, direction: str) -> None:
        self.inner = inner
        self.tracer = tracer
        self.kind = kind
        self.direction = direction

    def __call__(self, req: Request) -> Awaitable[Response]:
        # A plain function: a request that gets no span costs no coroutine frame of this layer's.
        tracer = self.tracer
        ctx = extract(req.headers)
        if ctx is None:
            if not tracer.sample_new():
                return self.inner(req)
            ctx = TraceContext(tracer.new_id(16), b"", True, W3C)  # a new trace: this span is its root
        elif ctx.sampled is False:
            return self.inner(req)  # the caller decided: not traced, context forwarded as it is
        return self._traced(req, ctx)

    async def _traced(self, req: Request, ctx: TraceContext) -> Response:
        tracer = self.tracer
        span_id = tracer.new_id(8)
        req.headers = inject(req.headers, ctx, span_id, True)
        start = time.time_ns()
        status = 0
        try:
            rsp = await self.inner(req)
            status = rsp.status
            return rsp
        finally:
            end = time.time_ns()
            path = req.path.split(b"?", 1)[0].decode("latin-1")
            method = req.method.decode("latin-1")
            attrs = (("http.method", method), ("http.path", path), ("http.host", req.authority.decode("latin-1")),
                     ("http.status_code", status), ("direction", self.direction))
            tracer.record((ctx.trace_id, span_id, ctx.span_id, f"{method} {path}", self.kind, start, end, attrs,
                           status == 0 or status >= 500))
