"""``tether inject`` / ``tether uninject``: add the proxy to Kubernetes YAML offline, or take it out;
``tether proxy-await``: hold a pod's containers until its proxy is ready (the injected postStart hook).

Like ``linkerd inject``: by default the pod templates get ``linkerd.io/inject: enabled`` (and the
annotations the flags ask for) so the injector adds the proxy when the pods are created; with
``--manual`` the proxy is added here, built by core/inject from the chart values as the injector builds
it. Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, Pods, Namespaces (annotated),
Lists and multi-document streams; everything else passes through unchanged. The summary goes to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from tether import __version__
from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import ADDRESS, DURATION, PORTS

# kind -> where its pod template is (a path of keys from the object).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}


@dataclass
class Report:
    lines: list[str]
    notices: list[str]


def _read(source: str) -> tuple[str, str]:
    if source == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(source).read_text(), source
    except OSError as e:
        raise OperationFailed(f"{source}: {e.strerror}") from None


def _documents(text: str, name: str) -> list[Any]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise CliError(f"{name}: invalid YAML: {where}{problem}") from None


def _objects(doc: Any) -> Iterator[dict[str, Any]]:
    """The objects of a document: itself, or a List's items."""
    if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for item in doc["items"]:
            yield from _objects(item)
    elif isinstance(doc, dict):
        yield doc


def _template(obj: dict[str, Any], where: str) -> dict[str, Any] | None:
    path = TEMPLATES.get(str(obj.get("kind")))
    if path is None:
        return None
    node: Any = obj
    walked = []
    for key in path:
        walked.append(key)
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise CliError(f"{where}: {'.'.join(walked)}: missing or not an object")
    return node


def _describe(obj: Mapping[str, Any]) -> str:
    m = obj.get("metadata")
    meta: Mapping[str, Any] = m if isinstance(m, Mapping) else {}
    return f'{str(obj.get("kind", "object")).lower()} "{meta.get("name", "")}"'


def _where(name: str, index: int, obj: Mapping[str, Any]) -> str:
    m = obj.get("metadata")
    meta: Mapping[str, Any] = m if isinstance(m, Mapping) else {}
    return f"{name}: document {index} ({obj.get('kind', '?')} {meta.get('name', '?')})"


def _dump(docs: list[Any]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False) for d in docs if d is not None)


def _annotations(opts: Mapping[str, Any]) -> dict[str, str]:
    from tether.core.inject import annotations as ann

    out: dict[str, str] = {}
    for flag, key in (("proxy_log_level", ann.LOG_LEVEL), ("default_inbound_policy", ann.DEFAULT_INBOUND_POLICY)):
        if opts.get(flag):
            out[key] = str(opts[flag])
    for flag, key in (("skip_inbound_ports", ann.SKIP_INBOUND), ("skip_outbound_ports", ann.SKIP_OUTBOUND),
                      ("opaque_ports", ann.OPAQUE_PORTS)):
        if opts.get(flag):
            out[key] = ",".join(opts[flag])
    if opts.get("native_sidecar"):
        out[ann.NATIVE_SIDECAR] = "true"
    if opts.get("ingress"):
        out[ann.INJECT] = "ingress"
    return out


@click.command("inject", short_help="add the proxy to Kubernetes YAML (offline), or mark it for the injector")
@click.argument("sources", nargs=-1, required=True, metavar="FILE|-...")
@click.option("--manual", is_flag=True,
              help="add the proxy and init containers here, instead of the annotation the injector acts on")
@click.option("-L", "--linkerd-namespace", "namespace", default="linkerd", show_default=True, metavar="NS",
              help="namespace of the control plane (--manual: the proxy's addresses and identity)")
@click.option("-f", "--values", "values_files", multiple=True, metavar="FILE",
              help="--manual: the control plane's values (as given to tether install or helm)")
@click.option("--identity-trust-anchors-file", metavar="FILE",
              help="--manual: the trust anchors (PEM); else identityTrustAnchorsPEM of --values")
