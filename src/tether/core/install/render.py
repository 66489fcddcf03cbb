"""The control plane's manifests from its values: what charts/tether-control-plane renders with Helm.

Pure: checked values (defaults merged) in, a list of Kubernetes objects out. tests/kube/test_charts.py
renders the chart with `helm template` for the same values and compares object by object, so `tether
install` and `helm install` cannot drift. The proxy of the control-plane pods is core/inject's.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from tether.core.identity.names import IdentityNameError, check_trust_domain
from tether.core.inject import annotations as ann
from tether.core.inject.pod import (
    CONTROL_PLANE_NS_LABEL,
    TOKEN_DIR,
    TOKEN_VOLUME,
    init_container,
    pod_annotations_added,
    proxy_container,
    volumes,
)
from tether.core.inject.values import (
    DESTINATION_SERVICE_ACCOUNT,
    IDENTITY_SERVICE_ACCOUNT,
    InjectValues,
    Resources,
)

COMPONENT_LABEL = "linkerd.io/control-plane-component"
ISSUER_SECRET = "linkerd-identity-issuer"
TRUST_ROOTS = "linkerd-identity-trust-roots"
INJECTOR_TLS = "linkerd-proxy-injector-k8s-tls"
MUTATING = "linkerd-proxy-injector-webhook-config"
VALIDATING = "linkerd-policy-validator-webhook-config"
# API groups whose objects the validating webhook checks (the CRDs of tether-crds).
VALIDATED = {
    "linkerd.io": ["serviceprofiles"],
    "policy.linkerd.io": ["servers", "serverauthorizations", "authorizationpolicies", "meshtlsauthentications",
                          "networkauthentications", "httproutes", "httplocalratelimitpolicies", "egressnetworks"],
    "split.smi-spec.io": ["trafficsplits"],
    "workload.linkerd.io": ["externalworkloads"],
}


# The trust anchors as the identity service keeps them (the ConfigMap, followed when it changes), for
# the destination service's own certificate: Linkerd's volume name and path for the identity's.
TRUST_ROOTS_VOLUME = "trust-roots"
TRUST_ROOTS_DIR = "/var/run/linkerd/identity/trust-roots"
# The destination's plaintext gRPC for operators (`tether diagnostics` through `kubectl port-forward
# deploy/linkerd-destination 8086:8087`): on the pod's loopback, out of the cluster's reach.
OPERATOR_PLAINTEXT_ADDR = "127.0.0.1:8087"

# The controllers terminate their own TLS (tether.control.tlsfront), so their pods' proxies must not
# take those connections: the pod's own proxy shares the service's identity and would terminate TLS
# meant for the controller. The destination's Certify call must not wait on its own proxy either
# (that proxy would ask this very destination service where the identity service is).
CONTROLLER_PROXY = {
    "linkerd-identity": ann.ProxyOverrides(skip_inbound_ports=("8080",)),
    "linkerd-destination": ann.ProxyOverrides(skip_inbound_ports=("8086",), skip_outbound_ports=("8080",)),
    "linkerd-proxy-injector": ann.ProxyOverrides(),
}


class RenderError(ValueError):
    """The values cannot make a control plane (a required value is missing); names the value."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _controller_resources(values: Mapping[str, Any], key: str) -> dict[str, Any]:
    own = values.get(key) or {}
    chosen = own if own else (values.get("controllerResources") or {})
    return Resources.from_values({"r": chosen}, "r").to_k8s()


def _labels(ns: str, component: str) -> dict[str, str]:
    return {COMPONENT_LABEL: component, CONTROL_PLANE_NS_LABEL: ns}


