"""The charts and `tether install/upgrade/uninstall`: the same objects as `helm template` for the same
values; the seeds' install and upgrade command lines run as written (with `tether` for `linkerd`); the
output is accepted by the real API server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether import __version__
from tether.core.inject import InjectValues, merge
from tether.core.inject.annotations import ProxyOverrides
from tether.core.inject.pod import init_container, proxy_container
from tether.core.install.render import CONTROLLER_PROXY
from tether.testing import kubecluster
from tether.testing.kubecluster import KubeCluster, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
SEEDS = Path(os.environ.get("TETHER_SEEDS_DIR", "/work/shared/seeds"))
TETHER = [sys.executable, "-m", "tether"]


def helm_binary() -> Path:
    path = kubecluster.default_bin_dir() / "helm"
    if not path.exists():
        pytest.skip(f"helm is not built ({path}): scripts/kube/build.sh")
    return path


def tether(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TETHER, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env,
                          input=stdin)


def objects(text: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "linkerd-config" and "data" in doc:
            doc["data"]["values"] = yaml.safe_load(doc["data"]["values"])  # toYaml and PyYAML quote differently
        out[(doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])] = doc
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k}: only in {'tether' if k in a else 'helm'}"
            d = first_difference(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: tether {a!r:.120} != helm {b!r:.120}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, issuer.crt, issuer.key made with the seeds' own `step` commands (004), when step is present."""
    d = tmp_path_factory.mktemp("certs")
    step = shutil.which("step") or next(iter(sorted(Path.home().glob(".cache/tether/tools/step-*/step"))), None)
    text = (SEEDS / "004_5f2262f80ae358e5.txt").read_text()
    commands = [" ".join(part.strip().rstrip("\\") for part in m.group(0).splitlines())
                for m in re.finditer(r"^step certificate create (?:.*\\\n)*.*$", text, re.MULTILINE)]
    commands = [c for c in commands if " ca.crt ca.key" in c or " issuer.crt issuer.key" in c]
    if step is not None and len(commands) == 2:
        for c in commands:
            subprocess.run([str(step), *shlex.split(c)[1:]], cwd=d, check=True, capture_output=True, timeout=60)
    else:
        import datetime as dt

        from tether.cli.install_cmd import issue_pair

        anchors, crt, key = issue_pair(dt.datetime.now(dt.UTC))
        (d / "ca.crt").write_text(anchors)
        (d / "issuer.crt").write_text(crt)
        (d / "issuer.key").write_text(key)
    import datetime as dt

    from tether.cli.install_cmd import webhook_certificate

    crt, key, ca = webhook_certificate("linkerd", dt.datetime.now(dt.UTC))
    (d / "webhook.crt").write_text(crt)
    (d / "webhook.key").write_text(key)
    (d / "webhook-ca.crt").write_text(ca)
    return d


FILE_FLAGS = ["--identity-trust-anchors-file", "ca.crt", "--identity-issuer-certificate-file", "issuer.crt",
              "--identity-issuer-key-file", "issuer.key", "--set-file", "proxyInjector.crtPEM=webhook.crt",
              "--set-file", "proxyInjector.keyPEM=webhook.key", "--set-file", "proxyInjector.caBundle=webhook-ca.crt"]
HELM_FILES = ["--set-file", "identityTrustAnchorsPEM=ca.crt", "--set-file", "identity.issuer.tls.crtPEM=issuer.crt",
              "--set-file", "identity.issuer.tls.keyPEM=issuer.key", "--set-file", "proxyInjector.crtPEM=webhook.crt",
              "--set-file", "proxyInjector.keyPEM=webhook.key", "--set-file", "proxyInjector.caBundle=webhook-ca.crt"]


