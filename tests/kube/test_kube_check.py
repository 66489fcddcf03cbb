"""`tether check --platform kubernetes` against the real API server: every category passes on a good
install and fails, with its hint, on a broken one.

The "install" is made here the way the chart lays it out (Linkerd's names): the control plane's
Deployments (three replicas each, pods with a linkerd-proxy container, run by kwok), linkerd-config,
the issuer Secret and trust-roots ConfigMap, the webhook configurations and their TLS Secrets, the
CRDs. The control plane's processes themselves are tested in test_kube_controlplane.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tether import __version__
from tether.core.identity.authority import create_anchor, create_issuer
from tether.platform.kubernetes.store import CUSTOM_KINDS
from tether.testing.kubecluster import KubeCluster, wait_until
from tether.testing.kubeplatform import Issuers, apply, apply_crds, kubectl_apply, pem_key

pytestmark = [pytest.mark.kube, pytest.mark.timeout(300)]

IMAGE = "registry.invalid/tether/test:1.0"
PEM = serialization.Encoding.PEM
WEBHOOKS = (
    ("linkerd-proxy-injector-k8s-tls", "mutatingwebhookconfigurations", "linkerd-proxy-injector-webhook-config"),
    ("linkerd-policy-validator-k8s-tls", "validatingwebhookconfigurations", "linkerd-policy-validator-webhook-config"),
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def deployment(name: str, component: str, replicas: int, anchors_pem: str) -> dict[str, Any]:
    labels = {"linkerd.io/control-plane-component": component, "app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {"linkerd.io/proxy-version": __version__}},
                "spec": {"containers": [
                    {"name": "linkerd-proxy", "image": IMAGE,
                     "env": [{"name": "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "value": anchors_pem}]},
                    {"name": component, "image": IMAGE},
                ]},
            },
        },
    }


def webhook_config(kind: str, name: str, ca_pem: bytes, ns: str) -> dict[str, Any]:
    hook: dict[str, Any] = {
        "name": f"{name}.linkerd.io",
        "clientConfig": {"service": {"name": name, "namespace": ns, "path": "/"}, "caBundle": b64(ca_pem)},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        # Never called by this test: no object carries the label.
        "objectSelector": {"matchLabels": {"tether-check-test": "never"}},
        "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore",
    }
    return {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration" if kind.startswith("mutating") else "ValidatingWebhookConfiguration",
            "metadata": {"name": name}, "webhooks": [hook]}


@dataclass
class Install:
    cp: str
    app: str
    ca: Issuers


def run_check(cluster: KubeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", "check", "--platform", "kubernetes", "--kubeconfig", str(cluster.kubeconfig),
         *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def category(out: str, name: str) -> str:
    """The lines of one category in check's table output."""
    lines = ("\n" + out).split(f"\n{name}\n{'-' * len(name)}\n", 1)[1]
    return lines.split("\n\n", 1)[0]


def component_pods(cluster: KubeCluster, ns: str, component: str) -> list[Any]:
    selector = f"linkerd.io/control-plane-component={component}"
    return list(cluster.api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector=selector)["items"])


@pytest.fixture
def install(kube_cluster: KubeCluster) -> Iterator[Install]:
    apply_crds(kube_cluster)
    with kube_cluster.namespaces("l5d", "mesh") as (cp, app):
        ca = Issuers(cp)
        cert, key = ca.issuer()
        anchors_pem = ca.roots()["data"]["ca-bundle.crt"]
        docs: list[dict[str, Any]] = [
            ca.roots(), ca.secret(cert, key),
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "linkerd-config", "namespace": cp},
             "data": {"version": __version__, "values": "controllerReplicas: 3\nhighAvailability: true\n"
                                                         "controlPlaneTLS: {acceptPlaintext: false}\n"}},
        ]
        now = dt.datetime.now(dt.UTC)
        for secret, kind, name in WEBHOOKS:
            wca, wca_key = create_anchor(f"webhook.{name}", now)
            wcert, wkey = create_issuer(f"{name}.{cp}.svc", wca, wca_key, now)
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                         "metadata": {"name": secret, "namespace": cp},
                         "data": {"tls.crt": b64(wcert.public_bytes(PEM)), "tls.key": b64(pem_key(wkey))}})
            docs.append(webhook_config(kind, name, wca.public_bytes(PEM), cp))
        apply(kube_cluster, *docs)
        kubectl_apply(kube_cluster, cp, *(deployment(f"linkerd-{c}", c, 3, anchors_pem)
                                          for c in ("identity", "destination", "proxy-injector")))
        kubectl_apply(kube_cluster, app, deployment("web", "none", 1, anchors_pem) | {
            "metadata": {"name": "web", "labels": {"app": "web"}}})
        kube_cluster.kubectl("label", "--overwrite", "namespace", "kube-system",
                             "config.linkerd.io/admission-webhooks=disabled")

        def all_ready() -> bool:
            for ns in (cp, app):
                deps = kube_cluster.api.get(f"/apis/apps/v1/namespaces/{ns}/deployments")["items"]
                if not deps or any((d.get("status") or {}).get("availableReplicas") != d["spec"]["replicas"]
                                   for d in deps):
                    return False
            return True

        wait_until(all_ready, timeout=120, what="the control plane's and the app's pods available")
        yield Install(cp, app, ca)
        for _, kind, name in WEBHOOKS:
            kube_cluster.kubectl("delete", kind, name, "--ignore-not-found")


