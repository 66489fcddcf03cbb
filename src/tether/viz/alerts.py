"""The alert rules: the seeds' (004's PrometheusRule, made to fire on tether) and tether's own.

What changed from the seed's text and why (see the seeds-vs-linkerd reference):
- the success-rate and latency rules count ``direction="inbound"`` only (a deployment's outbound
  series are its calls to others, not its own answers) and group by namespace as well, so one rule
  covers every namespace unless ``namespace`` is given;
- the control-plane rule uses the namespace the control plane runs in (the scrape jobs add it);
- ``linkerd_identity_cert_expiration_timestamp_seconds`` is exported by tether's identity service
  for its issuer certificate, so the seed's expiry rule works as its author meant.
"""

from __future__ import annotations

from typing import Any

from tether.viz.queries import CONTROLLER_JOB, PROXY_JOB, escape


def _ns_matcher(namespace: str) -> str:
    return f',namespace="{escape(namespace)}"' if namespace else ""


def seed_rules(workload_namespace: str, controller_namespace: str) -> list[dict[str, Any]]:
    ns = _ns_matcher(workload_namespace)
    group = "namespace, deployment"
    return [
        {"alert": "LinkerdServiceLowSuccessRate",
         "expr": ('(\n  sum(rate(response_total{direction="inbound",classification="success"'
                  f'{ns}}}[5m])) by ({group})\n'
                  f'  /\n  sum(rate(response_total{{direction="inbound"{ns}}}[5m])) by ({group})\n) < 0.99\n'),
         "for": "5m", "labels": {"severity": "warning"},
         "annotations": {"summary": "Low success rate for {{ $labels.deployment }}",
                         "description": "Success rate is {{ $value | humanizePercentage }}"}},
        {"alert": "LinkerdServiceHighLatency",
         "expr": (f'histogram_quantile(0.99,\n  sum(rate(response_latency_ms_bucket{{direction="inbound"{ns}}}[5m])) '
                  f'by (le, {group})\n) > 1000\n'),
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": "High latency for {{ $labels.deployment }}",
                         "description": "P99 latency is {{ $value }}ms"}},
        {"alert": "LinkerdControlPlaneDown",
         "expr": f'up{{namespace="{escape(controller_namespace)}",job="{CONTROLLER_JOB}"}} == 0',
         "for": "1m", "labels": {"severity": "critical"},
         "annotations": {"summary": "Linkerd control plane is down"}},
        {"alert": "LinkerdCertificateExpiringSoon",
         "expr": "(linkerd_identity_cert_expiration_timestamp_seconds - time()) / 86400 < 7\n",
         "for": "1h", "labels": {"severity": "warning"},
         "annotations": {"summary": "Linkerd certificate expiring soon",
                         "description": "Certificate expires in {{ $value }} days"}},
    ]


def tether_rules(controller_namespace: str) -> list[dict[str, Any]]:
    cp = f'job="{CONTROLLER_JOB}",namespace="{escape(controller_namespace)}"'
    proxy = f'job="{PROXY_JOB}"'
    return [
        {"alert": "TetherControlPlaneComponentDown",
         "expr": f"sum(up{{{cp}}}) by (namespace, component) == 0",
         "for": "1m", "labels": {"severity": "critical"},
         "annotations": {"summary": "every replica of {{ $labels.component }} is down",
                         "description": "no {{ $labels.component }} replica in {{ $labels.namespace }} answers its "
                                        "admin port: proxies keep their last answers but get no updates or "
                                        "certificates"}},
        {"alert": "TetherControlPlaneAbsent",
         "expr": f'absent(up{{{cp},component="identity"}}) or absent(up{{{cp},component="destination"}})',
         "for": "5m", "labels": {"severity": "critical"},
         "annotations": {"summary": "Prometheus finds no identity or no destination controller to scrape"}},
        {"alert": "TetherProxyNotReady",
         "expr": (f"(up{{{proxy}}} == 0) or on (namespace, pod) "
                  f"(control_identity_cert_expiration_timestamp_seconds{{{proxy}}} - time() <= 0)"),
         "for": "2m", "labels": {"severity": "warning"},
         "annotations": {"summary": "proxy of {{ $labels.namespace }}/{{ $labels.pod }} is not ready",
                         "description": "its admin port does not answer, or its workload certificate has expired"}},
        {"alert": "TetherProxyCertificateExpiringSoon",
         "expr": f"control_identity_cert_expiration_timestamp_seconds{{{proxy}}} - time() < 3600",
         "for": "5m", "labels": {"severity": "warning"},
         "annotations": {"summary": "workload certificate of {{ $labels.namespace }}/{{ $labels.pod }} expires in "
                                    "under an hour",
                         "description": "it should have been renewed long before: check the identity service "
                                        "and the proxy's log"}},
        {"alert": "TetherProxyCertificateRefreshFailing",
         "expr": f'increase(control_identity_cert_refreshes_total{{{proxy},result="error"}}[10m]) > 0',
         "for": "10m", "labels": {"severity": "warning"},
         "annotations": {"summary": "proxy of {{ $labels.namespace }}/{{ $labels.pod }} fails to renew its "
                                    "certificate"}},
        {"alert": "TetherIssuerCertificateExpiringSoon",
         "expr": f"issuer_cert_ttl_seconds{{{cp}}} / 86400 < 7",
         "for": "1h", "labels": {"severity": "warning"},
         "annotations": {"summary": "the identity issuer certificate expires in {{ $value }} days",
                         "description": "give identity a new issuer certificate and key before it expires"}},
        {"alert": "TetherTrustAnchorExpiringSoon",
         "expr": f"(identity_trust_anchor_expiration_timestamp_seconds{{{cp}}} - time()) / 86400 < 30",
         "for": "1h", "labels": {"severity": "warning"},
         "annotations": {"summary": "trust anchor {{ $labels.subject }} expires in {{ $value }} days"}},
    ]


def prometheus_rule(controller_namespace: str = "linkerd", workload_namespace: str = "",
                    name: str = "linkerd-alerts") -> dict[str, Any]:
    """A monitoring.coreos.com/v1 PrometheusRule with the seeds' rules and tether's."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": controller_namespace},
        "spec": {"groups": [
            {"name": "linkerd.rules", "interval": "30s",
             "rules": seed_rules(workload_namespace, controller_namespace)},
            {"name": "tether.rules", "interval": "30s", "rules": tether_rules(controller_namespace)},
        ]},
    }
