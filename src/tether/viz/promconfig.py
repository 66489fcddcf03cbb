"""Prometheus configuration: the local mesh's own Prometheus and the scrape jobs for an external one.

Job names and labels follow the seeds' external-Prometheus section (``linkerd-controller`` with a
``component`` label, ``linkerd-proxy`` with ``namespace``, ``pod`` and the pod's ``linkerd.io/proxy-*``
labels), with the fixes Linkerd's own viz chart has and the seed lacks: the controller job adds
``namespace`` (so ``up{namespace="linkerd",job="linkerd-controller"}`` can fire) and the proxy job
maps the pod's labels back at the end (the seed drops them).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

RETENTION = "6h"
DEFAULT_SCRAPE_INTERVAL = "10s"
PROXY_JOB = "linkerd-proxy"
CONTROLLER_JOB = "linkerd-controller"
SERVICE_MIRROR_JOB = "linkerd-service-mirror"

# The proxy job's relabelling of pod labels (seed 003's): linkerd.io/proxy-job as k8s_job, the
# other linkerd.io/proxy-* labels and linkerd.io/* labels by their short names, then every other pod
# label as it is. Used by the scrape config and, in the operator's spelling, by the PodMonitor.
POD_LABEL_RULES: list[dict[str, Any]] = [
    {"source_labels": ["__meta_kubernetes_pod_label_linkerd_io_proxy_job"], "action": "replace",
     "target_label": "k8s_job"},
    {"action": "labeldrop", "regex": "__meta_kubernetes_pod_label_linkerd_io_proxy_job"},
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_linkerd_io_proxy_(.+)"},
    {"action": "labeldrop", "regex": "__meta_kubernetes_pod_label_linkerd_io_proxy_(.+)"},
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_linkerd_io_(.+)"},
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)", "replacement": "__tmp_pod_label_$1"},
    {"action": "labeldrop", "regex": "__tmp_pod_label_linkerd_io_(.+)"},
    # Not in the seed: without it every pod label is lost (labels starting __ are dropped).
    {"action": "labelmap", "regex": "__tmp_pod_label_(.+)"},
]


def local_config(scrape_dir: Path, interval: str = DEFAULT_SCRAPE_INTERVAL, rule_files: list[str] | None = None,
                 self_addr: str | None = None) -> dict[str, Any]:
    """The local Prometheus's config: file-based discovery of the files the supervisor keeps."""
    jobs: list[dict[str, Any]] = [
        {"job_name": CONTROLLER_JOB,
         "file_sd_configs": [{"files": [str(scrape_dir / "controllers.json")], "refresh_interval": "5s"}]},
        {"job_name": PROXY_JOB,
         "file_sd_configs": [{"files": [str(scrape_dir / "proxies.json")], "refresh_interval": "5s"}]},
    ]
    if self_addr:
        jobs.insert(0, {"job_name": "prometheus", "static_configs": [{"targets": [self_addr]}]})
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval if _seconds(interval) < 10 else "10s",
                   "evaluation_interval": interval},
        "rule_files": list(rule_files or []),
        "scrape_configs": jobs,
    }


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    return float(duration)


def kubernetes_jobs(controller_namespace: str = "linkerd", viz_namespace: str = "linkerd-viz") -> list[dict[str, Any]]:
    """The scrape jobs for an external Prometheus in a Kubernetes cluster (Kubernetes pod discovery)."""
    pod_sd = [{"role": "pod"}]
    return [
        {
            "job_name": CONTROLLER_JOB,
            "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [controller_namespace, viz_namespace]}}],
            "relabel_configs": [
                {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "action": "keep",
                 "regex": "admin-http"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "action": "replace",
                 "target_label": "component"},
                # Not in the seed: without it the seed's ControlPlaneDown alert never matches.
                {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
            ],
        },
        {
            "job_name": SERVICE_MIRROR_JOB,
            "kubernetes_sd_configs": pod_sd,
            "relabel_configs": [
                # Mirror pods carry component=linkerd-service-mirror, not the control-plane-component label.
                {"source_labels": ["__meta_kubernetes_pod_label_component",
                                   "__meta_kubernetes_pod_container_port_name"],
                 "action": "keep", "regex": "linkerd-service-mirror;admin-http$"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "action": "replace",
                 "target_label": "component"},
                {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
            ],
        },
        {
            "job_name": PROXY_JOB,
            "kubernetes_sd_configs": pod_sd,
            "relabel_configs": [
                {"source_labels": ["__meta_kubernetes_pod_container_name", "__meta_kubernetes_pod_container_port_name",
                                   "__meta_kubernetes_pod_label_linkerd_io_control_plane_ns"],
                 "action": "keep", "regex": f"^linkerd-proxy;linkerd-admin;{controller_namespace}$"},
                {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
                *copy.deepcopy(POD_LABEL_RULES),
            ],
        },
    ]


def _operator_style(rule: dict[str, Any]) -> dict[str, Any]:
    """A Prometheus relabel rule as the Prometheus Operator spells it (sourceLabels, targetLabel)."""
    names = {"source_labels": "sourceLabels", "target_label": "targetLabel"}
    return {names.get(k, k): copy.deepcopy(v) for k, v in rule.items()}


def local_jobs(scrape_dir: Path) -> list[dict[str, Any]]:
    """The scrape jobs for an external Prometheus on the local mesh's host (the same files)."""
    return list(local_config(scrape_dir)["scrape_configs"])


def dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def pod_monitors(controller_namespace: str = "linkerd", monitor_namespace: str = "monitoring") -> list[dict[str, Any]]:
    """Prometheus Operator PodMonitors for the same jobs: seed 003's proxy PodMonitor with the
    relabelings that add ``deployment`` and the pod's labels (the operator adds only ``namespace``
    and ``pod``, so the seeds' ``by (deployment)`` alerts would come back empty), and one for the
    control plane's admin ports with ``component``."""
    meta = {"namespace": monitor_namespace}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": CONTROLLER_JOB, **meta},
            "spec": {
                "jobLabel": "linkerd.io/control-plane-component",
                "namespaceSelector": {"matchNames": [controller_namespace]},
                "selector": {"matchExpressions": [{"key": "linkerd.io/control-plane-component",
                                                   "operator": "Exists"}]},
                "podMetricsEndpoints": [{"port": "admin-http", "path": "/metrics", "relabelings": [
                    {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "action": "replace",
                     "targetLabel": "component"},
                    {"action": "replace", "targetLabel": "job", "replacement": CONTROLLER_JOB},
                ]}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": PROXY_JOB, **meta},
            "spec": {
                "namespaceSelector": {"any": True},
                "selector": {"matchLabels": {"linkerd.io/control-plane-ns": controller_namespace}},
                "podMetricsEndpoints": [{"port": "linkerd-admin", "path": "/metrics", "relabelings": [
                    {"action": "replace", "targetLabel": "job", "replacement": PROXY_JOB},
                    *(_operator_style(rule) for rule in POD_LABEL_RULES),
                ]}],
            },
        },
    ]


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=120)