@pytest.mark.parametrize(("tether_args", "helm_args"), [
    ([], []),
    (["--ha"], ["-f", str(CHARTS / "tether-control-plane" / "values-ha.yaml")]),
    (["--ha", "--controller-replicas", "2", "--set", "proxyInit.runAsRoot=false"],
     ["-f", str(CHARTS / "tether-control-plane" / "values-ha.yaml"), "--set", "controllerReplicas=2",
      "--set", "proxyInit.runAsRoot=false"]),
    (["--set", "proxy.nativeSidecar=true,proxy.logLevel=debug,podMonitor.enabled=true,enablePodAntiAffinity=true",
      "--set", "proxy.resources.cpu.limit=1,proxyInit.skipSubnets=10.9.0.0/16,identity.issuer.scheme=kubernetes.io/tls",
      "--set", "controllerResources.memory.limit=300Mi", "-L", "mesh"],
     ["--set", "proxy.nativeSidecar=true,proxy.logLevel=debug,podMonitor.enabled=true,enablePodAntiAffinity=true",
      "--set", "proxy.resources.cpu.limit=1,proxyInit.skipSubnets=10.9.0.0/16,identity.issuer.scheme=kubernetes.io/tls",
      "--set", "controllerResources.memory.limit=300Mi"]),
], ids=["default", "ha", "ha-replicas", "many-values"])
def test_install_renders_what_helm_template_renders(certs: Path, tether_args: list[str],
                                                    helm_args: list[str]) -> None:
    ns = tether_args[tether_args.index("-L") + 1] if "-L" in tether_args else "linkerd"
    mine = tether("install", *FILE_FLAGS, *tether_args, cwd=certs)
    assert mine.returncode == 0, mine.stderr
    # `tether install` is a fresh install: TLS only, where the chart's default serves plaintext too (for
    # `helm upgrade` from a release before control-plane TLS).
    theirs = subprocess.run([str(helm_binary()), "template", "linkerd", str(CHARTS / "tether-control-plane"),
                             "-n", ns, *HELM_FILES, "--set", "controlPlaneTLS.acceptPlaintext=false", *helm_args],
                            capture_output=True, text=True, cwd=certs, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    a, b = objects(mine.stdout), objects(theirs.stdout)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], f"{key}: {first_difference(a[key], b[key])}"
    # The control-plane pods' proxy is the injector's: core/inject builds the same containers from the values.
    values = merge(yaml.safe_load((CHARTS / "tether-control-plane" / "values.yaml").read_text()),
                   b[("ConfigMap", ns, "linkerd-config")]["data"]["values"])
    v = InjectValues.from_values(values, ns, __version__)
    for key, obj in b.items():
        if key[0] != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        every = {c["name"]: c for c in (*spec["initContainers"], *spec["containers"])}
        assert every["linkerd-proxy"] == proxy_container(v, ProxyOverrides(), v.native_sidecar), key
        # proxy-init leaves alone the ports where the controllers terminate their own TLS.
        assert every["linkerd-init"] == init_container(v, CONTROLLER_PROXY[key[2]]), key


def test_crds_render_what_helm_template_renders() -> None:
    no_gateway = ["--set", "installGatewayAPI=false"]
    for tether_set, helm_set in (([], []), (no_gateway, no_gateway)):
        mine = tether("install", "--crds", *tether_set)
        assert mine.returncode == 0, mine.stderr
        theirs = subprocess.run([str(helm_binary()), "template", "t", str(CHARTS / "tether-crds"), *helm_set],
                                capture_output=True, text=True, timeout=120)
        assert theirs.returncode == 0, theirs.stderr
        assert objects(mine.stdout) == objects(theirs.stdout)
    assert len(objects(tether("install", "--crds").stdout)) == 14


def test_unknown_value_is_refused_by_tether_and_helm(certs: Path) -> None:
    mine = tether("install", *FILE_FLAGS, "--set", "proxy.logLevle=debug", cwd=certs)
    assert mine.returncode == 2
    assert mine.stderr.strip().splitlines() == [
        "tether install: values: proxy.logLevle: unknown value (known here: await, defaultInboundPolicy, "
        "enableShutdownEndpoint, gid, image, inboundConnectTimeout, logFormat, logLevel, nativeSidecar, opaquePorts, "
        "outboundConnectTimeout, outboundDiscoveryCacheUnusedTimeout, ports, resources, shutdownGracePeriod, uid, "
        "waitBeforeExitSeconds)"]
    theirs = subprocess.run([str(helm_binary()), "template", "t", str(CHARTS / "tether-control-plane"), *HELM_FILES,
                             "--set", "proxy.logLevle=debug"], capture_output=True, text=True, cwd=certs, timeout=120)
    assert theirs.returncode != 0 and "logLevle" in theirs.stderr