def _controller_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 2103,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _deployment(values: Mapping[str, Any], v: InjectValues, ns: str, name: str, component: str,
                container: dict[str, Any], extra_volumes: list[dict[str, Any]], version: str) -> dict[str, Any]:
    labels = _labels(ns, component)
    pod_labels = {**labels, **(values.get("podLabels") or {})}
    annotations = {**(values.get("podAnnotations") or {}), **pod_annotations_added(v, f"tether/helm {version}")}
    native = v.native_sidecar
    proxy = proxy_container(v, ann.ProxyOverrides(), native)
    init = [init_container(v, CONTROLLER_PROXY[name])]
    containers = [container]
    if native:
        init.append(proxy)
    else:
        containers.insert(0, proxy)
    spec: dict[str, Any] = {
        "serviceAccountName": name,
        "automountServiceAccountToken": True,
        "nodeSelector": values.get("nodeSelector") or {},
        "initContainers": init,
        "containers": containers,
        "volumes": [*extra_volumes, *volumes()],
    }
    if values.get("tolerations"):
        spec["tolerations"] = values["tolerations"]
    if values.get("priorityClassName"):
        spec["priorityClassName"] = values["priorityClassName"]
    if values.get("imagePullSecrets"):
        spec["imagePullSecrets"] = values["imagePullSecrets"]
    if values.get("enablePodAntiAffinity"):
        selector = {"matchLabels": {COMPONENT_LABEL: component}}
        spec["affinity"] = {"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": selector, "topologyKey": "kubernetes.io/hostname"}],
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"labelSelector": selector,
                                                    "topologyKey": "topology.kubernetes.io/zone"}}],
        }}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": values["controllerReplicas"],
            "revisionHistoryLimit": 10,
            "selector": {"matchLabels": labels},
            "strategy": values["deploymentStrategy"],
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": spec},
        },
    }


def _container(values: Mapping[str, Any], name: str, args: list[str], ports: list[dict[str, Any]],
               admin: int, resources_key: str, mounts: list[dict[str, Any]], version: str) -> dict[str, Any]:
    tag = values.get("controllerImageVersion") or version
    c: dict[str, Any] = {
        "name": name,
        "image": f"{values['controllerImage']}:{tag}",
        "imagePullPolicy": values["imagePullPolicy"],
        "args": args,
        "ports": ports,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": admin}, "failureThreshold": 7},
        "livenessProbe": {"httpGet": {"path": "/ping", "port": admin}, "initialDelaySeconds": 10},
        "resources": _controller_resources(values, resources_key),
        "securityContext": _controller_security(),
    }
    if mounts:
        c["volumeMounts"] = mounts
    return c


def _service(ns: str, name: str, component: str, port: int, target: int, port_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": _labels(ns, component)},
        "spec": {
            "type": "ClusterIP",
            "selector": {COMPONENT_LABEL: component},
            "ports": [{"name": port_name, "port": port, "targetPort": target}],
        },
    }


def _pdb(ns: str, name: str, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": ns, "labels": _labels(ns, component)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {COMPONENT_LABEL: component}}},
    }


def _rbac(ns: str, component: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    name = f"linkerd-{ns}-{component}"
    labels = _labels(ns, component)
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name, "labels": labels}, "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": f"linkerd-{component}", "namespace": ns}]},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": f"linkerd-{component}", "namespace": ns, "labels": labels}},
    ]


WATCH = ["get", "list", "watch"]


