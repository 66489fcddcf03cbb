"""``tether install``, ``tether upgrade``, ``tether uninstall``: the control plane's manifests on stdout,
for ``| kubectl apply -f -`` (or ``kubectl delete -f -``).

The manifests are the charts' (charts/), rendered by tether.core.install with the same values Helm
would get: ``tether install ... --set k=v`` prints what ``helm template`` prints for those values
(tests/kube/test_charts.py compares them). Certificates not given as files are made here: a trust
anchor and an issuer (as ``linkerd install`` does), and the injector's serving certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from tether.cli import chart
from tether.cli.errors import CliError, OperationFailed


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise OperationFailed(f"{flag} {path}: {e.strerror}") from None


def _pem(text: str, flag: str, what: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        if what == "key":
            load_pem_private_key(text.encode(), password=None)
        else:
            x509.load_pem_x509_certificates(text.encode())
    except (ValueError, TypeError) as e:
        raise CliError(f"{flag}: not a PEM {'private key' if what == 'key' else 'certificate'} ({e})") from None
    return text


def issue_pair(now: dt.datetime, namespace: str = "linkerd", trust_domain: str = "cluster.local",
               ) -> tuple[str, str, str]:
    """A new trust anchor and issuer: (anchors PEM, issuer cert PEM, issuer key PEM).

    Named as `linkerd install` names them (root.<ns>.<td>, identity.<ns>.<td>): the identity service
    warns about an issuer named for another control plane.
    """
    from cryptography.hazmat.primitives import serialization

    from tether.core.identity.authority import create_anchor, create_issuer

    anchor, anchor_key = create_anchor(f"root.{namespace}.{trust_domain}", now, dt.timedelta(days=3650))
    issuer, issuer_key = create_issuer(f"identity.{namespace}.{trust_domain}", anchor, anchor_key, now,
                                       dt.timedelta(days=365))
    pem = serialization.Encoding.PEM
    key_pem = issuer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return anchor.public_bytes(pem).decode(), issuer.public_bytes(pem).decode(), key_pem.decode()


def webhook_certificate(namespace: str, now: dt.datetime, hosts: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """A CA and a serving certificate for the injector's Service: (cert PEM, key PEM, CA PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"linkerd-proxy-injector.{namespace}.svc CA")])
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=365)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    dns = f"linkerd-proxy-injector.{namespace}.svc"
    names: list[x509.GeneralName] = [x509.DNSName(dns), x509.DNSName(f"{dns}.cluster.local")]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(pem).decode(), key_pem.decode(), ca.public_bytes(pem).decode()


def _dump(objs: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        click.echo(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}, indent=2))
        return
    click.echo("---\n".join(yaml.safe_dump(o, sort_keys=False) for o in objs), nl=False)


def _notices(layers: dict[str, Any]) -> None:
    if layers.get("controllerResources"):
        click.echo("notice: controllerResources: applied to every control-plane container without its own "
                   "identityResources/destinationResources/proxyInjectorResources (Linkerd reads no such key)",
                   err=True)
    if isinstance(layers.get("proxyInit"), dict) and layers["proxyInit"].get("resources"):
        click.echo("notice: proxyInit.resources: applied to the init container (Linkerd 2.16+ ignores it and "
                   "uses proxy.resources)", err=True)


def _fresh_install() -> dict[str, Any]:
    """What a fresh install sets over the chart's defaults. Plaintext beside control-plane TLS exists for
    the proxies of a release from before it during an upgrade (`tether upgrade` keeps the installed
    value); a new control plane has no such proxies, and `tether check` says when one appears."""
    return {"controlPlaneTLS": {"acceptPlaintext": False}}


def _options(f: Any) -> Any:
    options = [
        click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
                     help="manifest format"),
        click.option("--set-file", "set_files", multiple=True, metavar="KEY=FILE",
                     help="a value read from a file (as helm --set-file)"),
        click.option("--set-string", "set_strings", multiple=True, metavar="KEY=VALUE",
                     help="a value, always a string (as helm --set-string)"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="a value (as helm --set: a.b=c, lists as {x,y}; repeatable, comma-separated)"),
        click.option("-f", "--values", "values_files", multiple=True, metavar="FILE",
                     help="a values file (as helm -f; repeatable, later files win)"),
        click.option("--identity-external-issuer", is_flag=True,
                     help="the issuer Secret linkerd-identity-issuer is made by someone else (cert-manager)"),
        click.option("--identity-issuer-key-file", metavar="FILE", help="the issuer's private key (PEM)"),
        click.option("--identity-issuer-certificate-file", metavar="FILE", help="the issuer certificate (PEM)"),
        click.option("--identity-trust-anchors-file", metavar="FILE", help="the trust anchors (PEM bundle)"),
        click.option("--controller-replicas", type=click.IntRange(1, 100), metavar="N",
                     help="replicas of each control-plane Deployment"),
        click.option("--ha", is_flag=True, help="high availability: the chart's values-ha.yaml first"),
        click.option("--crds", is_flag=True, help="print the CRDs (tether-crds) instead of the control plane"),
        click.option("-L", "--linkerd-namespace", "namespace", default="linkerd", show_default=True, metavar="NS",
                     help="namespace of the control plane"),
    ]
    for option in options:
        f = option(f)
    return f