@pytest.mark.parametrize("bad", ["identityTrustDomain=Example_Org", "clusterDomain=cluster..local",
                                 "identity.serviceAccountTokenProjection=false"])
def test_values_the_control_plane_tls_cannot_use_are_refused_alike(certs: Path, bad: str) -> None:
    mine = tether("install", *FILE_FLAGS, "--set", bad, cwd=certs)
    assert mine.returncode == 2 and mine.stdout == ""
    message = mine.stderr.strip().removeprefix("tether install: ")
    assert message.startswith(bad.split("=")[0] + ":"), message
    theirs = subprocess.run([str(helm_binary()), "template", "t", str(CHARTS / "tether-control-plane"), *HELM_FILES,
                             "--set", bad], capture_output=True, text=True, cwd=certs, timeout=120)
    assert theirs.returncode != 0 and message in theirs.stderr, (message, theirs.stderr)


def seed_commands(verb: str) -> list[tuple[str, str]]:
    """(seed file, command) for every `linkerd <verb> ...` command line of the seeds, continuations joined."""
    out = []
    for path in sorted(SEEDS.glob("*.txt")):
        text = path.read_text()
        for m in re.finditer(rf"^(?:\$ )?linkerd {verb}\b(?:.*\\\n)*.*$", text, re.MULTILINE):
            line = " ".join(part.strip().rstrip("\\").strip() for part in m.group(0).splitlines())
            line = line.removeprefix("$ ").split("|")[0].strip()
            out.append((path.name, line))
    return out


def apply(cluster: KubeCluster, manifests: str) -> str:
    return cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=manifests, timeout=120)


@pytest.fixture
def clean_install(kube_cluster: KubeCluster) -> Iterator[list[str]]:
    """Yields the list of control-plane namespaces a test installs into ("linkerd" unless it says);
    afterwards `tether uninstall` of each is deleted, waiting until it is gone (the next test may
    install the same cluster-scoped objects)."""
    namespaces: list[str] = []
    yield namespaces
    for ns in namespaces or ["linkerd"]:
        out = tether("uninstall", "-L", ns)
        kube_cluster.delete("-f", "-", stdin=out.stdout)


