"""core/inject: what each annotation does to the injected pod, field by field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.core.inject import InjectError, InjectValues, inject, merge, uninject
from tether.core.inject.pod import ANCHORS_ANNOTATION, INIT, PROXY

CHART = Path(__file__).resolve().parents[2] / "charts" / "tether-control-plane"
ANCHORS = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def values(**over: Any) -> InjectValues:
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    base = merge(base, {"identityTrustAnchorsPEM": ANCHORS})
    return InjectValues.from_values(merge(base, over), "linkerd", "0.1.0")


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "prod", "labels": {"app": "web"},
                     "annotations": {"linkerd.io/inject": "enabled", **(annotations or {})}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec},
    }


def run(p: dict[str, Any], ns: dict[str, str] | None = None, v: InjectValues | None = None) -> dict[str, Any]:
    result = inject(p, ns or {}, v or values(), created_by="test")
    assert result.injected, result.reason
    return result.pod


def container(p: dict[str, Any], name: str) -> dict[str, Any]:
    spec = p["spec"]
    found = [c for c in (*spec.get("initContainers", ()), *spec["containers"]) if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in (*spec.get("initContainers", ()), *spec["containers"])]
    return found[0]


def env(p: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(p, PROXY)["env"]}


def init_args(p: dict[str, Any]) -> dict[str, str]:
    c = container(p, INIT)
    assert c["command"] == ["tether-proxy-init"]
    args = c["args"]
    return dict(zip(args[0::2], args[1::2], strict=True))


def test_default_injection_adds_init_proxy_volumes_labels_annotations() -> None:
    p = run(pod())
    spec = p["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT]
    assert [c["name"] for c in spec["containers"]] == [PROXY, "app"]  # proxy-await: proxy first
    proxy = container(p, PROXY)
    assert proxy["image"] == "localhost/tether:0.1.0"
    assert proxy["args"] == ["proxy"]
    # The image's interpreter runs the proxy -OO with no debug ranges (issue 16: ~1 MiB of idle RSS).
    assert proxy["command"] == ["python", "-OO", "-X", "no_debug_ranges", "-m", "tether"]
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:2] == ["tether", "proxy-await"]
    assert proxy["securityContext"]["runAsUser"] == 2102
    e = env(p)
    assert e["TETHER_PROXY_INBOUND_ADDR"] == "0.0.0.0:4143"
    # The C locale: the interpreter maps no locale file (issue 16: 120 KiB of idle RSS).
    assert (e["LC_ALL"], e["PYTHONCOERCECLOCALE"]) == ("C", "0")
    assert e["TETHER_PROXY_OUTBOUND_ADDR"] == "127.0.0.1:4140"
    assert e["TETHER_PROXY_ADMIN_ADDR"] == "0.0.0.0:4191"
    assert e["TETHER_PROXY_IDENTITY_NAME"] == "$(_pod_sa).$(_pod_ns).serviceaccount.identity.linkerd.cluster.local"
    assert e["TETHER_PROXY_IDENTITY_ADDRS"] == "linkerd-identity.linkerd.svc.cluster.local:8080"
    assert e["TETHER_PROXY_DESTINATION_ADDRS"] == "linkerd-dst.linkerd.svc.cluster.local:8086"
    assert e["TETHER_PROXY_OPAQUE_PORTS"] == "25,587,3306,4444,5432,6379,9300,11211"
    token = next(v for v in spec["volumes"] if v["name"] == "linkerd-identity-token")
    sat = token["projected"]["sources"][0]["serviceAccountToken"]
    assert sat["audience"] == "identity.l5d.io" and sat["expirationSeconds"] == 86400
    assert p["metadata"]["labels"]["linkerd.io/control-plane-ns"] == "linkerd"
    assert p["metadata"]["labels"]["linkerd.io/workload-ns"] == "prod"
    assert p["metadata"]["annotations"][ANCHORS_ANNOTATION] == ANCHORS
    assert p["metadata"]["annotations"]["linkerd.io/proxy-version"] == "0.1.0"
    args = init_args(p)
    assert args["--incoming-proxy-port"] == "4143" and args["--outgoing-proxy-port"] == "4140"
    assert args["--proxy-uid"] == "2102"
    assert args["--inbound-ports-to-ignore"] == "4190,4191,4567,4568"
    assert container(p, INIT)["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]


def test_seed_004_annotations_field_by_field() -> None:
    p = run(pod({
        "config.linkerd.io/skip-inbound-ports": "8080,8443",
        "config.linkerd.io/skip-outbound-ports": "3306",
        "config.linkerd.io/opaque-ports": "3306,6379",
        "config.linkerd.io/proxy-cpu-limit": "1",
        "config.linkerd.io/proxy-cpu-request": "100m",
        "config.linkerd.io/proxy-memory-limit": "250Mi",
        "config.linkerd.io/proxy-memory-request": "20Mi",
        "config.linkerd.io/proxy-log-level": "warn,linkerd=info",
        "config.linkerd.io/proxy-outbound-connect-timeout": "5000ms",
        "config.linkerd.io/skip-subnets": "10.1.0.0/16",
    }))
    args = init_args(p)
    assert args["--inbound-ports-to-ignore"] == "4190,4191,4567,4568,8080,8443"
    assert args["--outbound-ports-to-ignore"] == "4567,4568,3306"
    assert args["--subnets-to-ignore"] == "10.1.0.0/16"
    proxy = container(p, PROXY)
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "20Mi"},
                                  "limits": {"cpu": "1", "memory": "250Mi"}}
    e = env(p)
    assert e["TETHER_PROXY_OPAQUE_PORTS"] == "3306,6379"
    assert e["TETHER_PROXY_LOG_LEVEL"] == "warn,linkerd=info"
    assert e["TETHER_PROXY_OUTBOUND_CONNECT_TIMEOUT"] == "5000ms"


def test_more_annotations() -> None:
    p = run(pod({
        "config.linkerd.io/proxy-await": "disabled",
        "config.linkerd.io/default-inbound-policy": "cluster-authenticated",
        "config.linkerd.io/proxy-uid": "3000",
        "config.linkerd.io/proxy-gid": "3001",
        "config.linkerd.io/proxy-image": "registry.example/tether",
        "config.linkerd.io/proxy-version": "9.9.9",
        "config.linkerd.io/image-pull-policy": "Always",
        "config.linkerd.io/admin-port": "5191",
        "config.linkerd.io/proxy-log-format": "json",
        "config.linkerd.io/proxy-inbound-connect-timeout": "250ms",
        "config.linkerd.io/shutdown-grace-period": "30s",
        "config.linkerd.io/proxy-admin-shutdown": "enabled",
        "config.alpha.linkerd.io/proxy-wait-before-exit-seconds": "7",
        "config.linkerd.io/proxy-ephemeral-storage-limit": "1Gi",
    }))
    proxy = container(p, PROXY)
    assert [c["name"] for c in p["spec"]["containers"]] == ["app", PROXY]  # no await: appended
    assert "postStart" not in proxy["lifecycle"]
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert proxy["image"] == "registry.example/tether:9.9.9"
    assert proxy["imagePullPolicy"] == "Always"
    assert proxy["securityContext"]["runAsUser"] == 3000 and proxy["securityContext"]["runAsGroup"] == 3001
    assert proxy["readinessProbe"]["httpGet"]["port"] == 5191
    assert proxy["resources"] == {"limits": {"ephemeral-storage": "1Gi"}}
    e = env(p)
    assert e["TETHER_PROXY_DEFAULT_INBOUND_POLICY"] == "cluster-authenticated"
    assert e["TETHER_PROXY_ADMIN_ADDR"] == "0.0.0.0:5191"
    assert e["TETHER_PROXY_LOG_FORMAT"] == "json"
    assert e["TETHER_PROXY_INBOUND_CONNECT_TIMEOUT"] == "250ms"
    assert e["TETHER_PROXY_SHUTDOWN_GRACE_PERIOD"] == "30s"
    assert e["TETHER_PROXY_ENABLE_ADMIN_SHUTDOWN"] == "true"
    assert init_args(p)["--proxy-uid"] == "3000"
    assert init_args(p)["--inbound-ports-to-ignore"].startswith("4190,5191")


def test_native_sidecar() -> None:
    p = run(pod({"config.alpha.linkerd.io/proxy-enable-native-sidecar": "true"}))
    inits = p["spec"]["initContainers"]
    assert [c["name"] for c in inits] == [INIT, PROXY]
    assert inits[1]["restartPolicy"] == "Always"
    assert inits[1]["startupProbe"]["httpGet"]["path"] == "/ready"
    assert "lifecycle" not in inits[1]
    assert [c["name"] for c in p["spec"]["containers"]] == ["app"]


def test_namespace_annotations_apply_and_pod_wins() -> None:
    p = pod()
    del p["metadata"]["annotations"]["linkerd.io/inject"]
    p["metadata"]["annotations"]["config.linkerd.io/proxy-log-level"] = "debug"
    out = run(p, {"linkerd.io/inject": "enabled", "config.linkerd.io/proxy-log-level": "error",
                  "config.linkerd.io/proxy-cpu-request": "300m"})
    assert env(out)["TETHER_PROXY_LOG_LEVEL"] == "debug"
    assert container(out, PROXY)["resources"]["requests"]["cpu"] == "300m"


def test_disabled_and_not_enabled_are_left_alone() -> None:
    v = values()
    r = inject(pod({"linkerd.io/inject": "disabled"}), {"linkerd.io/inject": "enabled"}, v, created_by="t")
    assert not r.injected and r.patch == [] and "disabled on the pod" in r.reason
    p = pod()
    del p["metadata"]["annotations"]["linkerd.io/inject"]
    r = inject(p, {}, v, created_by="t")
    assert not r.injected and "not enabled" in r.reason
    r = inject(pod(hostNetwork=True), {}, v, created_by="t")
    assert not r.injected and "hostNetwork" in r.reason


def test_idempotent() -> None:
    once = run(pod({"config.linkerd.io/skip-outbound-ports": "3306"}))
    again = inject(once, {}, values(), created_by="test")
    assert not again.injected and again.patch == [] and again.reason == "already injected"
    assert again.pod == once


def test_uninject_restores_the_pod() -> None:
    original = pod({"config.linkerd.io/opaque-ports": "5432"}, volumes=[{"name": "data", "emptyDir": {}}])
    injected = run(copy.deepcopy(original))
    restored, changed = uninject(injected)
    assert changed
    expected = copy.deepcopy(original)
    del expected["metadata"]["annotations"]["linkerd.io/inject"]
    assert restored == expected


def test_json_patch_applies_to_the_original() -> None:
    original = pod()
    r = inject(original, {}, values(), created_by="test")
    doc = copy.deepcopy(original)
    for op in r.patch:
        assert op["op"] in ("add", "remove")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        target = doc
        for part in parts[:-1]:
            target = target[part]
        if op["op"] == "add":
            target[parts[-1]] = op["value"]
        else:
            del target[parts[-1]]
    assert doc == r.pod


def test_owner_label_from_replicaset() -> None:
    p = pod()
    p["metadata"]["labels"]["pod-template-hash"] = "7c9f8"
    p["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": "web-7c9f8", "controller": True,
                                         "apiVersion": "apps/v1", "uid": "x"}]
    assert run(p)["metadata"]["labels"]["linkerd.io/proxy-deployment"] == "web"


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("config.linkerd.io/skip-outbound-ports", "127.0.0.1", "IP ranges go in config.linkerd.io/skip-subnets"),
    ("config.linkerd.io/opaque-ports", "70000", "is not a port"),
    ("config.linkerd.io/proxy-cpu-limit", "lots", "is not a quantity"),
    ("config.linkerd.io/proxy-outbound-connect-timeout", "5 seconds", "is not a duration"),
    ("config.linkerd.io/default-inbound-policy", "allow", "must be one of"),
    ("config.linkerd.io/skip-subnets", "10.0.0.0/33", "is not a network"),
    ("linkerd.io/inject", "yes", "must be enabled, disabled or ingress"),
])
def test_bad_values_are_refused_naming_the_annotation(key: str, value: str, fragment: str) -> None:
    with pytest.raises(InjectError) as e:
        inject(pod({key: value}), {}, values(), created_by="t")
    assert str(e.value).startswith(f"annotation {key}: ")
    assert fragment in str(e.value)


def test_not_honoured_annotations_say_so() -> None:
    r = inject(pod({"config.linkerd.io/trace-collector": "linkerd-collector.linkerd-jaeger:55678",
                    "config.linkerd.io/trace-collector-svc-account": "linkerd-collector",
                    "config.linkerd.io/access-log": "json",
                    "config.linkerd.io/made-up": "1"}), {}, values(), created_by="t")
    assert r.injected
    text = "\n".join(r.notices)
    # The collector and the access log reach the proxy; the collector's identity is not checked.
    assert "trace-collector:" not in text and "access-log" not in text
    assert "trace-collector-svc-account: accepted but not honoured: the collector's identity" in text
    assert "config.alpha.linkerd.io/trace-collector-service-account" in text
    assert "config.linkerd.io/made-up: not a proxy setting tether knows" in text
    patched = json.dumps(r.patch)
    assert '"TETHER_PROXY_TRACE_COLLECTOR", "value": "linkerd-collector.linkerd-jaeger:55678"' in patched
    assert '"TETHER_PROXY_ACCESS_LOG", "value": "json"' in patched


def test_values_change_the_sidecar() -> None:
    v = values(proxy={"logLevel": "info", "resources": {"cpu": {"request": "100m"}}, "nativeSidecar": True},
               proxyInit={"runAsRoot": True, "resources": {"cpu": {"limit": "50m"}}})
    p = run(pod(), v=v)
    assert env(p)["TETHER_PROXY_LOG_LEVEL"] == "info"
    assert container(p, PROXY)["resources"] == {"requests": {"cpu": "100m"}}
    assert container(p, PROXY)["restartPolicy"] == "Always"
    assert container(p, INIT)["securityContext"]["runAsUser"] == 0
    assert container(p, INIT)["resources"] == {"limits": {"cpu": "50m"}}


def test_compound_durations_reach_the_proxy_in_its_form() -> None:
    p = run(pod({"config.linkerd.io/proxy-outbound-connect-timeout": "1m30s"}))
    assert env(p)["TETHER_PROXY_OUTBOUND_CONNECT_TIMEOUT"] == "90000ms"


def test_linkerd_trust_anchors_variable_for_check() -> None:
    assert env(run(pod()))["LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"] == ANCHORS


def test_the_proxy_is_told_the_control_plane_names_to_verify() -> None:
    """The proxy sends its token only to an identity service proving its name, and speaks mutual TLS to
    destination and policy (one process, one name); Linkerd's variables carry the same names."""
    e = env(run(pod(), v=values(identityTrustDomain="example.org")))
    identity = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.example.org"
    destination = "linkerd-destination.linkerd.serviceaccount.identity.linkerd.example.org"
    for prefix in ("TETHER_PROXY", "LINKERD2_PROXY"):
        assert e[f"{prefix}_IDENTITY_SVC_NAME"] == identity
        assert e[f"{prefix}_DESTINATION_SVC_NAME"] == e[f"{prefix}_POLICY_SVC_NAME"] == destination
    # The proxy's own configuration reads them (its identity expanded as the kubelet would).
    from tether.proxy.config import ProxyConfig

    cfg = ProxyConfig.from_env({**e, "TETHER_PROXY_IDENTITY_NAME": "web.prod.serviceaccount.identity.linkerd."
                                                                   "example.org"})
    assert (cfg.identity_svc_name, cfg.destination_svc_name, cfg.policy_svc_name) == (
        identity, destination, destination)
