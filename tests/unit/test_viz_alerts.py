"""`tether viz alerts`: every rule fires from synthetic series under `promtool test rules`, and only
after its `for` has passed; the PrometheusRule's shape."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMTOOL = shutil.which("promtool")
CP = 'job="linkerd-controller",namespace="linkerd"'
PROXY = 'job="linkerd-proxy",namespace="production",deployment="api",pod="api-0"'


def _case(name: str, series: list[tuple[str, str]], at: str, alert: str, labels: list[dict[str, str]],
          before: str | None = None, annotations: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A promtool test: the alert fires at ``at`` with ``labels`` (and not yet at ``before``)."""
    exp = []
    for lb in labels:
        e: dict[str, Any] = {"exp_labels": lb}
        if annotations is not None:
            e["exp_annotations"] = annotations
        exp.append(e)
    evals = [{"eval_time": at, "alertname": alert, "exp_alerts": exp}]
    if before is not None:
        evals.insert(0, {"eval_time": before, "alertname": alert, "exp_alerts": []})
    return [{"name": name, "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
             "alert_rule_test": evals}]


CASES: dict[str, list[dict[str, Any]]] = {
    "LinkerdServiceLowSuccessRate": _case(
        "75% success for a deployment",
        [('response_total{direction="inbound",classification="success",namespace="production",deployment="api"}',
          "0+75x20"),
         ('response_total{direction="inbound",classification="failure",namespace="production",deployment="api"}',
          "0+25x20")],
        "10m", "LinkerdServiceLowSuccessRate",
        [{"severity": "warning", "namespace": "production", "deployment": "api"}], before="3m",
        annotations={"summary": "Low success rate for api", "description": "Success rate is 75%"}),
    "LinkerdServiceHighLatency": _case(
        "every response between 1 and 2 seconds",
        [(f'response_latency_ms_bucket{{direction="inbound",namespace="production",deployment="api",le="{le}"}}', v)
         for le, v in (("1000", "0+0x30"), ("2000", "0+10x30"), ("+Inf", "0+10x30"))],
        "20m", "LinkerdServiceHighLatency",
        [{"severity": "warning", "namespace": "production", "deployment": "api"}], before="8m"),
    "LinkerdControlPlaneDown": _case(
        "destination stops answering",
        [(f'up{{{CP},component="destination",pod="destination-0"}}', "1 1 0 0 0 0 0 0"),
         (f'up{{{CP},component="identity",pod="identity-0"}}', "1x8")],
        "5m", "LinkerdControlPlaneDown",
        [{"severity": "critical", "job": "linkerd-controller", "namespace": "linkerd", "component": "destination",
          "pod": "destination-0"}], before="2m"),
    "LinkerdCertificateExpiringSoon": _case(
        "the issuer expires in a day",
        [('linkerd_identity_cert_expiration_timestamp_seconds{job="linkerd-controller",component="identity"}',
          "86400x150")],
        "2h", "LinkerdCertificateExpiringSoon",
        [{"severity": "warning", "job": "linkerd-controller", "component": "identity"}], before="30m"),
    "TetherControlPlaneComponentDown": _case(
        "both identity replicas down, one destination of two up",
        [(f'up{{{CP},component="identity",pod="identity-0"}}', "0x10"),
         (f'up{{{CP},component="identity",pod="identity-1"}}', "0x10"),
         (f'up{{{CP},component="destination",pod="destination-0"}}', "0x10"),
         (f'up{{{CP},component="destination",pod="destination-1"}}', "1x10")],
        "5m", "TetherControlPlaneComponentDown",
        [{"severity": "critical", "namespace": "linkerd", "component": "identity"}]),
    "TetherControlPlaneAbsent": _case(
        "no destination controller to scrape",
        [(f'up{{{CP},component="identity",pod="identity-0"}}', "1x20")],
        "10m", "TetherControlPlaneAbsent",
        [{"severity": "critical", "job": "linkerd-controller", "namespace": "linkerd", "component": "destination"}],
        before="3m"),
    "TetherProxyNotReady": _case(
        "one proxy not answering, another with an expired certificate",
        [(f"up{{{PROXY}}}", "0x10"),
         ('up{job="linkerd-proxy",namespace="production",deployment="api",pod="api-1"}', "1x10"),
         ('control_identity_cert_expiration_timestamp_seconds{job="linkerd-proxy",namespace="production",'
          'deployment="api",pod="api-1"}', "60x10"),
         ('up{job="linkerd-proxy",namespace="production",deployment="api",pod="api-2"}', "1x10"),
         ('control_identity_cert_expiration_timestamp_seconds{job="linkerd-proxy",namespace="production",'
          'deployment="api",pod="api-2"}', "86400x10")],
        "5m", "TetherProxyNotReady",
        [{"severity": "warning", "job": "linkerd-proxy", "namespace": "production", "deployment": "api",
          "pod": "api-0"},
         {"severity": "warning", "job": "linkerd-proxy", "namespace": "production", "deployment": "api",
          "pod": "api-1"}],
        before="1m"),
    "TetherProxyCertificateExpiringSoon": _case(
        "a workload certificate half an hour from expiry",
        [(f"control_identity_cert_expiration_timestamp_seconds{{{PROXY}}}", "1800x20")],
        "10m", "TetherProxyCertificateExpiringSoon",
        [{"severity": "warning", "job": "linkerd-proxy", "namespace": "production", "deployment": "api",
          "pod": "api-0"}], before="3m"),
    "TetherProxyCertificateRefreshFailing": _case(
        "renewals failing",
        [(f'control_identity_cert_refreshes_total{{{PROXY},result="error"}}', "0+1x30"),
         (f'control_identity_cert_refreshes_total{{{PROXY},result="ok"}}', "1x30")],
        "20m", "TetherProxyCertificateRefreshFailing",
        [{"severity": "warning", "job": "linkerd-proxy", "namespace": "production", "deployment": "api",
          "pod": "api-0", "result": "error"}], before="5m"),
    "TetherIssuerCertificateExpiringSoon": _case(
        "the issuer has a day left",
        [(f'issuer_cert_ttl_seconds{{{CP},component="identity",pod="identity-0"}}', "86400x150")],
        "2h", "TetherIssuerCertificateExpiringSoon",
        [{"severity": "warning", "job": "linkerd-controller", "namespace": "linkerd", "component": "identity",
          "pod": "identity-0"}], before="30m"),
    "TetherTrustAnchorExpiringSoon": _case(
        "the trust anchor has ten days left",
        [(f'identity_trust_anchor_expiration_timestamp_seconds{{{CP},component="identity",pod="identity-0",'
          'subject="CN=root.linkerd.cluster.local"}', "864000x150")],
        "2h", "TetherTrustAnchorExpiringSoon",
        [{"severity": "warning", "job": "linkerd-controller", "namespace": "linkerd", "component": "identity",
          "pod": "identity-0", "subject": "CN=root.linkerd.cluster.local"}], before="30m"),
}


