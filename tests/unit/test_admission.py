"""The admission reviews, without a server: the patch, the refusals, the validator's field messages."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.control.injector.admission import ReviewError, mutate, validate
from tether.core.inject import InjectValues, merge

CHART = Path(__file__).resolve().parents[2] / "charts" / "tether-control-plane"
VALUES = InjectValues.from_values(merge(yaml.safe_load((CHART / "values.yaml").read_text()), {
    "identityTrustAnchorsPEM": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}), "linkerd", "0.1.0")


def review(obj: Mapping[str, Any], kind: str = "Pod", namespace: str = "prod", operation: str = "CREATE") -> bytes:
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": kind}, "namespace": namespace,
        "operation": operation, "object": obj}}).encode()


def pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", "annotations": annotations},
            "spec": {"containers": [{"name": "app", "image": "app"}]}}


def namespaces(annotations: dict[str, str]) -> Any:
    return lambda name: annotations


def test_injects_with_a_json_patch_and_warnings() -> None:
    out = mutate(review(pod({"linkerd.io/inject": "enabled",
                             "config.linkerd.io/trace-collector-svc-account": "collector"})),
                 VALUES, namespaces({}), "0.1.0")
    response = out.response["response"]
    assert out.result == "injected" and response["uid"] == "u-1" and response["allowed"]
    patch = json.loads(base64.b64decode(response["patch"]))
    paths = {op["path"] for op in patch}
    assert {"/spec/containers", "/spec/initContainers", "/spec/volumes", "/metadata/labels",
            "/metadata/annotations"} <= paths
    assert any("trace-collector-svc-account" in w for w in response["warnings"])


def test_namespace_decides_when_the_pod_does_not() -> None:
    assert mutate(review(pod({})), VALUES, namespaces({"linkerd.io/inject": "enabled"}), "v").result == "injected"
    assert mutate(review(pod({})), VALUES, namespaces({}), "v").result == "skipped"


def test_unreadable_namespace_refuses_so_the_failure_policy_decides() -> None:
    def broken(name: str) -> Mapping[str, str]:
        raise LookupError("GET namespace: HTTP 403")

    out = mutate(review(pod({"linkerd.io/inject": "enabled"})), VALUES, broken, "v")
    assert out.response["response"]["allowed"] is False
    assert out.response["response"]["status"] == {"code": 503, "message": "namespace prod: GET namespace: HTTP 403"}


def test_bad_annotation_is_refused_with_its_name() -> None:
    out = mutate(review(pod({"linkerd.io/inject": "enabled", "config.linkerd.io/proxy-cpu-limit": "lots"})),
                 VALUES, namespaces({}), "v")
    assert out.result == "refused"
    assert out.response["response"]["status"]["message"] == (
        "annotation config.linkerd.io/proxy-cpu-limit: 'lots' is not a quantity like 100m, 1, 64Mi")


def test_validator_gives_apply_s_field_messages() -> None:
    server = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "metadata": {"name": "web"},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 70000}}
    out = validate(review(server, kind="Server", namespace="prod"))
    assert out.result == "refused"
    message = out.response["response"]["status"]["message"]
    assert message.startswith("Server prod/web: spec.port: ") and "70000" in message
    server["spec"]["port"] = 8080
    assert validate(review(server, kind="Server")).response["response"]["allowed"] is True


def test_validator_notice_becomes_a_warning() -> None:
    policy = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "AuthorizationPolicy",
              "metadata": {"name": "a", "namespace": "prod"},
              "spec": {"targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "web"},
                       "requiredAuthenticationRefs": []}}
    response = validate(review(policy, kind="AuthorizationPolicy")).response["response"]
    assert response["allowed"] and "policy.linkerd.io/v1alpha1" in response["warnings"][0]


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"request": {}}'])
def test_not_a_review(body: bytes) -> None:
    with pytest.raises(ReviewError):
        mutate(body, VALUES, namespaces({}), "v")


# ---- any body: an answer or a ReviewError, never a crash ---------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["linkerd.io/inject", "config.linkerd.io/opaque-ports", "config.linkerd.io/proxy-uid",
                         "config.alpha.linkerd.io/proxy-enable-native-sidecar", "config.linkerd.io/skip-subnets",
                         "config.linkerd.io/proxy-cpu-limit", "x"])
_pod = st.fixed_dictionaries({
    "metadata": st.one_of(_json, st.fixed_dictionaries({
        "annotations": st.one_of(_json, st.dictionaries(_keys, st.one_of(st.text(max_size=12), _json), max_size=4)),
        "labels": _json, "ownerReferences": _json})),
    "spec": st.one_of(_json, st.fixed_dictionaries({"containers": _json, "initContainers": _json,
                                                    "volumes": _json, "hostNetwork": _json})),
})


@settings(max_examples=150, deadline=None)
@given(request=st.fixed_dictionaries({"uid": st.text(max_size=4), "kind": _json, "namespace": _json,
                                      "operation": _json, "object": st.one_of(_json, _pod)}),
       ns=st.dictionaries(_keys, st.sampled_from(["enabled", "disabled", "1", ""]), max_size=3))
def test_any_review_is_answered_or_refused_as_a_review_error(request: dict[str, Any], ns: dict[str, str]) -> None:
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).encode()
    for call in (lambda: mutate(body, VALUES, namespaces(ns), "v"), lambda: validate(body)):
        try:
            out = call()
        except ReviewError:
            continue
        assert out.response["response"]["uid"] == request["uid"]


def test_values_file_change_is_picked_up_and_a_bad_one_kept_out(tmp_path: Path) -> None:
    import os

    from tether.control.injector.server import Injector, ValuesWatcher

    path = tmp_path / "values"
    path.write_text("level: info\n")

    def load(p: str) -> InjectValues:
        level = yaml.safe_load(Path(p).read_text())["level"]
        base = yaml.safe_load((CHART / "values.yaml").read_text())
        return InjectValues.from_values(merge(base, {"identityTrustAnchorsPEM": "x", "proxy": {"logLevel": level}}),
                                        "linkerd", "v")

    injector = Injector(load(str(path)), namespaces({}), "v")
    watcher = ValuesWatcher(injector, str(path), load, interval=3600)
    assert not watcher.check()
    # A ConfigMap volume update: a new file swapped in (a new inode).
    (tmp_path / "values.new").write_text("level: debug\n")
    os.replace(tmp_path / "values.new", path)
    assert watcher.check() and injector.values.log_level == "debug"
    (tmp_path / "values.new").write_text("not: [valid\n")
    os.replace(tmp_path / "values.new", path)
    assert not watcher.check() and injector.values.log_level == "debug"


def test_found_by_fuzzing_a_pod_without_metadata_gets_a_patch_that_applies() -> None:
    bare = {"apiVersion": "v1", "kind": "Pod", "spec": {"containers": [{"name": "app", "image": "app"}]}}
    out = mutate(review(bare), VALUES, namespaces({"linkerd.io/inject": "enabled"}), "v")
    patch = json.loads(base64.b64decode(out.response["response"]["patch"]))
    assert out.result == "injected" and patch[0] == {"op": "add", "path": "/metadata", "value": {}}
    assert "metadata" not in bare  # the review's object is not changed in place


def test_found_by_fuzzing_messages_stay_on_one_line() -> None:
    server = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "metadata": {"name": "web"},
              "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 80, "odd\nfield": 1}}
    message = validate(review(server, kind="Server")).response["response"]["status"]["message"]
    assert message == "Server prod/web: spec.odd\\nfield: unknown field"
    nameless = pod({"linkerd.io/inject": "enabled"})
    nameless["spec"]["containers"][0]["name"] = {}
    out = mutate(review(nameless), VALUES, namespaces({}), "v")
    assert out.response["response"]["status"] == {"code": 400,
                                                  "message": "not a Pod: spec.containers: a container has no name"}
