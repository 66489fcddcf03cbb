"""Grafana dashboards (top line, namespace, deployment, pod, route, TCP, authorization) built from
the queries in :mod:`tether.viz.queries` and shipped as JSON package data (``viz/dashboards``).

``python -m tether.viz.grafana`` rewrites the shipped files; a unit test holds them equal to what
this module builds. There is no multicluster dashboard: tether exports no multicluster metrics yet.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from tether.viz import queries as q

W = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


class _Board:
    def __init__(self, uid: str, title: str, variables: list[str]) -> None:
        self.uid, self.title, self.variables = uid, title, variables
        self.panels: list[dict[str, Any]] = []
        self._y = 0
        self._x = 0

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
              width: int = 8, may_be_empty: bool = False) -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + 8
        p: dict[str, Any] = {
            "id": len(self.panels) + 1, "title": title, "type": kind, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": width, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                         "datasource": DATASOURCE} for i, (expr, legend) in enumerate(targets)],
        }
        if may_be_empty:
            # Read by tether's own test: a panel that shows nothing until such traffic exists.
            p["description"] = "Empty until there is such traffic."
        self.panels.append(p)
        self._x += width

    def doc(self) -> dict[str, Any]:
        templating: list[dict[str, Any]] = [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        for v in self.variables:
            query = {"namespace": 'label_values(up{job="linkerd-proxy"}, namespace)',
                     "deployment": 'label_values(up{job="linkerd-proxy",namespace="$namespace"}, deployment)',
                     "pod": 'label_values(up{job="linkerd-proxy",namespace="$namespace"}, pod)',
                     "dst": 'label_values(route_response_total{namespace="$namespace"}, dst)'}[v]
            templating.append({"name": v, "type": "query", "datasource": DATASOURCE, "query": query,
                               "refresh": 2, "includeAll": False, "multi": False, "label": v})
        return {
            "uid": self.uid, "title": self.title, "tags": ["tether", "linkerd"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-15m", "to": "now"},
            "timezone": "", "templating": {"list": templating}, "panels": self.panels,
        }


def _golden(b: _Board, sel: q.Selector, group: list[str], legend: str) -> None:
    b.panel("Success rate", [(q.success_rate(sel, W, group), legend)], "percentunit")
    b.panel("Request rate", [(q.request_rate(sel, W, group), legend)], "reqps")
    b.panel("Latency", [(q.latency_rate(qq, sel, W, group), f"p{round(qq * 100)} {legend}")
                        for qq in q.QUANTILES], "ms")


def top_line() -> dict[str, Any]:
    b = _Board("tether-top-line", "tether / Top line", [])
    inbound = q.Selector.of({"direction": "inbound"})
    b.panel("Global success rate", [(q.success_rate(inbound, W, []), "success")], "percentunit", "stat")
    b.panel("Global request volume", [(q.request_rate(inbound, W, []), "rps")], "reqps", "stat")
    b.panel("Meshed pods", [('count(up{job="linkerd-proxy"} == 1)', "ready proxies")], "short", "stat")
    _golden(b, inbound, ["namespace"], "{{namespace}}")
    b.panel("Control plane up", [('sum(up{job="linkerd-controller"}) by (component)', "{{component}}")],
            "short", width=12)
    b.panel("Proxy memory", [('process_resident_memory_bytes{job="linkerd-proxy"}', "{{namespace}}/{{pod}}")],
            "bytes", width=12)
    return b.doc()


def namespace() -> dict[str, Any]:
    b = _Board("tether-namespace", "tether / Namespace", ["namespace"])
    _golden(b, q.Selector.of({"direction": "inbound", "namespace": "$namespace"}), ["deployment"], "{{deployment}}")
    b.panel("Outbound request rate by destination",
            [(q.request_rate(q.Selector.of({"direction": "outbound", "namespace": "$namespace"}), W,
                             ["dst_namespace", "dst_deployment"]), "{{dst_namespace}}/{{dst_deployment}}")],
            "reqps", width=24)
    return b.doc()


def deployment() -> dict[str, Any]:
    b = _Board("tether-deployment", "tether / Deployment", ["namespace", "deployment"])
    own = q.Selector.of({"direction": "inbound", "namespace": "$namespace", "deployment": "$deployment"})
    _golden(b, own, ["deployment"], "{{deployment}}")
    b.panel("Inbound by client", [(q.request_rate(own, W, ["client_id"]), "{{client_id}}")], "reqps", width=12)
    out = q.Selector.of({"direction": "outbound", "namespace": "$namespace", "deployment": "$deployment"})
    b.panel("Outbound success by destination", [(q.success_rate(out, W, ["dst_deployment"]), "{{dst_deployment}}")],
            "percentunit", width=12, may_be_empty=True)
    b.panel("TCP connections (inbound)", [(q.tcp_open(q.Selector.of(
        {"direction": "inbound", "namespace": "$namespace", "deployment": "$deployment"}), ["pod"]), "{{pod}}")],
        "short", width=12)
    b.panel("Proxy CPU", [('sum(rate(process_cpu_seconds_total{job="linkerd-proxy",namespace="$namespace",'
                           f'deployment="$deployment"}}[{W}])) by (pod)', "{{pod}}")], "percentunit", width=12)
    return b.doc()


def pod() -> dict[str, Any]:
    b = _Board("tether-pod", "tether / Pod", ["namespace", "pod"])
    _golden(b, q.Selector.of({"direction": "inbound", "namespace": "$namespace", "pod": "$pod"}), ["pod"], "{{pod}}")
    b.panel("Proxy memory", [('process_resident_memory_bytes{job="linkerd-proxy",namespace="$namespace",pod="$pod"}',
                              "rss")], "bytes", width=12)
    b.panel("Proxy CPU", [('rate(process_cpu_seconds_total{job="linkerd-proxy",namespace="$namespace",pod="$pod"}'
                           f'[{W}])', "cpu")], "percentunit", width=12)
    return b.doc()


def route() -> dict[str, Any]:
    b = _Board("tether-route", "tether / Route", ["namespace", "dst"])
    sel = q.Selector.of({"direction": "outbound", "namespace": "$namespace", "dst": "$dst"})
    b.panel("Success rate (effective)", [(q.success_rate(sel, W, ["rt_route"], "route_"), "{{rt_route}}")],
            "percentunit")
    b.panel("Request rate (effective)", [(q.request_rate(sel, W, ["rt_route"], "route_"), "{{rt_route}}")], "reqps")
    b.panel("Latency p95", [(q.latency_rate(0.95, sel, W, ["rt_route"], "route_"), "{{rt_route}}")], "ms")
    b.panel("Success rate (actual, every try)",
            [(q.success_rate(sel, W, ["rt_route"], "route_actual_"), "{{rt_route}}")], "percentunit", width=12)
    b.panel("Request rate (actual, every try)",
            [(q.request_rate(sel, W, ["rt_route"], "route_actual_"), "{{rt_route}}")], "reqps", width=12)
    return b.doc()


def tcp() -> dict[str, Any]:
    b = _Board("tether-tcp", "tether / TCP", ["namespace"])
    for direction in ("inbound", "outbound"):
        sel = q.Selector.of({"direction": direction, "namespace": "$namespace"})
        b.panel(f"Open connections ({direction})", [(q.tcp_open(sel, ["deployment"]), "{{deployment}}")], width=12)
    sel = q.Selector.of({"namespace": "$namespace"})
    b.panel("Bytes read", [(q.tcp_bytes(sel, W, ["deployment", "direction"], "read"),
                            "{{deployment}} {{direction}}")], "Bps", width=12)
    b.panel("Bytes written", [(q.tcp_bytes(sel, W, ["deployment", "direction"], "write"),
                               "{{deployment}} {{direction}}")], "Bps", width=12)
    b.panel("Connections opened", [(f'sum(rate(tcp_open_total{{namespace="$namespace"}}[{W}])) by (deployment)',
                                    "{{deployment}}")], "cps", width=12)
    b.panel("Connections closed with errors",
            [(f'sum(rate(tcp_close_total{{namespace="$namespace",classification="failure"}}[{W}])) by (deployment)',
              "{{deployment}}")], "cps", width=12, may_be_empty=True)
    return b.doc()


def authorization() -> dict[str, Any]:
    b = _Board("tether-authorization", "tether / Authorization", ["namespace"])
    b.panel("Requests allowed", [(f'sum(rate(inbound_http_authz_allow_total{{namespace="$namespace"}}[{W}])) '
                                  "by (deployment, authz_kind, authz_name)",
                                  "{{deployment}} {{authz_kind}}/{{authz_name}}")], "reqps", width=12)
    b.panel("Requests denied", [(f'sum(rate(inbound_http_authz_deny_total{{namespace="$namespace"}}[{W}])) '
                                 "by (deployment, srv_name, route_name)", "{{deployment}} {{srv_name}}")],
            "reqps", width=12, may_be_empty=True)
    b.panel("Connections refused", [(f'sum(rate(inbound_tcp_authz_deny_total{{namespace="$namespace"}}[{W}])) '
                                     "by (deployment, srv_name)", "{{deployment}} {{srv_name}}")],
            "cps", width=24, may_be_empty=True)
    return b.doc()


BOARDS = {"top-line.json": top_line, "namespace.json": namespace, "deployment.json": deployment, "pod.json": pod,
          "route.json": route, "tcp.json": tcp, "authorization.json": authorization}


def render() -> dict[str, str]:
    """File name -> JSON text, as shipped."""
    return {name: json.dumps(fn(), indent=2, sort_keys=False) + "\n" for name, fn in BOARDS.items()}


def shipped() -> dict[str, str]:
    """The dashboards shipped as package data."""
    root = resources.files("tether.viz") / "dashboards"
    return {name: (root / name).read_text() for name in BOARDS}


def main() -> int:
    out = Path(__file__).parent / "dashboards"
    for name, text in render().items():
        (out / name).write_text(text)
        print(out / name, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