def _alerts(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tether", "viz", "alerts", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_prometheus_rule_has_the_seeds_rules_and_tethers() -> None:
    doc = yaml.safe_load(_alerts("--workload-namespace", "production"))
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"] == {"name": "linkerd-alerts", "namespace": "linkerd"}
    groups = {g["name"]: g for g in doc["spec"]["groups"]}
    seeds = [r["alert"] for r in groups["linkerd.rules"]["rules"]]
    assert seeds == ["LinkerdServiceLowSuccessRate", "LinkerdServiceHighLatency", "LinkerdControlPlaneDown",
                     "LinkerdCertificateExpiringSoon"]
    rules = {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == set(CASES)  # every rule has a firing test below
    assert 'namespace="production"' in rules["LinkerdServiceLowSuccessRate"]["expr"]
    assert rules["LinkerdControlPlaneDown"]["expr"] == 'up{namespace="linkerd",job="linkerd-controller"} == 0'
    other = yaml.safe_load(_alerts("-L", "tether"))
    assert 'namespace="tether"' in {r["alert"]: r for g in other["spec"]["groups"] for r in g["rules"]}[
        "LinkerdControlPlaneDown"]["expr"]


def test_a_bad_namespace_is_refused_in_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "tether", "viz", "alerts", "-L", "Not_A_Label"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "-L" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's prometheus package)")
def test_promtool_fires_every_alert_from_synthetic_series(tmp_path: Path) -> None:
    rules = yaml.safe_load(_alerts("--rules-only", "--workload-namespace", "production"))
    for g in rules["groups"]:
        for r in g["rules"]:
            # Annotations are text for people; one rule keeps them to prove the templates render.
            if r["alert"] != "LinkerdServiceLowSuccessRate":
                r.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    check = subprocess.run([str(PROMTOOL), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m",
             "tests": [t for cases in CASES.values() for t in cases]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    r = subprocess.run([str(PROMTOOL), "test", "rules", "tests.yml"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
