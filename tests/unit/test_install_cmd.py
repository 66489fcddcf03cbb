"""`tether install/upgrade/uninstall` without a cluster: flags, notices, refusals (one line each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def objects(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def test_controller_resources_apply_everywhere_with_a_notice(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "install", "--set", "controllerResources.memory.limit=300Mi",
                         "--set", "proxyInit.resources.cpu.limit=50m")
    assert code == 0
    assert "notice: controllerResources: applied to every control-plane container" in err
    assert "notice: proxyInit.resources: applied to the init container" in err
    objs = objects(out)
    for name in ("linkerd-identity", "linkerd-destination", "linkerd-proxy-injector"):
        spec = objs[("Deployment", name)]["spec"]["template"]["spec"]
        controller = spec["containers"][1]
        assert controller["resources"] == {"limits": {"memory": "300Mi"}}, name
        assert spec["initContainers"][0]["resources"] == {"limits": {"cpu": "50m"}}


def test_controller_replicas_and_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "install", "--ha", "--controller-replicas", "2", "-L", "mesh")
    assert code == 0
    objs = objects(out)
    assert objs[("Deployment", "linkerd-destination")]["spec"]["replicas"] == 2
    assert objs[("Deployment", "linkerd-destination")]["metadata"]["namespace"] == "mesh"
    assert objs[("PodDisruptionBudget", "linkerd-destination")]["spec"]["maxUnavailable"] == 1
    assert objs[("MutatingWebhookConfiguration", "linkerd-proxy-injector-webhook-config")]["webhooks"][0][
        "failurePolicy"] == "Fail"


@pytest.mark.parametrize(("args", "message"), [
    (["--identity-issuer-certificate-file", "x.crt"],
     "--identity-issuer-certificate-file and --identity-issuer-key-file go together"),
    (["--crds", "--ha"], "--crds prints the CRDs only"),
    (["--set", "dashboard.replicas=2"], "dashboard: unknown value: belongs to the viz extension"),
    (["--set", "webhookFailurePolicy"], "--set 'webhookFailurePolicy': expected KEY=VALUE"),
    (["--set-file", "identityTrustAnchorsPEM=/nonexistent/ca.crt"], "--set-file identityTrustAnchorsPEM="),
    # The control plane's TLS names end with the trust domain; a projected token is how it gets certified.
    (["--set", "identityTrustDomain=Example_Org"], 'identityTrustDomain: "Example_Org" is not a trust domain'),
    (["--set", "clusterDomain=cluster..local"], 'clusterDomain: "cluster..local" is not a trust domain'),
    (["--set", "identity.serviceAccountTokenProjection=false"],
     "identity.serviceAccountTokenProjection: false is not supported"),
])
def test_refusals_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    code, out, err = run(capsys, "install", *args)
    assert code in (1, 2) and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_not_a_pem_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("hello")
    code, _out, err = run(capsys, "install", "--identity-trust-anchors-file", str(bad))
    assert code == 2 and "--identity-trust-anchors-file: not a PEM certificate" in err


def test_external_issuer_without_kubectl_says_what_to_do(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    code, out, err = run(capsys, "install", "--identity-external-issuer")
    assert code == 2 and out == ""
    assert "--identity-trust-anchors-file (the ca.crt of the Secret linkerd-identity-issuer" in err


def test_upgrade_without_an_install(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "none.yaml"
    empty.write_text("")
    code, _out, err = run(capsys, "upgrade", "--from-manifests", str(empty))
    assert code == 1 and "no ConfigMap linkerd-config" in err


def test_rendered_commands_parse_with_the_real_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Every controller's args are flags its command has; the proxy's env is read by the proxy's config."""
    import re

    import click

    from tether.cli.tree import cli
    from tether.core.sidecar import IMAGE_PYTHON, python_argv
    from tether.proxy.config import ProxyConfig

    code, out, _ = run(capsys, "install", "--ha", "--set", "proxy.nativeSidecar=true")
    assert code == 0
    kube_env = {"_pod_name": "web-0", "_pod_ns": "prod", "_pod_nodeName": "node-1", "_pod_sa": "web"}
    for (kind, name), obj in objects(out).items():
        if kind != "Deployment":
            continue
        spec = obj["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        group = cli.get_command(click.Context(cli), "controller")
        assert isinstance(group, click.Group)
        command = group.get_command(click.Context(group), args[1])
        assert command is not None, name
        # The tree's own help options: click caches a command's help option on first use.
        command.make_context(args[1], list(args[2:]), help_option_names=["-h", "--help"])
        proxy = next(c for c in spec["initContainers"] if c["name"] == "linkerd-proxy")
        # What the kubelet does with $(VAR): the earlier variables' values.
        env = {e["name"]: re.sub(r"\$\((\w+)\)", lambda m: kube_env[m.group(1)], e["value"])
               for e in proxy["env"] if "value" in e}
        # The chart's partial runs the proxy as the injector does (-OO, no debug ranges).
        assert proxy["command"] == python_argv(IMAGE_PYTHON) and proxy["args"] == ["proxy"]
        cfg = ProxyConfig.from_env(env)
        assert cfg.identity_name == "web.prod.serviceaccount.identity.linkerd.cluster.local"
        assert cfg.inbound_addr == ("0.0.0.0", 4143) and cfg.admin_addr == ("0.0.0.0", 4191)


def test_generated_issuer_is_named_for_the_control_plane(capsys: pytest.CaptureFixture[str]) -> None:
    import base64

    from cryptography import x509

    code, out, _ = run(capsys, "install", "-L", "mesh", "--set", "identityTrustDomain=example.org")
    assert code == 0
    secret = objects(out)[("Secret", "linkerd-identity-issuer")]
    issuer = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert issuer.subject.rfc4514_string() == "CN=identity.mesh.example.org"


def test_the_control_plane_serves_tls_with_the_names_proxies_expect(capsys: pytest.CaptureFixture[str]) -> None:
    """Identity serves TLS as linkerd-identity; destination certifies itself as linkerd-destination with the
    pod's projected token and the anchors' ConfigMap; neither's TLS port goes through its pod's proxy."""
    from tether.core.install.render import accept_plaintext

    code, out, _ = run(capsys, "install", "-L", "mesh")
    assert code == 0
    objs = objects(out)

    def pod(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
        spec = objs[("Deployment", name)]["spec"]["template"]["spec"]
        args = spec["containers"][1]["args"]
        init = spec["initContainers"][0]["args"]
        return spec, spec["containers"][1], dict(zip(init[0::2], init[1::2], strict=True)) | {"args": args}

    _, identity, identity_init = pod("linkerd-identity")
    # A fresh install has no proxies of an older release to serve: TLS only.
    assert "--tls" in identity["args"] and "--accept-plaintext" not in identity["args"]
    assert identity_init["--inbound-ports-to-ignore"].split(",")[-1] == "8080"
    spec, destination, destination_init = pod("linkerd-destination")
    args = destination["args"]
    flag = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--identity-") or a == "--service-account"}
    assert flag["--identity-addrs"] == "linkerd-identity.mesh.svc.cluster.local:8080"
    assert (flag["--service-account"], flag["--identity-service-account"]) == ("linkerd-destination",
                                                                               "linkerd-identity")
    assert "--accept-plaintext" not in args
    # The token and anchors files are in volumes the container mounts, from the right sources.
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, source in ((flag["--identity-token-path"], "projected"),
                         (flag["--identity-trust-anchors-file"], "configMap")):
        mount = next(m for m in destination["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        assert source in volumes[mount["name"]], (path, volumes[mount["name"]])
    token = volumes["linkerd-identity-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "identity.l5d.io"
    assert volumes["trust-roots"]["configMap"]["name"] == "linkerd-identity-trust-roots"
    assert destination["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 9996}
    assert destination_init["--inbound-ports-to-ignore"].split(",")[-1] == "8086"
    assert destination_init["--outbound-ports-to-ignore"].split(",")[-1] == "8080"
    # The user's values still win over the fresh install's choice.
    code, out, _ = run(capsys, "install", "--set", "controlPlaneTLS.acceptPlaintext=true")
    assert code == 0
    for name in ("linkerd-identity", "linkerd-destination"):
        args = objects(out)[("Deployment", name)]["spec"]["template"]["spec"]["containers"][1]["args"]
        assert "--accept-plaintext" in args and ("--tls" in args or "--identity-addrs" in args)
    # A release's values from before control-plane TLS have no such key: plaintext stays served.
    assert accept_plaintext({"proxy": {}}) is True


def test_upgrade_from_before_control_plane_tls_keeps_plaintext_until_told(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An installed 0.1.0 (values without controlPlaneTLS) upgrades to a control plane that serves its
    proxies in plaintext beside TLS; the upgrade after that keeps it so until --set turns it off."""
    code, out, _ = run(capsys, "install", "-L", "mesh")
    assert code == 0
    objs = objects(out)
    config = objs[("ConfigMap", "linkerd-config")]
    values = yaml.safe_load(config["data"]["values"])
    del values["controlPlaneTLS"]
    config["data"] = {**config["data"], "version": "0.1.0", "values": yaml.safe_dump(values)}
    installed = tmp_path / "installed.yaml"
    installed.write_text(yaml.safe_dump_all([config, objs[("Secret", "linkerd-identity-issuer")],
                                             objs[("Secret", "linkerd-proxy-injector-k8s-tls")]]))

    def plaintext(text: str) -> set[str]:
        return {name for name in ("linkerd-identity", "linkerd-destination")
                if "--accept-plaintext" in objects(text)[("Deployment", name)]["spec"]["template"]["spec"][
                    "containers"][1]["args"]}

    code, upgraded, err = run(capsys, "upgrade", "-L", "mesh", "--from-manifests", str(installed))
    assert code == 0, err
    assert plaintext(upgraded) == {"linkerd-identity", "linkerd-destination"}
    # The next upgrade reads the values this one stored (acceptPlaintext: true) and keeps them.
    again = objects(upgraded)
    installed.write_text(yaml.safe_dump_all([again[("ConfigMap", "linkerd-config")],
                                             again[("Secret", "linkerd-identity-issuer")],
                                             again[("Secret", "linkerd-proxy-injector-k8s-tls")]]))
    code, kept, err = run(capsys, "upgrade", "-L", "mesh", "--from-manifests", str(installed))
    assert code == 0, err
    assert plaintext(kept) == {"linkerd-identity", "linkerd-destination"}
    code, off, err = run(capsys, "upgrade", "-L", "mesh", "--from-manifests", str(installed),
                         "--set", "controlPlaneTLS.acceptPlaintext=false")
    assert code == 0, err
    assert plaintext(off) == set()