def test_seed_install_and_upgrade_lines_run_as_written(kube_cluster: KubeCluster, certs: Path,
                                                       clean_install: list[str]) -> None:
    installs, upgrades = seed_commands("install"), seed_commands("upgrade")
    assert [c for _, c in installs if "viz" not in c and "jaeger" not in c and "multicluster" not in c]
    env = {**kube_cluster.env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{kube_cluster.env()['PATH']}"}
    seen = set()
    # The CRDs first, then each install line of the seeds (plain, HA, with the seed's files), then upgrades.
    ordered = sorted(installs, key=lambda sc: "--crds" not in sc[1]) + upgrades
    for seed, line in ordered:
        words = shlex.split(line)
        if words[1] != "install" and words[1] != "upgrade":
            continue
        if any(w in ("viz", "jaeger", "multicluster", "multi-cluster") for w in words[1:3]):
            continue  # extensions: another issue's
        args = words[1:]
        if "--identity-external-issuer" in args:
            # cert-manager made the issuer Secret (as in 003): its ca.crt holds the anchors tether reads.
            secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                      "metadata": {"name": "linkerd-identity-issuer", "namespace": "linkerd"},
                      "data": {k: base64.b64encode((certs / f).read_bytes()).decode() for k, f in
                               (("tls.crt", "issuer.crt"), ("tls.key", "issuer.key"), ("ca.crt", "ca.crt"))}}
            apply(kube_cluster, yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace",
                                                "metadata": {"name": "linkerd"}}) + "---\n" + yaml.safe_dump(secret))
        r = subprocess.run([*TETHER, *args], capture_output=True, text=True, timeout=120, cwd=certs, env=env)
        seen.add(" ".join(args))
        if "linkerd-sip.tls.crt=issuer.crt" in line:
            # 004's install sets a value that does not exist: refused, naming the real keys (nothing applied).
            assert r.returncode == 2, (seed, line, r.stdout[:200])
            assert "linkerd-sip: unknown value" in r.stderr and "identity.issuer.tls.crtPEM" in r.stderr
            # The same line without the two bogus --set-file flags works.
            fixed = [a for a in args if "linkerd-sip" not in a]
            fixed = [a for i, a in enumerate(fixed) if not (a == "--set-file" and (i + 1 == len(fixed) or
                                                                                    fixed[i + 1].startswith("-")))]
            r = subprocess.run([*TETHER, *fixed], capture_output=True, text=True, timeout=120, cwd=certs, env=env)
        assert r.returncode == 0, (seed, line, r.stderr)
        if "--identity-external-issuer" in args:
            # The anchors are cert-manager's (the Secret's ca.crt), and the chart makes no issuer Secret.
            made = objects(r.stdout)
            assert made[("ConfigMap", "linkerd", "linkerd-identity-trust-roots")]["data"]["ca-bundle.crt"] == (
                certs / "ca.crt").read_text()
            assert ("Secret", "linkerd", "linkerd-identity-issuer") not in made
        apply(kube_cluster, r.stdout)
    assert any("--ha" in s for s in seen) and any(s.startswith("upgrade") for s in seen)
    # What was applied last is there: the control plane's Deployments, webhooks, the CRDs.
    deployments = json.loads(kube_cluster.kubectl("get", "deployments", "-n", "linkerd", "-o", "json"))["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [
        "linkerd-destination", "linkerd-identity", "linkerd-proxy-injector"]
    kube_cluster.kubectl("get", "crd", "servers.policy.linkerd.io", "serviceprofiles.linkerd.io")
    hook = json.loads(kube_cluster.kubectl("get", "mutatingwebhookconfiguration",
                                           "linkerd-proxy-injector-webhook-config", "-o", "json"))
    assert hook["webhooks"][0]["namespaceSelector"]["matchExpressions"][0] == {
        "key": "config.linkerd.io/admission-webhooks", "operator": "NotIn", "values": ["disabled"]}


def test_ha_manifests_are_accepted_and_have_replicas_pdbs_and_anti_affinity(
        kube_cluster: KubeCluster, certs: Path, clean_install: list[str]) -> None:
    ns = "t-ha"
    clean_install.append(ns)
    crds = tether("install", "--crds")
    apply(kube_cluster, crds.stdout)
    r = tether("install", "--ha", "-L", ns, *FILE_FLAGS, cwd=certs)
    assert r.returncode == 0, r.stderr
    apply(kube_cluster, r.stdout)
    for name in ("linkerd-identity", "linkerd-destination", "linkerd-proxy-injector"):
        d = json.loads(kube_cluster.kubectl("get", "deployment", name, "-n", ns, "-o", "json"))
        assert d["spec"]["replicas"] == 3
        anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
        pdb = json.loads(kube_cluster.kubectl("get", "pdb", name, "-n", ns, "-o", "json"))
        assert pdb["spec"]["maxUnavailable"] == 1
    hook = json.loads(kube_cluster.kubectl("get", "mutatingwebhookconfiguration",
                                           "linkerd-proxy-injector-webhook-config", "-o", "json"))
    assert hook["webhooks"][0]["failurePolicy"] == "Fail"
    # The three kwok nodes take one replica each (required anti-affinity by hostname).
    def spread() -> bool:
        pods = json.loads(kube_cluster.kubectl("get", "pods", "-n", ns, "-l",
                                               "linkerd.io/control-plane-component=destination", "-o", "json"))
        nodes = {p["spec"].get("nodeName") for p in pods["items"]}
        return len(pods["items"]) == 3 and None not in nodes and len(nodes) == 3
    wait_until(spread, timeout=90, what="three destination pods on three nodes")