def test_every_category_passes_on_a_good_install(kube_cluster: KubeCluster, install: Install) -> None:
    r = run_check(kube_cluster, "-L", install.cp, "--proxy", "-n", install.app)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("kubernetes-api", "kubernetes-version", "linkerd-existence", "linkerd-config", "linkerd-identity",
                 "linkerd-webhooks-and-apisvc-tls", "linkerd-control-plane-proxy", "control-plane-tls",
                 "linkerd-ha-checks",
                 "linkerd-data-plane", "linkerd-identity-data-plane"):
        lines = category(r.stdout, name)
        assert lines and all(line.startswith("\u221a ") for line in lines.splitlines()), (name, lines)
    assert r.stdout.rstrip().endswith("Status check results are \u221a")

    j = run_check(kube_cluster, "-L", install.cp, "-o", "json")
    doc = json.loads(j.stdout)
    assert j.returncode == 0 and doc["success"] is True
    names = [c["categoryName"] for c in doc["categories"]]
    assert names[:3] == ["kubernetes-api", "kubernetes-version", "linkerd-existence"]
    assert "linkerd-data-plane" not in names  # only with --proxy


def test_pre_checks_the_cluster_before_install(kube_cluster: KubeCluster, install: Install) -> None:
    fresh = run_check(kube_cluster, "--pre", "-L", f"unused-{uuid.uuid4().hex[:6]}")
    assert fresh.returncode == 0, fresh.stdout
    setup = category(fresh.stdout, "pre-kubernetes-setup")
    assert "\u221a can create non-namespaced resources" in setup and "\u221a no clock skew detected" in setup
    taken = run_check(kube_cluster, "--pre", "-L", install.cp)
    assert taken.returncode == 1
    assert f'\u00d7 control plane namespace does not already exist\n    The "{install.cp}" namespace already exists\n' \
           "    see https://linkerd.io/2/checks/#pre-ns for hints" in taken.stdout


def test_expired_issuer_fails_linkerd_identity_with_its_hint(kube_cluster: KubeCluster, install: Install) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    cert, key = create_issuer(f"identity.{install.cp}.cluster.local", install.ca.anchor, install.ca.anchor_key,
                              long_ago, lifetime=dt.timedelta(days=30))
    apply(kube_cluster, install.ca.secret(cert, key))
    r = run_check(kube_cluster, "-L", install.cp)
    assert r.returncode == 1
    lines = category(r.stdout, "linkerd-identity")
    assert "\u00d7 issuer cert is within its validity period" in lines
    assert "see https://linkerd.io/2/checks/#l5d-identity-issuer-cert-is-time-valid for hints" in lines


def test_issuer_named_for_another_control_plane_is_a_warning(kube_cluster: KubeCluster, install: Install) -> None:
    cert, key = create_issuer("identity.linkerd.cluster.local", install.ca.anchor, install.ca.anchor_key,
                              dt.datetime.now(dt.UTC))
    apply(kube_cluster, install.ca.secret(cert, key))
    r = run_check(kube_cluster, "-L", install.cp)
    assert r.returncode == 0  # a warning
    lines = category(r.stdout, "linkerd-identity")
    expected = f"identity.{install.cp}.cluster.local"
    assert ("\u203c issuer cert is named for the control plane's namespace and trust domain\n"
            f"    the issuer is named identity.linkerd.cluster.local, expected {expected}") in lines