def public_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values stored in the linkerd-config ConfigMap: every key but the private keys."""
    out = {k: v for k, v in values.items()}
    identity = dict(out.get("identity") or {})
    issuer = dict(identity.get("issuer") or {})
    issuer.pop("tls", None)
    identity["issuer"] = issuer
    out["identity"] = identity
    injector = dict(out.get("proxyInjector") or {})
    injector.pop("keyPEM", None)
    injector.pop("crtPEM", None)
    out["proxyInjector"] = injector
    return out


def accept_plaintext(values: Mapping[str, Any]) -> bool:
    """controlPlaneTLS.acceptPlaintext; a release's values from before control-plane TLS lack it: true,
    so an upgrade keeps serving the proxies it has not yet replaced (the chart reads it the same way)."""
    tls = values.get("controlPlaneTLS")
    if not isinstance(tls, Mapping) or "acceptPlaintext" not in tls:
        return True
    if not isinstance(tls["acceptPlaintext"], bool):
        raise RenderError(f"controlPlaneTLS.acceptPlaintext: {tls['acceptPlaintext']!r} is not true or false")
    return tls["acceptPlaintext"]


def _check_control_plane_tls(values: Mapping[str, Any]) -> None:
    """The values the control plane's TLS names and tokens come from can make them (chart: config.yaml)."""
    field = "identityTrustDomain" if values.get("identityTrustDomain") else "clusterDomain"
    trust_domain = str(values.get(field) or "")
    try:
        check_trust_domain(trust_domain)
    except IdentityNameError:
        raise RenderError(f'{field}: "{trust_domain}" is not a trust domain (lowercase DNS labels joined by "."): '
                          "the control plane's TLS names, such as linkerd-identity.<namespace>.serviceaccount."
                          "identity.<namespace>.<trust domain>, end with it") from None
    if values["identity"].get("serviceAccountTokenProjection") is False:
        raise RenderError("identity.serviceAccountTokenProjection: false is not supported: proxies and the "
                          "destination service get their certificates with projected service-account tokens "
                          "(audience identity.l5d.io)")