@click.option("--proxy-log-level", metavar="SPEC", help="config.linkerd.io/proxy-log-level")
@click.option("--skip-inbound-ports", type=PORTS, help="config.linkerd.io/skip-inbound-ports")
@click.option("--skip-outbound-ports", type=PORTS, help="config.linkerd.io/skip-outbound-ports")
@click.option("--opaque-ports", type=PORTS, help="config.linkerd.io/opaque-ports")
@click.option("--default-inbound-policy", metavar="POLICY", help="config.linkerd.io/default-inbound-policy")
@click.option("--native-sidecar", is_flag=True, help="config.alpha.linkerd.io/proxy-enable-native-sidecar")
@click.option("--ingress", is_flag=True, help="linkerd.io/inject: ingress")
def inject(sources: tuple[str, ...], manual: bool, namespace: str, values_files: tuple[str, ...],
           identity_trust_anchors_file: str | None, **opts: Any) -> int:
    """Add the proxy to the workloads in FILE (or - for stdin) and print the YAML.

    Without --manual, each pod template gets linkerd.io/inject: enabled and the annotations the flags
    ask for; the injector adds the proxy when the pods are created. With --manual the proxy is added
    here. A document that cannot be injected (a bad annotation) is an error naming the file and the
    document; nothing is printed then.
    """
    from tether.core.inject import InjectError, InjectValues, ValuesError
    from tether.core.inject import annotations as ann
    from tether.core.inject import inject as inject_pod
    from tether.core.inject.pod import pod_problem

    extra = _annotations(opts)
    values: InjectValues | None = None
    if manual:
        from tether.cli import chart

        layers = chart.user_values(values_files, ())
        if identity_trust_anchors_file:
            try:
                pem = Path(identity_trust_anchors_file).read_text()
            except OSError as e:
                raise OperationFailed(f"--identity-trust-anchors-file {identity_trust_anchors_file}: "
                                      f"{e.strerror}") from None
            if "-----BEGIN CERTIFICATE-----" not in pem:
                raise CliError(f"--identity-trust-anchors-file {identity_trust_anchors_file}: not a PEM certificate")
            layers["identityTrustAnchorsPEM"] = pem
        merged = chart.checked(layers)
        if not merged.get("identityTrustAnchorsPEM"):
            raise CliError("--manual needs the trust anchors: --identity-trust-anchors-file FILE, or -f values.yaml "
                           "with identityTrustAnchorsPEM")
        try:
            values = InjectValues.from_values(merged, namespace, __version__)
        except ValuesError as e:
            raise CliError(str(e)) from None
    elif values_files or identity_trust_anchors_file:
        raise CliError("--values and --identity-trust-anchors-file are for --manual")
    out_docs: list[Any] = []
    report = Report([], [])
    for source in sources:
        text, name = _read(source)
        for index, doc in enumerate(_documents(text, name), start=1):
            for obj in _objects(doc):
                where = _where(name, index, obj)
                if obj.get("kind") == "Namespace" and not manual:
                    meta = obj.setdefault("metadata", {})
                    meta["annotations"] = {**(meta.get("annotations") or {}), ann.INJECT: "enabled", **extra}
                    report.lines.append(f"{_describe(obj)} annotated")
                    continue
                tpl = _template(obj, where)
                if tpl is None:
                    continue
                meta = tpl.setdefault("metadata", {})
                anns = {**(meta.get("annotations") or {}), **extra}
                if not manual:
                    anns.setdefault(ann.INJECT, "enabled")
                    if anns[ann.INJECT] == "disabled":
                        report.lines.append(f"{_describe(obj)} skipped ({ann.INJECT}: disabled)")
                        continue
                    try:
                        read = ann.read(anns)
                    except ann.AnnotationError as e:
                        raise CliError(f"{where}: {e}") from None
                    report.notices.extend(f"{where}: {n}" for n in read.notices)
                    meta["annotations"] = anns
                    report.lines.append(f"{_describe(obj)} injected")
                    continue
                assert values is not None
                if extra:
                    meta["annotations"] = anns
                kind = str(obj.get("kind")).lower()
                owner = None if kind == "pod" else (f"linkerd.io/proxy-{kind}",
                                                    str((obj.get("metadata") or {}).get("name", "")))
                problem = pod_problem(tpl)
                if problem is not None:
                    raise CliError(f"{where}: the pod template's {problem}")
                try:
                    result = inject_pod(tpl, {}, values, created_by=f"tether/cli {__version__}",
                                        force=anns.get(ann.INJECT) != "disabled", owner=owner)
                except InjectError as e:
                    raise CliError(f"{where}: {e}") from None
                report.notices.extend(f"{where}: {n}" for n in result.notices)
                if result.injected:
                    tpl.clear()
                    tpl.update(result.pod)
                    report.lines.append(f"{_describe(obj)} injected")
                else:
                    report.lines.append(f"{_describe(obj)} skipped ({result.reason})")
            out_docs.append(doc)
    click.echo(_dump(out_docs), nl=False)
    _summary(report)
    return 0


@click.command("uninject", short_help="remove the proxy from Kubernetes YAML")
@click.argument("sources", nargs=-1, required=True, metavar="FILE|-...")
def uninject(sources: tuple[str, ...]) -> int:
    """Remove what `tether inject` (or the injector) added from the workloads in FILE; print the YAML."""
    from tether.core.inject import uninject as uninject_pod
    from tether.core.inject.annotations import INJECT

    out_docs: list[Any] = []
    report = Report([], [])
    for source in sources:
        text, name = _read(source)
        for index, doc in enumerate(_documents(text, name), start=1):
            for obj in _objects(doc):
                if obj.get("kind") == "Namespace":
                    anns = (obj.get("metadata") or {}).get("annotations") or {}
                    if INJECT in anns:
                        del anns[INJECT]
                        report.lines.append(f"{_describe(obj)} uninjected")
                    continue
                tpl = _template(obj, _where(name, index, obj))
                if tpl is None:
                    continue
                pod, changed = uninject_pod(tpl)
                tpl.clear()
                tpl.update(pod)
                report.lines.append(f"{_describe(obj)} {'uninjected' if changed else 'skipped (not injected)'}")
            out_docs.append(doc)
    click.echo(_dump(out_docs), nl=False)
    _summary(report)
    return 0