def test_missing_crd_fails_linkerd_config(kube_cluster: KubeCluster, install: Install) -> None:
    servers = next(ck for ck in CUSTOM_KINDS if ck.plural == "servers")
    kube_cluster.delete("crd", str(servers))
    try:
        r = run_check(kube_cluster, "-L", install.cp)
        assert r.returncode == 1
        lines = category(r.stdout, "linkerd-config")
        assert "\u00d7 control plane CustomResourceDefinitions exist" in lines
        assert "missing CustomResourceDefinitions: servers.policy.linkerd.io" in lines
        assert "see https://linkerd.io/2/checks/#l5d-existence-crd for hints" in lines
    finally:
        apply_crds(kube_cluster, [servers])


def test_injector_down_fails_linkerd_existence(kube_cluster: KubeCluster, install: Install) -> None:
    kube_cluster.kubectl("scale", "-n", install.cp, "deployment/linkerd-proxy-injector", "--replicas=0")
    wait_until(lambda: not component_pods(kube_cluster, install.cp, "proxy-injector"), timeout=60,
               what="the injector's pods gone")
    # The replica set's status reaches 0 available a moment after its pods are gone (the
    # controller-manager's next sync); until then the check reports the stale count as it reads it.
    down = "linkerd-proxy-injector: 0 of 0 replicas available"

    def checked() -> subprocess.CompletedProcess[str] | None:
        out = run_check(kube_cluster, "-L", install.cp)
        return out if down in out.stdout else None

    r = wait_until(checked, timeout=60, what="check to read the injector's replica set at 0 of 0")
    assert r.returncode == 1
    lines = category(r.stdout, "linkerd-existence")
    assert f"\u00d7 control plane replica sets are ready\n    {down}" in lines
    assert "no running pod of the proxy-injector component is ready" in r.stdout
    assert r.stdout.rstrip().endswith("Status check results are \u00d7")  # fatal: the run stops there


def test_broken_webhook_ca_ha_and_data_plane_anchors_fail_their_categories(
    kube_cluster: KubeCluster, install: Install
) -> None:
    other, _ = create_anchor("someone-else", dt.datetime.now(dt.UTC))
    apply(kube_cluster, webhook_config("validatingwebhookconfigurations", "linkerd-policy-validator-webhook-config",
                                       other.public_bytes(PEM), install.cp))
    kube_cluster.kubectl("scale", "-n", install.cp, "deployment/linkerd-destination", "--replicas=1")
    # A meshed pod started with other trust anchors (before a rotation, say).
    kubectl_apply(kube_cluster, install.app, deployment("old", "none", 1, other.public_bytes(PEM).decode()) | {
        "metadata": {"name": "old", "labels": {"app": "old"}}})
    wait_until(lambda: len(component_pods(kube_cluster, install.cp, "destination")) == 1, timeout=60,
               what="one destination pod")
    wait_until(lambda: (kube_cluster.api.get(f"/apis/apps/v1/namespaces/{install.app}/deployments/old")
                        .get("status") or {}).get("availableReplicas") == 1, timeout=60, what="the old pod")
    r = run_check(kube_cluster, "-L", install.cp, "--proxy", "-n", install.app)
    assert r.returncode == 1
    tls = category(r.stdout, "linkerd-webhooks-and-apisvc-tls")
    assert "\u00d7 policy-validator webhook has valid cert" in tls and "caBundle does not sign" in tls
    assert "\u221a proxy-injector webhook has valid cert" in tls
    ha = category(r.stdout, "linkerd-ha-checks")
    assert "\u203c multiple replicas of control plane pods\n    not enough replicas available for destination" in ha
    dp = category(r.stdout, "linkerd-identity-data-plane")
    assert "\u00d7 data plane proxies certificate match CA" in dp and "/old-" in dp


def _accept_plaintext(cluster: KubeCluster, ns: str, on: bool) -> None:
    values = f"controllerReplicas: 3\nhighAvailability: true\ncontrolPlaneTLS: {{acceptPlaintext: {str(on).lower()}}}\n"
    cluster.kubectl("patch", "configmap", "linkerd-config", "-n", ns, "--type", "merge",
                    "-p", json.dumps({"data": {"values": values}}))