def render(values: Mapping[str, Any], namespace: str, version: str) -> list[dict[str, Any]]:
    """Every object of the control plane in ``namespace`` (values: the chart's defaults merged)."""
    ns = namespace
    if not values.get("identityTrustAnchorsPEM"):
        raise RenderError("identityTrustAnchorsPEM: required (--identity-trust-anchors-file)")
    identity = values["identity"]
    issuer = identity["issuer"]
    scheme = issuer["scheme"]
    if scheme not in ("linkerd.io/tls", "kubernetes.io/tls"):
        raise RenderError(f"identity.issuer.scheme: {scheme!r} must be linkerd.io/tls or kubernetes.io/tls")
    crt, key = issuer["tls"]["crtPEM"], issuer["tls"]["keyPEM"]
    make_issuer_secret = not identity["externalCA"] and (scheme == "linkerd.io/tls" or bool(crt))
    if make_issuer_secret and not (crt and key):
        raise RenderError("identity.issuer.tls.crtPEM and keyPEM: required (--identity-issuer-certificate-file and "
                          "--identity-issuer-key-file), or identity.externalCA=true with a Secret "
                          f"{ISSUER_SECRET} made by cert-manager")
    injector = values["proxyInjector"]
    if not (injector["crtPEM"] and injector["keyPEM"] and injector["caBundle"]):
        raise RenderError("proxyInjector.crtPEM, keyPEM and caBundle: required (tether install makes them)")
    _check_control_plane_tls(values)
    plaintext = ["--accept-plaintext"] if accept_plaintext(values) else []
    v = InjectValues.from_values(values, ns, version)
    objs: list[dict[str, Any]] = []
    if values["installNamespace"]:
        objs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
            "config.linkerd.io/admission-webhooks": "disabled", "linkerd.io/is-control-plane": "true"}}})
    objs += _rbac(ns, "identity", [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": WATCH},
    ])
    objs += _rbac(ns, "destination", [
        {"apiGroups": [""], "resources": ["pods", "services", "endpoints", "namespaces", "serviceaccounts",
                                          "nodes"], "verbs": WATCH},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": WATCH},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": WATCH},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": WATCH},
        {"apiGroups": sorted({*VALIDATED, "gateway.networking.k8s.io"}), "resources": ["*"], "verbs": WATCH},
        {"apiGroups": ["policy.linkerd.io", "gateway.networking.k8s.io"],
         "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch", "update"]},
    ])
    objs += _rbac(ns, "proxy-injector", [
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": WATCH},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
    ])
    anchors = values["identityTrustAnchorsPEM"]
    objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": TRUST_ROOTS, "namespace": ns, "labels": _labels(ns, "identity")},
                 "data": {"ca-bundle.crt": anchors}})
    if make_issuer_secret:
        objs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": ISSUER_SECRET, "namespace": ns, "labels": _labels(ns, "identity")},
                     "data": {"tls.crt": _b64(crt), "tls.key": _b64(key), "ca.crt": _b64(anchors)}})
    objs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": {"name": INJECTOR_TLS, "namespace": ns, "labels": _labels(ns, "proxy-injector")},
                 "data": {"tls.crt": _b64(injector["crtPEM"]), "tls.key": _b64(injector["keyPEM"])}})
    import yaml  # the ConfigMap holds the values as YAML text (Helm's toYaml: sorted keys)

    objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "linkerd-config", "namespace": ns, "labels": _labels(ns, "controller")},
                 "data": {"version": version,
                          "values": yaml.safe_dump(public_values(values), sort_keys=True)}})
    level = values["controllerLogLevel"]
    trust_domain = v.trust_domain
    # Identity reads its issuer Secret and trust-anchor ConfigMap through the API server (watched:
    # a rotated issuer is used without a restart) and checks tokens with TokenReview. It serves TLS
    # with a certificate it issues itself for linkerd-identity: proxies verify it before sending a token.
    identity_args = [
        "controller", "identity", "--addr", "0.0.0.0:8080", "--admin-addr", "0.0.0.0:9990",
        "--controller-namespace", ns, "--identity-trust-domain", trust_domain, "--platform", "kubernetes",
        "--issuer-secret", ISSUER_SECRET, "--trust-anchors-configmap", TRUST_ROOTS,
        "--issuance-lifetime", str(issuer["issuanceLifetime"]),
        "--clock-skew-allowance", str(issuer["clockSkewAllowance"]),
        "--tls", "--identity-service-account", IDENTITY_SERVICE_ACCOUNT, *plaintext,
        "--log-level", level,
    ]
    objs.append(_deployment(values, v, ns, "linkerd-identity", "identity", _container(
        values, "identity", identity_args, [{"name": "grpc", "containerPort": 8080},
                                            {"name": "admin-http", "containerPort": 9990}], 9990,
        "identityResources", [], version), [], version))
    # Destination serves mutual TLS as linkerd-destination (policy too: one process), certified by the
    # identity service like a workload: the pod's projected token (the proxy's volume, the same service
    # account and audience) and the trust anchors' ConfigMap (followed when it changes). Its /ready
    # (the readiness probe) answers 200 only once it is certified and serving.
    destination_args = [
        "controller", "destination", "--addr", "0.0.0.0:8086", "--admin-addr", "0.0.0.0:9996",
        "--controller-namespace", ns, "--cluster-domain", values["clusterDomain"],
        "--identity-trust-domain", trust_domain,
        "--default-policy", v.default_inbound_policy, "--cluster-networks", v.cluster_networks,
        "--platform", "kubernetes",
        "--identity-addrs", v.service("linkerd-identity", 8080),
        "--identity-token-path", f"{TOKEN_DIR}/{TOKEN_VOLUME}",
        "--identity-trust-anchors-file", f"{TRUST_ROOTS_DIR}/ca-bundle.crt",
        "--service-account", DESTINATION_SERVICE_ACCOUNT, "--identity-service-account", IDENTITY_SERVICE_ACCOUNT,
        *plaintext, "--plaintext-addr", OPERATOR_PLAINTEXT_ADDR,
        "--log-level", level,
    ]
    objs.append(_deployment(values, v, ns, "linkerd-destination", "destination", _container(
        values, "destination", destination_args, [{"name": "grpc", "containerPort": 8086},
                                                  {"name": "admin-http", "containerPort": 9996}], 9996,
        "destinationResources",
        [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
         {"name": TRUST_ROOTS_VOLUME, "mountPath": TRUST_ROOTS_DIR, "readOnly": True}], version),
        [{"name": TRUST_ROOTS_VOLUME, "configMap": {"name": TRUST_ROOTS}}], version))
    injector_args = [
        "controller", "injector", "--addr", "0.0.0.0:8443", "--admin-addr", "0.0.0.0:9995",
        "--controller-namespace", ns, "--tls-cert-file", "/var/run/linkerd/tls/tls.crt",
        "--tls-key-file", "/var/run/linkerd/tls/tls.key", "--values-file", "/var/run/linkerd/config/values",
        "--log-level", level,
    ]
    objs.append(_deployment(values, v, ns, "linkerd-proxy-injector", "proxy-injector", _container(
        values, "proxy-injector", injector_args, [{"name": "webhook", "containerPort": 8443},
                                                  {"name": "admin-http", "containerPort": 9995}], 9995,
        "proxyInjectorResources",
        [{"name": "tls", "mountPath": "/var/run/linkerd/tls", "readOnly": True},
         {"name": "config", "mountPath": "/var/run/linkerd/config", "readOnly": True}], version),
        [{"name": "tls", "secret": {"secretName": INJECTOR_TLS}},
         {"name": "config", "configMap": {"name": "linkerd-config"}}], version))
    objs.append(_service(ns, "linkerd-identity", "identity", 8080, 8080, "grpc"))
    objs.append(_service(ns, "linkerd-dst", "destination", 8086, 8086, "grpc"))
    objs.append(_service(ns, "linkerd-policy", "destination", 8090, 8086, "grpc"))
    objs.append(_service(ns, "linkerd-proxy-injector", "proxy-injector", 443, 8443, "webhook"))
    if values["enablePodDisruptionBudget"]:
        for name, component in (("linkerd-identity", "identity"), ("linkerd-destination", "destination"),
                                ("linkerd-proxy-injector", "proxy-injector")):
            objs.append(_pdb(ns, name, component))
    hook_common = {
        "failurePolicy": values["webhookFailurePolicy"],
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": values["webhookTimeoutSeconds"],
        "namespaceSelector": injector["namespaceSelector"],
    }
    ca = _b64(injector["caBundle"])
    objs.append({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": MUTATING, "labels": _labels(ns, "proxy-injector")},
        "webhooks": [{
            "name": "linkerd-proxy-injector.linkerd.io",
            "clientConfig": {"service": {"name": "linkerd-proxy-injector", "namespace": ns, "path": "/inject"},
                             "caBundle": ca},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            **hook_common,
        }],
    })
    if values["policyValidator"]["enabled"]:
        objs.append({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": VALIDATING, "labels": _labels(ns, "proxy-injector")},
            "webhooks": [{
                "name": "linkerd-policy-validator.linkerd.io",
                "clientConfig": {"service": {"name": "linkerd-proxy-injector", "namespace": ns,
                                             "path": "/validate"}, "caBundle": ca},
                "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [group], "apiVersions": ["*"],
                           "resources": resources, "scope": "Namespaced"}
                          for group, resources in sorted(VALIDATED.items())],
                **hook_common,
            }],
        })
    monitor = values["podMonitor"]
    if monitor["enabled"]:
        objs.append({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "linkerd-proxies", "namespace": ns,
                         "labels": {**_labels(ns, "controller"), **(monitor.get("labels") or {})}},
            "spec": {
                "namespaceSelector": {"any": True},
                "selector": {"matchExpressions": [{"key": CONTROL_PLANE_NS_LABEL, "operator": "In",
                                                   "values": [ns]}]},
                "podMetricsEndpoints": [{
                    "port": "linkerd-admin", "path": "/metrics",
                    "interval": monitor["scrapeInterval"], "scrapeTimeout": monitor["scrapeTimeout"],
                    # The labels the seeds' PromQL and alerts group by (namespace, pod, deployment).
                    "relabelings": [
                        {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"},
                        {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"},
                        {"sourceLabels": ["__meta_kubernetes_pod_label_linkerd_io_proxy_deployment"],
                         "targetLabel": "deployment"},
                        {"sourceLabels": ["__meta_kubernetes_pod_label_linkerd_io_control_plane_component"],
                         "targetLabel": "component"},
                    ],
                }],
            },
        })
    return objs


def trust_root_sha(anchors: str) -> str:
    return hashlib.sha256(anchors.encode()).hexdigest()