def test_upgrade_reuses_the_installed_values_and_refuses_skipping_a_major(certs: Path, tmp_path: Path) -> None:
    installed = tether("install", "--ha", *FILE_FLAGS, cwd=certs)
    assert installed.returncode == 0, installed.stderr
    kept = [d for d in yaml.safe_load_all(installed.stdout) if d and d["metadata"]["name"] in (
        "linkerd-config", "linkerd-identity-issuer", "linkerd-proxy-injector-k8s-tls")]
    manifests = tmp_path / "installed.yaml"
    manifests.write_text(yaml.safe_dump_all(kept))
    upgraded = tether("upgrade", "--from-manifests", str(manifests))
    assert upgraded.returncode == 0, upgraded.stderr
    assert objects(upgraded.stdout) == objects(installed.stdout)
    more = tether("upgrade", "--from-manifests", str(manifests), "--set", "controllerReplicas=5")
    deployment = objects(more.stdout)[("Deployment", "linkerd", "linkerd-identity")]
    assert deployment["spec"]["replicas"] == 5
    for doc in kept:
        if doc["metadata"]["name"] == "linkerd-config":
            doc["data"]["version"] = "2.3.0"
    manifests.write_text(yaml.safe_dump_all(kept))
    refused = tether("upgrade", "--from-manifests", str(manifests))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == (
        f"tether upgrade: the control plane runs 2.3.0; downgrading to {__version__} skips 1.x: each major version's "
        "upgrade migrates what the next one expects (resources, values, the proxies' API), so step through one "
        "major version at a time")


def test_install_without_files_makes_working_certificates() -> None:
    from cryptography import x509

    r = tether("install")
    assert r.returncode == 0, r.stderr
    objs = objects(r.stdout)
    secret = objs[("Secret", "linkerd", "linkerd-identity-issuer")]
    issuer = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    anchor = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    issuer.verify_directly_issued_by(anchor)
    tls = objs[("Secret", "linkerd", "linkerd-proxy-injector-k8s-tls")]
    serving = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "linkerd-proxy-injector.linkerd.svc" in sans.get_values_for_type(x509.DNSName)
    hook = objs[("MutatingWebhookConfiguration", "", "linkerd-proxy-injector-webhook-config")]
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["webhooks"][0]["clientConfig"]["caBundle"]))
    serving.verify_directly_issued_by(ca)


def test_uninstall_lists_everything_install_makes() -> None:
    listed = objects(tether("uninstall").stdout)
    made = objects(tether("install").stdout) | objects(tether("install", "--crds").stdout)
    assert set(made) <= set(listed)
    order = [k for k in listed]
    assert order[-1][0] == "Namespace"


def test_helm_install_and_upgrade_from_the_chart(kube_cluster: KubeCluster, certs: Path) -> None:
    """The seeds' production path (001): helm install with values-ha.yaml, then helm upgrade --reuse-values."""
    crds = tether("install", "--crds")
    apply(kube_cluster, crds.stdout)
    ns = "t-helm"
    chart = str(CHARTS / "tether-control-plane")
    # The --set-file paths of HELM_FILES, made absolute (helm runs in the test's directory).
    files = [f if "=" not in f else f"{f.split('=')[0]}={certs / f.split('=')[1]}" for f in HELM_FILES]
    try:
        kube_cluster.helm("install", "tether", chart, "-n", ns, "--create-namespace", "--set", "installNamespace=false",
                          "-f", str(CHARTS / "tether-control-plane" / "values-ha.yaml"), *files)
        listed = json.loads(kube_cluster.helm("list", "-n", ns, "-o", "json"))
        assert [(r["name"], r["status"]) for r in listed] == [("tether", "deployed")]
        d = json.loads(kube_cluster.kubectl("get", "deployment", "linkerd-destination", "-n", ns, "-o", "json"))
        assert d["spec"]["replicas"] == 3
        kube_cluster.helm("upgrade", "tether", chart, "-n", ns, "--reuse-values", "--set", "controllerReplicas=2")
        d = json.loads(kube_cluster.kubectl("get", "deployment", "linkerd-destination", "-n", ns, "-o", "json"))
        assert d["spec"]["replicas"] == 2
        # The values the release keeps are what `tether upgrade` reads back (the ConfigMap linkerd-config).
        cm = json.loads(kube_cluster.kubectl("get", "configmap", "linkerd-config", "-n", ns, "-o", "json"))
        assert yaml.safe_load(cm["data"]["values"])["controllerReplicas"] == 2
        assert cm["data"]["version"] == __version__
    finally:
        if "tether" in kube_cluster.helm("list", "-n", ns, "-q"):
            kube_cluster.helm("uninstall", "tether", "-n", ns)