def _summary(report: Report) -> None:
    for n in report.notices:
        click.echo(f"notice: {n}", err=True)
    click.echo("", err=True)
    for line in report.lines:
        click.echo(line, err=True)
    click.echo("", err=True)


@click.command("proxy-await", short_help="wait until the pod's proxy is ready (the injected postStart hook)")
@click.option("--admin-port", type=click.IntRange(1, 65535), default=4191, show_default=True,
              help="the proxy's admin port on 127.0.0.1")
@click.option("--timeout", type=DURATION, default="2m", show_default=True, help="give up after this long")
def proxy_await(admin_port: int, timeout: float) -> int:
    """Poll the proxy's /ready until it answers 200 (exit 0), or fail after --timeout (exit 1)."""
    from tether.cli.probe import ProbeError, get

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, _ = get(f"127.0.0.1:{admin_port}", "/ready", timeout=1.0)
            if status == 200:
                return 0
            last = f"HTTP {status}"
        except ProbeError as e:
            last = str(e)
        time.sleep(0.1)  # polling a readiness endpoint: the wait itself is what this command is for
    raise OperationFailed(f"the proxy on 127.0.0.1:{admin_port} was not ready within {timeout:g}s ({last})")


@click.command("injector", short_help="the admission webhooks: proxy injection and resource validation")
@click.option("--addr", type=ADDRESS, default="0.0.0.0:8443", show_default=True,
              help="HTTPS listen address of the webhooks (POST /inject, POST /validate)")
@click.option("--admin-addr", type=ADDRESS, default="127.0.0.1:9995", show_default=True,
              help="admin server: /ready, /ping, /metrics")
@click.option("--controller-namespace", default="linkerd", show_default=True, metavar="NS",
              help="namespace of the control plane (the proxies' addresses and identities)")
@click.option("--tls-cert-file", required=True, metavar="PATH", help="serving certificate (PEM)")
@click.option("--tls-key-file", required=True, metavar="PATH", help="serving key (PEM)")
@click.option("--values-file", required=True, metavar="PATH",
              help="the control plane's values (the linkerd-config ConfigMap's `values`), over the chart's defaults")
@click.option("--kubeconfig", metavar="PATH",
              help="read namespaces with this kubeconfig (default: the pod's service account, else $KUBECONFIG)")
@click.option("--log-level", default="info", show_default=True, metavar="SPEC",
              help="log levels: a level and target=level pairs")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default="plain", show_default=True,
              help="log line format")
def injector(addr: tuple[str, int], admin_addr: tuple[str, int], controller_namespace: str, tls_cert_file: str,
             tls_key_file: str, values_file: str, kubeconfig: str | None, log_level: str, log_format: str) -> int:
    """Serve the mutating webhook that adds the proxy to pods and the validating webhook for the CRDs.

    The proxy is built from --values-file (what `tether install` or helm rendered into the ConfigMap
    linkerd-config; re-read when it changes) and each pod's and namespace's annotations; a bad
    annotation value refuses the pod with the annotation named. The validator answers with
    `tether apply`'s field messages. Runs until SIGTERM or SIGINT.
    """
    import signal
    import threading

    from tether.cli import chart
    from tether.cli.controller_cmd import configure_logging
    from tether.control.injector.server import Injector, Servers, ValuesWatcher
    from tether.core.inject import InjectValues, ValuesError
    from tether.platform.kubeapi import KubeConfigError, NamespaceReader

    listen, admin = addr, admin_addr
    configure_logging(log_level, log_format)
    def load(path: str) -> InjectValues:
        data = chart.read_yaml(Path(path), "--values-file")
        if not isinstance(data, dict):
            raise CliError(f"--values-file {path}: not a map of values")
        try:
            loaded = InjectValues.from_values(chart.checked(data), controller_namespace, __version__)
        except ValuesError as e:
            raise CliError(f"--values-file {path}: {e}") from None
        if not loaded.trust_anchors_pem:
            raise CliError(f"--values-file {path}: identityTrustAnchorsPEM is empty")
        return loaded

    values = load(values_file)
    try:
        namespaces = NamespaceReader.from_environment(kubeconfig)
    except KubeConfigError as e:
        raise CliError(str(e)) from None
    service = Injector(values, namespaces, __version__)
    try:
        servers = Servers(service, listen, admin, tls_cert_file, tls_key_file)
    except OSError as e:
        raise OperationFailed(f"--addr {listen[0]}:{listen[1]} / --admin-addr {admin[0]}:{admin[1]}: "
                              f"{e.strerror or e}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers.start()
    watcher = ValuesWatcher(service, values_file, load)
    watcher.start()
    click.echo(f"injector: webhooks on https://{listen[0]}:{servers.port} (/inject, /validate), admin on "
               f"http://{admin[0]}:{admin[1]}", err=True)
    stop.wait()
    watcher.stop()
    servers.stop()
    return 0