def test_plaintext_is_judged_by_the_proxies_that_need_it(kube_cluster: KubeCluster, install: Install) -> None:
    """controlPlaneTLS.acceptPlaintext on with no proxy of a release before control-plane TLS: a warning
    with the command that turns it off; with such a pod: passes; off while it still runs: fails, naming it."""
    _accept_plaintext(kube_cluster, install.cp, True)
    r = run_check(kube_cluster, "-L", install.cp)
    assert r.returncode == 0, r.stdout + r.stderr  # a warning
    lines = category(r.stdout, "control-plane-tls")
    assert "\u221a every meshed proxy can reach the control plane" in lines
    assert ("\u203c control plane accepts plaintext only while proxies need it\n"
            "    controlPlaneTLS.acceptPlaintext is true, and no meshed pod runs a proxy that needs it") in lines
    assert "tether upgrade --set controlPlaneTLS.acceptPlaintext=false | kubectl apply -f -" in lines

    # A pod injected by 0.1.0, not restarted since the upgrade.
    old = deployment("old", "none", 1, install.ca.roots()["data"]["ca-bundle.crt"])
    old["metadata"] = {"name": "old", "labels": {"app": "old"}}
    old["spec"]["template"]["metadata"]["annotations"]["linkerd.io/proxy-version"] = "0.1.0"
    # What the injector labels every pod it meshes with: its control plane (check reads no other).
    old["spec"]["template"]["metadata"]["labels"]["linkerd.io/control-plane-ns"] = install.cp
    kubectl_apply(kube_cluster, install.app, old)
    wait_until(lambda: any(p["metadata"]["name"].startswith("old-") for p in kube_cluster.api.get(
        f"/api/v1/namespaces/{install.app}/pods")["items"]), timeout=60, what="the 0.1.0 pod")
    r = run_check(kube_cluster, "-L", install.cp)
    assert r.returncode == 0, r.stdout
    assert all(line.startswith("\u221a ") for line in category(r.stdout, "control-plane-tls").splitlines())

    _accept_plaintext(kube_cluster, install.cp, False)
    r = run_check(kube_cluster, "-L", install.cp, "-o", "json")
    assert r.returncode == 1, r.stdout
    checks = next(c["checks"] for c in json.loads(r.stdout)["categories"] if c["categoryName"] == "control-plane-tls")
    failed = {c["description"]: c for c in checks}["every meshed proxy can reach the control plane"]
    assert failed["result"] == "error"
    assert "1 meshed pod runs a proxy from before 0.2.0" in failed["error"]
    assert f"{install.app}/old-" in failed["error"] and "(0.1.0)" in failed["error"]
    assert "controlPlaneTLS.acceptPlaintext=true" in failed["error"]

    # A control plane from before control-plane TLS serves plaintext only: this CLI's proxies cannot use it.
    cm = kube_cluster.api.get(f"/api/v1/namespaces/{install.cp}/configmaps/linkerd-config")
    kube_cluster.kubectl("patch", "configmap", "linkerd-config", "-n", install.cp, "--type", "merge",
                         "-p", json.dumps({"data": {"version": "0.1.0"}}))
    try:
        r = run_check(kube_cluster, "-L", install.cp)
        assert r.returncode == 1, r.stdout
        lines = category(r.stdout, "control-plane-tls")
        assert ("\u00d7 every meshed proxy can reach the control plane\n    the control plane runs 0.1.0, from "
                "before control-plane TLS") in lines
    finally:
        kube_cluster.kubectl("patch", "configmap", "linkerd-config", "-n", install.cp, "--type", "merge",
                             "-p", json.dumps({"data": {"version": cm["data"]["version"]}}))


def test_context_is_chosen_like_kubectl(kube_cluster: KubeCluster) -> None:
    import yaml

    current = yaml.safe_load(kube_cluster.kubeconfig.read_text())["current-context"]
    ok = run_check(kube_cluster, "--pre", "--context", current, "-L", f"unused-{uuid.uuid4().hex[:6]}")
    assert ok.returncode == 0, ok.stdout
    bad = run_check(kube_cluster, "--pre", "--context", "elsewhere")
    assert bad.returncode == 1
    expected = f"kubeconfig {kube_cluster.kubeconfig}: Context 'elsewhere' not found"
    assert f"\u00d7 can initialize the client\n    {expected}" in bad.stdout
