"""Every PromQL query viz runs, written once (stat, routes, top, edges, the dashboards, the web page).

A query is built from a :class:`Selector` (label matchers) and a grouping; the shapes are those of
Linkerd's metrics API (viz/metrics-api: ``sum(increase(response_total{...}[w])) by (...,
classification)``, ``histogram_quantile(q, sum(irate(response_latency_ms_bucket{...}[w])) by (le,
...))``, ``sum(tcp_open_connections{...}) by (...)``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

QUANTILES = (0.5, 0.95, 0.99)
PROXY_JOB = "linkerd-proxy"
CONTROLLER_JOB = "linkerd-controller"

# A resource type's label on the proxy's own series, and on the series of its clients (dst_*).
TYPE_LABELS = {
    "deployment": ("deployment", "dst_deployment"),
    "pod": ("pod", "dst_pod"),
    "namespace": ("namespace", "dst_namespace"),
    "service": ("", "dst_service"),  # a Service has no proxy of its own: seen from its clients
    "authority": ("authority", "authority"),
}
TYPE_ALIASES = {
    "deploy": "deployment", "deployment": "deployment", "deployments": "deployment", "deploys": "deployment",
    "po": "pod", "pod": "pod", "pods": "pod",
    "ns": "namespace", "namespace": "namespace", "namespaces": "namespace",
    "svc": "service", "service": "service", "services": "service",
    "au": "authority", "authority": "authority", "authorities": "authority",
}


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True)
class Selector:
    """Label matchers, rendered as ``{k="v",...}`` (``=~`` for a value given as a regex)."""

    equal: tuple[tuple[str, str], ...] = ()
    regex: tuple[tuple[str, str], ...] = ()
    not_equal: tuple[tuple[str, str], ...] = field(default=())

    @staticmethod
    def of(equal: Mapping[str, str] | None = None, regex: Mapping[str, str] | None = None,
           not_equal: Mapping[str, str] | None = None) -> Selector:
        return Selector(tuple(sorted((equal or {}).items())), tuple(sorted((regex or {}).items())),
                        tuple(sorted((not_equal or {}).items())))

    def with_(self, **equal: str) -> Selector:
        merged = dict(self.equal)
        merged.update(equal)
        return Selector(tuple(sorted(merged.items())), self.regex, self.not_equal)

    def render(self) -> str:
        parts = [f'{k}="{escape(v)}"' for k, v in self.equal]
        parts += [f'{k}=~"{escape(v)}"' for k, v in self.regex]
        parts += [f'{k}!="{escape(v)}"' for k, v in self.not_equal]
        return "{" + ",".join(parts) + "}"


def by(labels: Iterable[str]) -> str:
    return ", ".join(labels)


def responses(sel: Selector, window: str, group: Iterable[str], family: str = "") -> str:
    """Responses counted over ``window`` by ``group`` and classification (``family``: ``route_``,
    ``route_actual_`` or the per-endpoint series)."""
    return f"sum(increase({family}response_total{sel.render()}[{window}])) by ({by([*group, 'classification'])})"


def latency(q: float, sel: Selector, window: str, group: Iterable[str], family: str = "") -> str:
    return (f"histogram_quantile({q}, sum(irate({family}response_latency_ms_bucket{sel.render()}[{window}])) "
            f"by ({by(['le', *group])}))")


def tcp_open(sel: Selector, group: Iterable[str]) -> str:
    return f"sum(tcp_open_connections{sel.render()}) by ({by(group)})"


def tcp_bytes(sel: Selector, window: str, group: Iterable[str], which: str) -> str:
    return f"sum(rate(tcp_{which}_bytes_total{sel.render()}[{window}])) by ({by(group)})"


def meshed_pods(sel: Selector, group: Iterable[str]) -> str:
    """Proxies Prometheus scrapes, and how many of them answered the last scrape."""
    return f"count(up{sel.with_(job=PROXY_JOB).render()}) by ({by(group)})"


def ready_pods(sel: Selector, group: Iterable[str]) -> str:
    return f"count(up{sel.with_(job=PROXY_JOB).render()} == 1) by ({by(group)})"


def edges_outbound(sel: Selector, window: str) -> str:
    return (f"sum(increase(response_total{sel.with_(direction='outbound').render()}[{window}])) "
            "by (namespace, deployment, pod, serviceaccount, dst_namespace, dst_deployment, server_id, tls, "
            "no_tls_reason)")


def edges_inbound(sel: Selector, window: str) -> str:
    return (f"sum(increase(response_total{sel.with_(direction='inbound').render()}[{window}])) "
            "by (namespace, deployment, client_id)")


def freshness() -> str:
    """Seconds since the newest scrape of any proxy or controller (viz check: data fresh)."""
    return f'time() - max(timestamp(up{{job=~"{PROXY_JOB}|{CONTROLLER_JOB}"}}))'


def authority_regex(service: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """The authorities a client may use for a Service: NAME, NAME.NS, NAME.NS.svc.DOMAIN, each with a port."""
    n, ns, d = re.escape(service), re.escape(namespace), re.escape(cluster_domain)
    return f"{n}(\\.{ns}(\\.svc\\.{d})?)?(:[0-9]+)?"


def request_rate(sel: Selector, window: str, group: Iterable[str], family: str = "") -> str:
    """Responses per second (what Linkerd's dashboards call RPS)."""
    return f"sum(rate({family}response_total{sel.render()}[{window}])) by ({by(group)})"


def success_rate(sel: Selector, window: str, group: Iterable[str], family: str = "") -> str:
    """The share of responses classified success."""
    ok = sel.with_(classification="success")
    return (f"sum(rate({family}response_total{ok.render()}[{window}])) by ({by(group)}) / "
            f"sum(rate({family}response_total{sel.render()}[{window}])) by ({by(group)})")


def latency_rate(q: float, sel: Selector, window: str, group: Iterable[str], family: str = "") -> str:
    """A latency quantile over ``window`` (rate, for dashboards: smoother than irate)."""
    return (f"histogram_quantile({q}, sum(rate({family}response_latency_ms_bucket{sel.render()}[{window}])) "
            f"by ({by(['le', *group])}))")