def _ha_layer(ha: bool) -> list[dict[str, Any]]:
    """values-ha.yaml with --ha: under -f and --set, as `helm install -f values-ha.yaml -f mine.yaml`."""
    first: list[dict[str, Any]] = []
    if ha:
        data = chart.read_yaml(chart.charts_dir() / chart.CONTROL_PLANE / "values-ha.yaml", "values")
        first.append(data or {})
    return first


def _external_anchors(namespace: str) -> str:
    """The ca.crt of the issuer Secret someone else made (cert-manager), read with kubectl (as Linkerd does)."""
    import base64

    hint = ("give the trust anchors with --identity-trust-anchors-file (the ca.crt of the Secret "
            f"linkerd-identity-issuer in namespace {namespace})")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise CliError(f"--identity-external-issuer: kubectl is not on PATH to read the issuer Secret: {hint}")
    r = subprocess.run([kubectl, "get", "-n", namespace, "secret/linkerd-identity-issuer", "-o",
                        "jsonpath={.data.ca\\.crt}"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or not r.stdout.strip():
        why = r.stderr.strip() or "the Secret has no ca.crt"
        raise OperationFailed(f"--identity-external-issuer: cannot read the trust anchors ({why}): {hint}")
    return base64.b64decode(r.stdout.strip()).decode()


def _identity_layer(values: dict[str, Any], anchors_file: str | None, issuer_cert: str | None,
                    issuer_key: str | None, external: bool, controller_replicas: int | None,
                    generate: bool, namespace: str) -> dict[str, Any]:
    from tether.core.inject.values import merge

    layer: dict[str, Any] = {}
    if controller_replicas is not None:
        layer["controllerReplicas"] = controller_replicas
    if external:
        if issuer_cert or issuer_key:
            click.echo("notice: --identity-external-issuer with issuer files: the files make the "
                       "kubernetes.io/tls issuer Secret (Linkerd refuses the combination)", err=True)
        else:
            layer = merge(layer, {"identity": {"externalCA": True, "issuer": {"scheme": "kubernetes.io/tls"}}})
    if anchors_file:
        layer["identityTrustAnchorsPEM"] = _pem(_read(anchors_file, "--identity-trust-anchors-file"),
                                                "--identity-trust-anchors-file", "cert")
    if bool(issuer_cert) != bool(issuer_key):
        raise CliError("--identity-issuer-certificate-file and --identity-issuer-key-file go together")
    if issuer_cert and issuer_key:
        layer = merge(layer, {"identity": {"issuer": {"tls": {
            "crtPEM": _pem(_read(issuer_cert, "--identity-issuer-certificate-file"),
                           "--identity-issuer-certificate-file", "cert"),
            "keyPEM": _pem(_read(issuer_key, "--identity-issuer-key-file"), "--identity-issuer-key-file", "key"),
        }}}})
        if not anchors_file and not merge(values, layer).get("identityTrustAnchorsPEM"):
            raise CliError("--identity-issuer-certificate-file needs --identity-trust-anchors-file (the anchors "
                           "the issuer chains to)")
    merged = merge(values, layer)
    now = dt.datetime.now(dt.UTC)
    if generate and not merged.get("identityTrustAnchorsPEM"):
        if external:
            layer["identityTrustAnchorsPEM"] = _external_anchors(namespace)
            return layer
        if (merged.get("identity") or {}).get("issuer", {}).get("tls", {}).get("crtPEM"):
            raise CliError("identity.issuer.tls.crtPEM is set but identityTrustAnchorsPEM is not")
        domain = merged.get("identityTrustDomain") or merged.get("clusterDomain") or "cluster.local"
        anchors, crt, key = issue_pair(now, namespace, str(domain))
        layer = merge(layer, {"identityTrustAnchorsPEM": anchors,
                              "identity": {"issuer": {"tls": {"crtPEM": crt, "keyPEM": key}}}})
    return layer


def _render(namespace: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    from tether.core.inject.values import ValuesError
    from tether.core.install.render import RenderError, render

    try:
        return render(values, namespace, chart.chart_version())
    except (RenderError, ValuesError) as e:
        raise CliError(str(e)) from None


def _injector_layer(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    injector = values.get("proxyInjector") or {}
    if injector.get("crtPEM") and injector.get("keyPEM") and injector.get("caBundle"):
        return {}
    crt, key, ca = webhook_certificate(namespace, dt.datetime.now(dt.UTC))
    return {"proxyInjector": {"crtPEM": crt, "keyPEM": key, "caBundle": ca}}


def _crds(sets: tuple[str, ...], values_files: tuple[str, ...]) -> list[dict[str, Any]]:
    from tether.core.install.crds import GATEWAY_GROUP, all_crds

    values = chart.checked(chart.user_values(values_files, sets), chart.CRDS)
    return [obj for _, obj in all_crds() if values["installGatewayAPI"] or obj["spec"]["group"] != GATEWAY_GROUP]


@click.command("install", short_help="print the control plane's manifests (or, with --crds, the CRDs)")
@_options
def install(namespace: str, crds: bool, ha: bool, controller_replicas: int | None,
            identity_trust_anchors_file: str | None, identity_issuer_certificate_file: str | None,
            identity_issuer_key_file: str | None, identity_external_issuer: bool, values_files: tuple[str, ...],
            sets: tuple[str, ...], set_strings: tuple[str, ...], set_files: tuple[str, ...], output: str) -> int:
    """Print the manifests of the control plane, for `tether install | kubectl apply -f -`.

    Install the CRDs first: `tether install --crds | kubectl apply -f -`. Values are Linkerd's keys,
    given as with helm (-f, --set, --set-string, --set-file); an unknown key is refused. Without the
    --identity-* files a trust anchor (10 years) and an issuer (1 year) are made; keep them (they are
    in the printed Secret) or, better, make your own and pass them.

    A fresh install serves the control plane over TLS only (controlPlaneTLS.acceptPlaintext=false,
    where the chart's own default is true for upgrades): no proxy of an older release talks to it.
    """
    if crds:
        if identity_trust_anchors_file or identity_issuer_certificate_file or ha or controller_replicas:
            raise CliError("--crds prints the CRDs only: give the control plane's flags without --crds")
        _dump(_crds(sets, values_files), output)
        return 0
    # Under the user's layers: -f and --set may still turn plaintext on.
    first = [_fresh_install(), *_ha_layer(ha)]
    user = chart.user_values(values_files, sets, set_strings, set_files, first=first)
    chart.checked(user)
    layer = _identity_layer(chart.combine_defaults(user), identity_trust_anchors_file,
                            identity_issuer_certificate_file, identity_issuer_key_file, identity_external_issuer,
                            controller_replicas, generate=True, namespace=namespace)
    from tether.core.inject.values import merge

    user = merge(user, layer)
    user = merge(user, _injector_layer(chart.combine_defaults(user), namespace))
    _notices(user)
    _dump(_render(namespace, chart.checked(user)), output)
    return 0


def _installed(namespace: str, from_manifests: str | None) -> tuple[str, dict[str, Any]]:
    """(version, values with private keys) of the installed control plane."""
    import base64

    if from_manifests:
        text = sys.stdin.read() if from_manifests == "-" else _read(from_manifests, "--from-manifests")
        source = from_manifests
    else:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise OperationFailed("upgrade reads the installed control plane with kubectl, which is not on PATH; "
                                  "or pass --from-manifests FILE (kubectl get -n NS configmap/linkerd-config "
                                  "secret/linkerd-identity-issuer secret/linkerd-proxy-injector-k8s-tls -o yaml)")
        r = subprocess.run([kubectl, "get", "-n", namespace, "configmap/linkerd-config", "-o", "yaml"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise OperationFailed(f"no control plane in namespace {namespace} ({r.stderr.strip()}): run "
                                  "`tether install` first")
        text = r.stdout
        for secret in ("linkerd-identity-issuer", "linkerd-proxy-injector-k8s-tls"):
            s = subprocess.run([kubectl, "get", "-n", namespace, f"secret/{secret}", "-o", "yaml"],
                               capture_output=True, text=True, timeout=60)
            if s.returncode == 0:
                text += "\n---\n" + s.stdout
        source = f"the cluster (namespace {namespace})"
    version = ""
    values: dict[str, Any] = {}
    secrets: dict[str, dict[str, str]] = {}
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise CliError(f"{source}: invalid YAML: {' '.join(str(e).split())}") from None
    objs = [item for d in docs if isinstance(d, dict) for item in (d.get("items") or [d])]
    for obj in objs:
        name = (obj.get("metadata") or {}).get("name")
        if obj.get("kind") == "ConfigMap" and name == "linkerd-config":
            version = str((obj.get("data") or {}).get("version", ""))
            values = yaml.safe_load((obj.get("data") or {}).get("values", "")) or {}
        elif obj.get("kind") == "Secret" and isinstance(obj.get("data"), dict):
            secrets[str(name)] = {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
    if not version:
        raise OperationFailed(f"{source}: no ConfigMap linkerd-config with the installed values: is the control "
                              "plane installed (tether install)?")
    from tether.core.inject.values import merge

    issuer = secrets.get("linkerd-identity-issuer")
    if issuer and "tls.crt" in issuer:
        values = merge(values, {"identity": {"issuer": {"tls": {"crtPEM": issuer["tls.crt"],
                                                                "keyPEM": issuer["tls.key"]}}}})
    tls = secrets.get("linkerd-proxy-injector-k8s-tls")
    if tls and "tls.crt" in tls:
        values = merge(values, {"proxyInjector": {"crtPEM": tls["tls.crt"], "keyPEM": tls["tls.key"]}})
    return version, values


@click.command("upgrade", short_help="print the upgraded control plane's manifests")
@_options
@click.option("--from-manifests", metavar="FILE|-",
              help="the installed control plane's linkerd-config ConfigMap and Secrets (kubectl get ... -o yaml), "
                   "instead of reading them with kubectl")
def upgrade(namespace: str, crds: bool, ha: bool, controller_replicas: int | None,
            identity_trust_anchors_file: str | None, identity_issuer_certificate_file: str | None,
            identity_issuer_key_file: str | None, identity_external_issuer: bool, values_files: tuple[str, ...],
            sets: tuple[str, ...], set_strings: tuple[str, ...], set_files: tuple[str, ...], output: str,
            from_manifests: str | None) -> int:
    """Print the control plane of this version with the installed values, for `| kubectl apply -f -`.

    The installed values (the ConfigMap linkerd-config and the issuer and injector Secrets) are
    reused; flags, -f and --set apply over them (as helm upgrade --reuse-values). An upgrade that
    skips a major version is refused. `--crds` prints this version's CRDs.

    From a release before control-plane TLS (0.1.0), the control plane keeps serving plaintext beside
    TLS for the proxies it has not replaced yet; once every meshed pod has restarted (`tether check`
    says so), turn it off: --set controlPlaneTLS.acceptPlaintext=false.
    """
    from tether.core.inject.values import merge
    from tether.core.install.upgrade import UpgradeRefused, check_step

    if crds:
        _dump(_crds(sets, values_files), output)
        return 0
    installed_version, installed = _installed(namespace, from_manifests)
    try:
        check_step(installed_version, chart.chart_version())
    except UpgradeRefused as e:
        raise OperationFailed(str(e)) from None
    first = [installed, *_ha_layer(ha)]
    user = chart.user_values(values_files, sets, set_strings, set_files, first=first)
    chart.checked(user)
    user = merge(user, _identity_layer(chart.combine_defaults(user), identity_trust_anchors_file,
                                       identity_issuer_certificate_file, identity_issuer_key_file,
                                       identity_external_issuer, controller_replicas, generate=False,
                                       namespace=namespace))
    user = merge(user, _injector_layer(chart.combine_defaults(user), namespace))
    _notices(user)
    _dump(_render(namespace, chart.checked(user)), output)
    return 0


@click.command("uninstall", short_help="print what to delete to remove the control plane and the CRDs")
@click.option("-L", "--linkerd-namespace", "namespace", default="linkerd", show_default=True, metavar="NS",
              help="namespace of the control plane")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="manifest format")
def uninstall(namespace: str, output: str) -> int:
    """Print every object of the control plane and the CRDs, for `tether uninstall | kubectl delete -f -`.

    Deleting the CRDs deletes every ServiceProfile, Server, route and policy in the cluster.
    """
    from tether.core.install.crds import all_crds
    from tether.core.install.render import render

    placeholder = "-"
    values = chart.combine_defaults({"identityTrustAnchorsPEM": placeholder, "identity": {"issuer": {"tls": {
        "crtPEM": placeholder, "keyPEM": placeholder}}}, "proxyInjector": {
        "crtPEM": placeholder, "keyPEM": placeholder, "caBundle": placeholder}})
    objs = [*render(values, namespace, chart.chart_version()), *(o for _, o in all_crds())]
    # Namespaced objects first, the Namespace and the CRDs last: kubectl deletes in order.
    objs.sort(key=lambda o: (o["kind"] in ("Namespace", "CustomResourceDefinition"), o["kind"] == "Namespace"))
    _dump([{"apiVersion": o["apiVersion"], "kind": o["kind"],
            "metadata": {k: v for k, v in o["metadata"].items() if k in ("name", "namespace")}} for o in objs],
          output)
    return 0
