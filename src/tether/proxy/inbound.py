"""The inbound side: traffic from other workloads (and their proxies) to the local application.

The target port is the original destination's (transparent mode, after iptables REDIRECT), the
port carried by the mesh transport header, or the configured application address. The proxy
then connects to the application on loopback.
"""

from __future__ import annotations

from tether.proxy.config import ProxyConfig
from tether.proxy.endpoint import HttpEndpoint
from tether.proxy.errors import UnavailableError
from tether.proxy.http.message import Request, Response, Service
from tether.proxy.layers.errors import ErrorResponses
from tether.proxy.layers.metrics import HttpMetricsService
from tether.proxy.layers.timeout import ResponseTimeout
from tether.proxy.metrics import MetricsRegistry

LOOPBACK = "127.0.0.1"


def local_target(cfg: ProxyConfig, orig_dst: tuple[str, int] | None, port_hint: int | None) -> tuple[str, int]:
    """Where on this host an inbound connection is delivered."""
    if port_hint is not None:
        return LOOPBACK, port_hint
    if orig_dst is not None:
        return LOOPBACK, orig_dst[1]
    if cfg.inbound_app_addr is not None:
        return cfg.inbound_app_addr
    raise UnavailableError("no application address: not redirected and --inbound-app-addr unset")


class LocalForward:
    """Layer: send the request to the local application, one endpoint per port."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self._endpoints: dict[tuple[str, int], HttpEndpoint] = {}

    async def __call__(self, req: Request) -> Response:
        conn = req.conn
        target = local_target(self.cfg, conn.orig_dst if conn else None, conn.target_port if conn else None)
        req.extensions["target_addr"] = target
        ep = self._endpoints.get(target)
        if ep is None:
            ep = self._endpoints[target] = HttpEndpoint(target, self.cfg,
                                                        connect_timeout=self.cfg.inbound_connect_timeout)
        return await ep(req)

    async def aclose(self) -> None:
        for ep in self._endpoints.values():
            await ep.aclose()


def build_http_stack(cfg: ProxyConfig, metrics: MetricsRegistry) -> tuple[Service, LocalForward]:
    """The inbound HTTP stack, outermost layer last."""
    forward = LocalForward(cfg)
    svc: Service = forward  # to the application on loopback, pooled per port
    if cfg.response_timeout is not None:
        svc = ResponseTimeout(svc, cfg.response_timeout)  # 504 when the head is late
    svc = ErrorResponses(svc)  # typed errors -> 502/503/504 with l5d-proxy-error
    svc = HttpMetricsService(svc, metrics, direction="inbound")  # request_total, response_total, latency
    return svc, forward
