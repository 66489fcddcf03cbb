"""`tether check --platform kubernetes`: Linkerd's check categories against a cluster, as data.

Registered into tether.cli.check's category list with the ``kube-*`` modes. The control plane is
found as Linkerd's is: in its namespace (``-L``), its pods carry ``linkerd.io/control-plane-component``,
its configuration is the ``linkerd-config`` ConfigMap, its issuer the ``linkerd-identity-issuer``
Secret and its trust anchors the ``linkerd-identity-trust-roots`` ConfigMap; meshed pods have a
``linkerd-proxy`` container. The certificate checkers of ``linkerd-identity`` are the local ones,
fed from the Secret and ConfigMap instead of files.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from tether import __version__
from tether.cli.check import (
    IDENTITY,
    Category,
    CheckContext,
    Checker,
    CheckFailed,
    _expires_soon,
    register_category,
)
from tether.core.releases import FIRST_CONTROL_PLANE_TLS, before

MIN_KUBERNETES = (1, 22)
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)
COMPONENT_LABEL = "linkerd.io/control-plane-component"
CONTROL_PLANE_NS_LABEL = "linkerd.io/control-plane-ns"  # on every pod the injector meshed, its control plane
COMPONENTS = ("identity", "destination", "proxy-injector")
PROXY_CONTAINER = "linkerd-proxy"
ISSUER_SECRET = "linkerd-identity-issuer"
TRUST_ROOTS = "linkerd-identity-trust-roots"
WEBHOOKS = (
    # (name in checks, TLS Secret, webhook configuration kind, its name). Linkerd's destination also
    # serves an sp-validator; tether's injector validates every CRD (ServiceProfiles too) as the
    # policy validator, so the chart has no sp-validator to check.
    ("proxy-injector", "linkerd-proxy-injector-k8s-tls", "mutatingwebhookconfigurations",
     "linkerd-proxy-injector-webhook-config"),
    ("policy-validator", "linkerd-policy-validator-k8s-tls", "validatingwebhookconfigurations",
     "linkerd-policy-validator-webhook-config"),
)
ADMISSION = "/apis/admissionregistration.k8s.io/v1"


def _kube(ctx: CheckContext) -> Any:
    kube = ctx.cache.get("kube")
    if kube is None:
        raise CheckFailed("no Kubernetes client (the kubernetes-api checks failed)")
    return kube


def _ns(ctx: CheckContext) -> str:
    return ctx.options.controller_namespace


def _get(ctx: CheckContext, path: str, **params: str) -> Any:
    """GET, or None for 404; CheckFailed naming the request for any other error."""
    from tether.platform.kubernetes.client import KubeError

    try:
        return _kube(ctx).get(path, **params)
    except KubeError as e:
        if e.status == 404:
            return None
        raise CheckFailed(str(e)) from None


# -- kubernetes-api, kubernetes-version ------------------------------------------------------------


def _client(ctx: CheckContext) -> None:
    from tether.platform.kubernetes.blocking import BlockingKube
    from tether.platform.kubernetes.client import KubeConfigError

    try:
        ctx.cache["kube"] = BlockingKube(ctx.options.kubeconfig, ctx.options.kube_context, ctx.options.timeout)
    except KubeConfigError as e:
        raise CheckFailed(str(e)) from None


def _query(ctx: CheckContext) -> None:
    version = _get(ctx, "/version")
    if not isinstance(version, dict):
        raise CheckFailed(f"{_kube(ctx).server}: /version answered nothing")
    ctx.cache["version"] = version


def _version(ctx: CheckContext) -> None:
    v = ctx.cache.get("version") or {}
    try:
        major, minor = int(str(v.get("major"))), int(str(v.get("minor")).rstrip("+"))
    except ValueError:
        raise CheckFailed(f"cannot read the server's version from {v}") from None
    if (major, minor) < MIN_KUBERNETES:
        want = ".".join(map(str, MIN_KUBERNETES))
        raise CheckFailed(f"Kubernetes is on version {major}.{minor}, but version {want} or later is required")


KUBERNETES_API = Category("kubernetes-api", (
    Checker("can initialize the client", _client, "k8s-api", fatal=True),
    Checker("can query the Kubernetes API", _query, "k8s-api", fatal=True),
), mode="kube-base")

KUBERNETES_VERSION = Category("kubernetes-version", (
    Checker("is running the minimum Kubernetes API version", _version, "k8s-version"),
), mode="kube-base")


# -- pre-kubernetes-setup ----------------------------------------------------------------------------


def _ns_absent(ctx: CheckContext) -> None:
    if _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}") is not None:
        raise CheckFailed(f"The \"{_ns(ctx)}\" namespace already exists")


def _can(verb: str, group: str, resource: str, namespaced: bool = True, name: str = "") -> Any:
    def check(ctx: CheckContext) -> None:
        from tether.platform.kubernetes.client import KubeError

        attrs: dict[str, str] = {"verb": verb, "group": group, "resource": resource}
        if namespaced:
            attrs["namespace"] = "kube-system" if name == "extension-apiserver-authentication" else _ns(ctx)
        if name:
            attrs["name"] = name
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attrs}}
        try:
            answer = _kube(ctx).create("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        except KubeError as e:
            raise CheckFailed(str(e)) from None
        status = answer.get("status") or {}
        if not status.get("allowed"):
            what = f"{resource}.{group}" if group else resource
            where = f" in namespace {attrs['namespace']}" if namespaced else ""
            why = status.get("reason") or "no RBAC rule allows it"
            raise CheckFailed(f"missing permission to {verb} {what}{where}: {why}")
    return check


def _non_namespaced(ctx: CheckContext) -> None:
    for group, resource in (("", "namespaces"), ("rbac.authorization.k8s.io", "clusterroles"),
                            ("rbac.authorization.k8s.io", "clusterrolebindings"),
                            ("apiextensions.k8s.io", "customresourcedefinitions"),
                            ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
                            ("admissionregistration.k8s.io", "validatingwebhookconfigurations")):
        _can("create", group, resource, namespaced=False)(ctx)


def _clock_skew(ctx: CheckContext) -> None:
    from tether.platform.kubernetes.client import KubeError

    try:
        server = _kube(ctx).server_time()
    except KubeError as e:
        raise CheckFailed(str(e)) from None
    if server is None:
        raise CheckFailed("the API server sent no Date header: cannot compare clocks")
    skew = abs(server - ctx.now)
    if skew > MAX_CLOCK_SKEW:
        raise CheckFailed(f"clock skew detected: the API server's clock is {skew.total_seconds():.0f}s off this "
                          f"host's (allowed {MAX_CLOCK_SKEW.total_seconds():.0f}s); certificates may look "
                          "not yet valid or expired")


PRE_KUBERNETES_SETUP = Category("pre-kubernetes-setup", (
    Checker("control plane namespace does not already exist", _ns_absent, "pre-ns"),
    Checker("can create non-namespaced resources", _non_namespaced, "pre-k8s-cluster-k8s"),
    Checker("can create ServiceAccounts", _can("create", "", "serviceaccounts"), "pre-k8s"),
    Checker("can create Services", _can("create", "", "services"), "pre-k8s"),
    Checker("can create Deployments", _can("create", "apps", "deployments"), "pre-k8s"),
    Checker("can create CronJobs", _can("create", "batch", "cronjobs"), "pre-k8s"),
    Checker("can create ConfigMaps", _can("create", "", "configmaps"), "pre-k8s"),
    Checker("can create Secrets", _can("create", "", "secrets"), "pre-k8s"),
    Checker("can read Secrets", _can("get", "", "secrets"), "pre-k8s"),
    Checker("can read extension-apiserver-authentication configmap",
            _can("get", "", "configmaps", name="extension-apiserver-authentication"), "pre-k8s"),
    Checker("no clock skew detected", _clock_skew, "pre-k8s-clock-skew", warning=True),
), mode="kube-pre")


# -- linkerd-existence -------------------------------------------------------------------------------


def _config_exists(ctx: CheckContext) -> None:
    cm = _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}/configmaps/linkerd-config")
    if cm is None:
        raise CheckFailed(f"ConfigMap {_ns(ctx)}/linkerd-config not found: is the control plane installed in "
                          f"namespace {_ns(ctx)}? (`tether install | kubectl apply -f -`, or pass -L NAMESPACE)")
    ctx.cache["linkerd-config"] = cm


def _cp_pods(ctx: CheckContext) -> list[dict[str, Any]]:
    if "cp-pods" not in ctx.cache:
        pods = _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}/pods", labelSelector=COMPONENT_LABEL) or {}
        ctx.cache["cp-pods"] = [p for p in pods.get("items") or [] if not p["metadata"].get("deletionTimestamp")]
    return list(ctx.cache["cp-pods"])


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _replica_sets(ctx: CheckContext) -> None:
    deps = _get(ctx, f"/apis/apps/v1/namespaces/{_ns(ctx)}/deployments", labelSelector=COMPONENT_LABEL) or {}
    found = {d["metadata"]["labels"][COMPONENT_LABEL]: d for d in deps.get("items") or []}
    problems = [f"no Deployment of the {c} component in {_ns(ctx)}" for c in COMPONENTS if c not in found]
    for _comp, d in sorted(found.items()):
        want = (d.get("spec") or {}).get("replicas", 1)
        have = (d.get("status") or {}).get("availableReplicas") or 0
        if have < want or want == 0:
            problems.append(f"{d['metadata']['name']}: {have} of {want} replicas available")
    if problems:
        raise CheckFailed("\n".join(problems))


def _unschedulable(ctx: CheckContext) -> None:
    bad = []
    for p in _cp_pods(ctx):
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable":
                bad.append(f"{p['metadata']['name']}: {c.get('message', 'unschedulable')}")
    if bad:
        raise CheckFailed("\n".join(bad))


def _pods_ready(ctx: CheckContext) -> None:
    pods = _cp_pods(ctx)
    problems = []
    for comp in COMPONENTS:
        mine = [p for p in pods if p["metadata"]["labels"].get(COMPONENT_LABEL) == comp]
        ready = [p for p in mine if _ready(p)]
        if not ready:
            problems.append(f"no running pod of the {comp} component is ready ({len(mine)} found)")
    problems += [f"pod {p['metadata']['name']} is not ready" for p in pods if not _ready(p)]
    if problems:
        raise CheckFailed("\n".join(dict.fromkeys(problems)))


EXISTENCE = Category("linkerd-existence", (
    Checker("'linkerd-config' config map exists", _config_exists, "l5d-existence-linkerd-config", fatal=True),
    Checker("control plane replica sets are ready", _replica_sets, "l5d-existence-replicasets"),
    Checker("no unschedulable pods", _unschedulable, "l5d-existence-unschedulable-pods"),
    Checker("control plane pods are ready", _pods_ready, "l5d-api-control-ready", fatal=True),
), mode="kube")


# -- linkerd-config ----------------------------------------------------------------------------------


def _ns_exists(ctx: CheckContext) -> None:
    if _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}") is None:
        raise CheckFailed(f"The \"{_ns(ctx)}\" namespace does not exist")


def _crds(ctx: CheckContext) -> None:
    from tether.platform.kubernetes.store import CUSTOM_KINDS

    missing = []
    for ck in CUSTOM_KINDS:
        if ck.group.endswith(".k8s.io") or ck.group == "split.smi-spec.io":
            continue  # Gateway API and SMI CRDs are optional (Linkerd does not require them either)
        if _get(ctx, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{ck}") is None:
            missing.append(str(ck))
    if missing:
        raise CheckFailed("missing CustomResourceDefinitions: " + ", ".join(missing)
                          + "\ninstall them: `tether install --crds | kubectl apply -f -`")


def _webhook_configs(kind: str) -> Any:
    def check(ctx: CheckContext) -> None:
        missing = [name for _, _, k, name in WEBHOOKS if k == kind
                   and _get(ctx, f"{ADMISSION}/{kind}/{name}") is None]
        if missing:
            raise CheckFailed(f"missing {kind}: {', '.join(missing)}")
    return check


CONFIG = Category("linkerd-config", (
    Checker("control plane Namespace exists", _ns_exists, "l5d-existence-ns", fatal=True),
    Checker("control plane CustomResourceDefinitions exist", _crds, "l5d-existence-crd", fatal=True),
    Checker("control plane MutatingWebhookConfigurations exist", _webhook_configs("mutatingwebhookconfigurations"),
            "l5d-existence-mwc"),
    Checker("control plane ValidatingWebhookConfigurations exist",
            _webhook_configs("validatingwebhookconfigurations"), "l5d-existence-vwc"),
), mode="kube")


# -- linkerd-identity (the local checkers, fed from the Secret and ConfigMap) ----------------------------


def _kube_identity(ctx: CheckContext) -> None:
    from tether.core.identity.certs import CertificateError, TrustBundle, parse_certificates
    from tether.platform.kubernetes.identity import ISSUER_SCHEMES, TRUST_ROOTS_KEY, secret_value

    ns = _ns(ctx)
    roots = _get(ctx, f"/api/v1/namespaces/{ns}/configmaps/{TRUST_ROOTS}")
    secret = _get(ctx, f"/api/v1/namespaces/{ns}/secrets/{ISSUER_SECRET}")
    if roots is None or not (roots.get("data") or {}).get(TRUST_ROOTS_KEY):
        raise CheckFailed(f"ConfigMap {ns}/{TRUST_ROOTS} with key {TRUST_ROOTS_KEY} not found: it holds the "
                          "trust anchors")
    if secret is None:
        raise CheckFailed(f"Secret {ns}/{ISSUER_SECRET} not found: it holds the issuer")
    scheme = ISSUER_SCHEMES.get(str(secret.get("type")))
    if scheme is None:
        raise CheckFailed(f"Secret {ns}/{ISSUER_SECRET} has type {secret.get('type')!r}: want kubernetes.io/tls "
                          "or linkerd.io/tls")
    cert = secret_value(secret, scheme[0])
    if not cert:
        raise CheckFailed(f"Secret {ns}/{ISSUER_SECRET}: key {scheme[0]} is missing")
    try:
        bundle = TrustBundle.from_pem(str(roots["data"][TRUST_ROOTS_KEY]).encode(),
                                      f"ConfigMap {ns}/{TRUST_ROOTS}")
        certs = parse_certificates(cert, f"Secret {ns}/{ISSUER_SECRET} key {scheme[0]}")
    except CertificateError as e:
        raise CheckFailed(str(e)) from None
    ctx.cache["anchors"] = bundle
    ctx.cache["issuer"] = certs[0]
    ctx.cache["issuer_chain"] = tuple(certs[1:])


def _trust_domain(ctx: CheckContext) -> str:
    """identityTrustDomain from linkerd-config's values (Linkerd's key), else cluster.local."""
    import yaml

    cm = ctx.cache.get("linkerd-config") or _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}/configmaps/linkerd-config")
    try:
        values = yaml.safe_load(((cm or {}).get("data") or {}).get("values") or "") or {}
    except yaml.YAMLError:
        values = {}
    domain = values.get("identityTrustDomain") if isinstance(values, dict) else None
    return str(domain or "cluster.local")


def _kube_issuer_named(ctx: CheckContext) -> None:
    from cryptography.x509.oid import NameOID

    expected = f"identity.{_ns(ctx)}.{_trust_domain(ctx)}"
    names = [str(a.value) for a in ctx.cache["issuer"].subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if expected not in names:
        raise CheckFailed(f"the issuer is named {', '.join(names) or '(no CN)'}, expected {expected}: proxies "
                          f"verifying the control plane in namespace {_ns(ctx)} will not trust what it issues")


KUBE_IDENTITY = Category(
    "linkerd-identity",
    (Checker("certificate config is valid", _kube_identity, "l5d-identity-cert-config-valid", fatal=True),
     *[c for c in IDENTITY.checkers[1:] if c.description != IDENTITY.checkers[-1].description],
     Checker("issuer cert is named for the control plane's namespace and trust domain", _kube_issuer_named,
             "the issuer's CN must be identity.<control-plane-namespace>.<identityTrustDomain>", warning=True)),
    mode="kube",
)


# -- linkerd-webhooks-and-apisvc-tls -----------------------------------------------------------------


def _webhook_cert(ctx: CheckContext, secret_name: str) -> Any:
    from tether.core.identity.certs import CertificateError, parse_certificates
    from tether.platform.kubernetes.identity import secret_value

    key = f"webhook-cert {secret_name}"
    if key not in ctx.cache:
        secret = _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}/secrets/{secret_name}")
        if secret is None:
            raise CheckFailed(f"Secret {_ns(ctx)}/{secret_name} not found: it holds the webhook's TLS certificate")
        pem = secret_value(secret, "tls.crt") or secret_value(secret, "crt.pem")
        if not pem:
            raise CheckFailed(f"Secret {_ns(ctx)}/{secret_name} has no tls.crt")
        try:
            ctx.cache[key] = parse_certificates(pem, f"Secret {_ns(ctx)}/{secret_name}")[0]
        except CertificateError as e:
            raise CheckFailed(str(e)) from None
    return ctx.cache[key]


def _webhook_valid(name: str, secret_name: str, kind: str, config: str) -> Any:
    def check(ctx: CheckContext) -> None:
        import base64

        from cryptography import x509

        from tether.core.identity.certs import parse_certificates, signed_by, validity_problem

        cert = _webhook_cert(ctx, secret_name)
        if p := validity_problem(cert, ctx.now, f"the {name} webhook's certificate"):
            raise CheckFailed(p + f"\nrenew the certificate in Secret {_ns(ctx)}/{secret_name}")
        conf = _get(ctx, f"{ADMISSION}/{kind}/{config}")
        if conf is None:
            raise CheckFailed(f"{kind} {config} not found")
        for hook in conf.get("webhooks") or []:
            bundle = (hook.get("clientConfig") or {}).get("caBundle")
            if not bundle:
                raise CheckFailed(f"{config}: webhook {hook.get('name')} has no caBundle")
            cas: list[x509.Certificate] = parse_certificates(base64.b64decode(bundle), f"{config} caBundle")
            if not any(ca.subject == cert.issuer and signed_by(cert, ca) for ca in cas) and not any(
                    ca == cert for ca in cas):
                raise CheckFailed(f"{config}: webhook {hook.get('name')}'s caBundle does not sign the certificate in "
                                  f"Secret {_ns(ctx)}/{secret_name}: the API server will refuse its TLS")
    return check


def _webhook_60_days(name: str, secret_name: str) -> Any:
    def check(ctx: CheckContext) -> None:
        if p := _expires_soon(_webhook_cert(ctx, secret_name), ctx.now, f"{name} webhook certificate"):
            raise CheckFailed(p)
    return check


WEBHOOKS_TLS = Category("linkerd-webhooks-and-apisvc-tls", tuple(
    checker
    for name, secret, kind, config in WEBHOOKS
    for checker in (
        Checker(f"{name} webhook has valid cert", _webhook_valid(name, secret, kind, config),
                f"l5d-{name}-webhook-cert-valid"),
        Checker(f"{name} cert is valid for at least 60 days", _webhook_60_days(name, secret),
                f"l5d-{name}-webhook-cert-not-expiring-soon", warning=True),
    )
), mode="kube")


# -- linkerd-control-plane-proxy, linkerd-ha-checks ---------------------------------------------------


def _proxy_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        if s.get("name") == PROXY_CONTAINER:
            return dict(s)
    for s in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if s.get("name") == PROXY_CONTAINER:  # a native sidecar
            return dict(s)
    return None


def _proxies_healthy(pods: list[dict[str, Any]]) -> list[str]:
    problems = []
    for p in pods:
        s = _proxy_status(p)
        if s is None:
            problems.append(f"pod {p['metadata']['namespace']}/{p['metadata']['name']} has no {PROXY_CONTAINER} "
                            "container: it is not meshed")
        elif not s.get("ready"):
            problems.append(f"pod {p['metadata']['namespace']}/{p['metadata']['name']}: {PROXY_CONTAINER} "
                            "is not ready")
    return problems


def _proxy_versions(pods: list[dict[str, Any]]) -> list[str]:
    problems = []
    for p in pods:
        v = (p["metadata"].get("annotations") or {}).get("linkerd.io/proxy-version")
        if v is not None and v.lstrip("v") != __version__:
            problems.append(f"pod {p['metadata']['namespace']}/{p['metadata']['name']} runs proxy {v}, "
                            f"cli {__version__}")
    return problems


def _cp_proxies_healthy(ctx: CheckContext) -> None:
    if problems := _proxies_healthy(_cp_pods(ctx)):
        raise CheckFailed("\n".join(problems))


def _cp_proxies_version(ctx: CheckContext) -> None:
    if problems := _proxy_versions(_cp_pods(ctx)):
        raise CheckFailed("\n".join(problems))


CONTROL_PLANE_PROXY = Category("linkerd-control-plane-proxy", (
    Checker("control plane proxies are healthy", _cp_proxies_healthy, "l5d-cp-proxy-healthy"),
    Checker("control plane proxies and cli versions match", _cp_proxies_version, "l5d-cp-proxy-cli-version",
            warning=True),
), mode="kube")


def _ha_replicas(ctx: CheckContext) -> None:
    pods = _cp_pods(ctx)
    few = [c for c in COMPONENTS
           if len([p for p in pods if p["metadata"]["labels"].get(COMPONENT_LABEL) == c]) < 2]
    if few:
        raise CheckFailed("not enough replicas available for " + ", ".join(few)
                          + ": run three (`tether install --ha`, or --controller-replicas 3)")


def _kube_system_excluded(ctx: CheckContext) -> None:
    ns = _get(ctx, "/api/v1/namespaces/kube-system") or {}
    if (ns.get("metadata", {}).get("labels") or {}).get("config.linkerd.io/admission-webhooks") != "disabled":
        raise CheckFailed("kube-system is not labelled config.linkerd.io/admission-webhooks=disabled: with "
                          "webhookFailurePolicy Fail, an injector outage could block kube-system's pods\n"
                          "kubectl label namespace kube-system config.linkerd.io/admission-webhooks=disabled")


HA = Category("linkerd-ha-checks", (
    Checker("pod injection disabled on kube-system", _kube_system_excluded, "l5d-injection-disabled",
            warning=True),
    Checker("multiple replicas of control plane pods", _ha_replicas, "l5d-control-plane-replicas", warning=True),
), mode="kube")


# -- control-plane-tls: plaintext served only while proxies need it -----------------------------------

UPGRADE_PLAINTEXT = "tether upgrade --set controlPlaneTLS.acceptPlaintext={} | kubectl apply -f -"


def _plaintext_state(ctx: CheckContext) -> tuple[str, bool | None, list[str]]:
    """(control plane version, controlPlaneTLS.acceptPlaintext or None before control-plane TLS, the
    pods meshed by this control plane (the injector's label linkerd.io/control-plane-ns, in any
    namespace) whose proxies predate it, as "ns/name (version)")."""
    import yaml

    from tether.core.install.render import RenderError, accept_plaintext

    if "plaintext" in ctx.cache:
        return ctx.cache["plaintext"]
    cm = ctx.cache.get("linkerd-config") or _get(ctx, f"/api/v1/namespaces/{_ns(ctx)}/configmaps/linkerd-config")
    if cm is None:
        raise CheckFailed(f"ConfigMap {_ns(ctx)}/linkerd-config not found")
    data = cm.get("data") or {}
    version = str(data.get("version") or "")
    try:
        values = yaml.safe_load(data.get("values") or "") or {}
        accepts: bool | None = None if before(version, FIRST_CONTROL_PLANE_TLS) else accept_plaintext(values)
    except (yaml.YAMLError, AttributeError, RenderError) as e:
        raise CheckFailed(f"ConfigMap {_ns(ctx)}/linkerd-config: cannot read its values: {e}") from None
    old = []
    mine = _get(ctx, "/api/v1/pods", labelSelector=f"{CONTROL_PLANE_NS_LABEL}={_ns(ctx)}") or {}
    for p in mine.get("items") or []:
        meta = p["metadata"]
        spec = p.get("spec") or {}
        containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
        if meta.get("deletionTimestamp") or not any(c.get("name") == PROXY_CONTAINER for c in containers):
            continue
        v = (meta.get("annotations") or {}).get("linkerd.io/proxy-version", "")
        if before(v, FIRST_CONTROL_PLANE_TLS):
            old.append(f"{meta['namespace']}/{meta['name']} ({v})")
    ctx.cache["plaintext"] = (version, accepts, sorted(old))
    return version, accepts, sorted(old)


def _some(pods: list[str], most: int = 5) -> str:
    shown = ", ".join(pods[:most])
    return shown + (f" and {len(pods) - most} more" if len(pods) > most else "")


def _old_proxies_served(ctx: CheckContext) -> None:
    version, accepts, old = _plaintext_state(ctx)
    if accepts is None:
        raise CheckFailed(f"the control plane runs {version}, from before control-plane TLS: it serves plaintext "
                          "only, and this CLI's proxies speak TLS to it; upgrade it (`tether upgrade | kubectl "
                          "apply -f -`)")
    if old and not accepts:
        first = ".".join(map(str, FIRST_CONTROL_PLANE_TLS))
        who = "1 meshed pod runs" if len(old) == 1 else f"{len(old)} meshed pods run"
        raise CheckFailed(
            f"controlPlaneTLS.acceptPlaintext is false, and {who} a proxy from before "
            f"{first}, which speaks plaintext to the control plane and is now refused (no certificate renewal, "
            f"no discovery, no policy): {_some(old)}\nrestart them (kubectl rollout restart) so that they get "
            f"this release's proxy, or accept plaintext again: {UPGRADE_PLAINTEXT.format('true')}")


def _plaintext_needed(ctx: CheckContext) -> None:
    _, accepts, old = _plaintext_state(ctx)
    if accepts and not old:
        raise CheckFailed("controlPlaneTLS.acceptPlaintext is true, and no meshed pod runs a proxy that needs it: "
                          "anyone who reaches the controllers' ports can use them without TLS; turn it off:\n"
                          + UPGRADE_PLAINTEXT.format("false"))


CONTROL_PLANE_TLS = Category("control-plane-tls", (
    Checker("every meshed proxy can reach the control plane", _old_proxies_served,
            "Proxies from before control-plane TLS need controlPlaneTLS.acceptPlaintext=true until their pods "
            "restart (charts/README.md, control-plane TLS)"),
    Checker("control plane accepts plaintext only while proxies need it", _plaintext_needed,
            "controlPlaneTLS.acceptPlaintext is for upgrades from a release before control-plane TLS "
            "(charts/README.md)", warning=True),
), mode="kube")


# -- linkerd-data-plane, linkerd-identity-data-plane (--proxy) -------------------------------------------


def _dp_pods(ctx: CheckContext) -> list[dict[str, Any]]:
    if "dp-pods" not in ctx.cache:
        ns = ctx.options.namespace
        path = f"/api/v1/namespaces/{ns}/pods" if ns else "/api/v1/pods"
        items = (_get(ctx, path) or {}).get("items") or []
        ctx.cache["dp-pods"] = [
            p for p in items
            if any(c.get("name") == PROXY_CONTAINER
                   for c in [*(p["spec"].get("containers") or []), *(p["spec"].get("initContainers") or [])])
            and not p["metadata"].get("deletionTimestamp")
        ]
    return list(ctx.cache["dp-pods"])


def _dp_exists(ctx: CheckContext) -> None:
    ns = ctx.options.namespace
    if ns and _get(ctx, f"/api/v1/namespaces/{ns}") is None:
        raise CheckFailed(f"The \"{ns}\" namespace does not exist")
    if not _dp_pods(ctx):
        raise CheckFailed(f"no meshed pod (with a {PROXY_CONTAINER} container) in "
                          + (f"namespace {ns}" if ns else "any namespace"))


def _dp_ready(ctx: CheckContext) -> None:
    if problems := _proxies_healthy(_dp_pods(ctx)):
        raise CheckFailed("\n".join(problems))


def _dp_versions(ctx: CheckContext) -> None:
    if problems := _proxy_versions(_dp_pods(ctx)):
        raise CheckFailed("\n".join(problems))


def _dp_anchors(ctx: CheckContext) -> None:
    from tether.core.identity.certs import CertificateError, TrustBundle

    if "anchors" not in ctx.cache:
        _kube_identity(ctx)
    want = {a.fingerprint(_sha256()) for a in ctx.cache["anchors"].anchors}
    problems = []
    for p in _dp_pods(ctx):
        spec = p["spec"]
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            if c.get("name") != PROXY_CONTAINER:
                continue
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}
            pem = env.get("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")
            name = f"{p['metadata']['namespace']}/{p['metadata']['name']}"
            if not pem:
                problems.append(f"pod {name}: its proxy has no LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")
                continue
            try:
                have = {a.fingerprint(_sha256()) for a in TrustBundle.from_pem(str(pem).encode(), name).anchors}
            except CertificateError as e:
                problems.append(f"pod {name}: {e}")
                continue
            if not have & want:
                problems.append(f"pod {name}: its proxy trusts anchors other than the control plane's: restart it "
                                "(kubectl rollout restart) to pick up the current ones")
    if problems:
        raise CheckFailed("\n".join(problems))


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


DATA_PLANE = Category("linkerd-data-plane", (
    Checker("data plane namespace exists", _dp_exists, "l5d-data-plane-exists", fatal=True),
    Checker("data plane proxies are ready", _dp_ready, "l5d-data-plane-ready"),
    Checker("data plane proxies and cli versions match", _dp_versions, "l5d-data-plane-cli-version", warning=True),
), mode="kube-proxy")

IDENTITY_DATA_PLANE = Category("linkerd-identity-data-plane", (
    Checker("data plane proxies certificate match CA", _dp_anchors, "l5d-identity-data-plane-proxies-certs-match-ca"),
), mode="kube-proxy")


for _category in (KUBERNETES_API, KUBERNETES_VERSION, PRE_KUBERNETES_SETUP, EXISTENCE, CONFIG, KUBE_IDENTITY,
                  WEBHOOKS_TLS, CONTROL_PLANE_PROXY, CONTROL_PLANE_TLS, HA, DATA_PLANE, IDENTITY_DATA_PLANE):
    register_category(_category)
