"""The local mesh: ``tether up``, ``down``, ``status``, ``run``, ``scale``, ``rm``, ``logs``, ``exec``.

``up`` starts a supervisor (tether.platform.local.supervisor) in the background for a state
directory; the other commands talk to it through that directory: ``run`` writes a workload spec the
supervisor turns into pods, and everything reads back the ``status.json`` it keeps.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import Column, dump, emit, output_option
from tether.cli.params import DNS_LABEL, POSITIVE_DURATION, control_plane_options, state_dir_option

DEFAULT_BRIDGE = "tether0"
DEFAULT_POD_CIDR = "10.234.0.0/16"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
# Entries of the state directory `tether up` may create; `tether down` removes those it did create.
STATE_ENTRIES = ("mesh.json", "supervisor.pid", "supervisor.log", "status.json", "specs", "services.json",
                 "resources", "workloads", "tokens", "ca", "logs", "control-plane", "addons", "scrape", "viz")


def _layout(state_dir: str) -> Any:
    from tether.platform.local.layout import Layout

    return Layout(state_dir)


def _need_root(command: str) -> None:
    if os.geteuid() != 0:
        raise OperationFailed(f"tether {command} needs root: pods are network namespaces on a bridge, with "
                              "iptables rules (run it with sudo)")


def _network(value: str, flag: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise CliError(f"{flag} {value!r}: not a network like 10.234.0.0/16 ({e})") from None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 28:
        raise CliError(f"{flag} {value!r}: must be an IPv4 network of at least 16 addresses (/28 or larger)")
    return net


def _settings_or_fail(layout: Any) -> Any:
    from tether.platform.local.layout import LayoutError

    try:
        return layout.read_settings()
    except LayoutError as e:
        raise OperationFailed(str(e)) from None


def _running_or_fail(layout: Any) -> Any:
    settings = _settings_or_fail(layout)
    if layout.supervisor_pid() is None:
        raise OperationFailed(f"--state-dir {layout.root}: the mesh is not running (start it: tether up "
                              f"--state-dir {layout.root})")
    return settings


def _wait(cond: Any, timeout: float, what: str, layout: Any, alive: Any = None) -> Any:
    """Poll ``cond`` until truthy; fail when the supervisor is gone (``alive`` says so) or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if not (alive() if alive is not None else layout.supervisor_pid() is not None):
            raise OperationFailed(f"the supervisor exited while waiting for {what}; see {layout.log_path}")
        if time.monotonic() > deadline:
            raise OperationFailed(f"timed out after {timeout:g}s waiting for {what} (tether status --state-dir "
                                  f"{layout.root})")
        time.sleep(0.05)


# --- up -----------------------------------------------------------------------------------------


@click.command("up", short_help="start the local control plane (identity, destination) on this host")
@state_dir_option
@click.option("--ha", is_flag=True, help="run three replicas of each control-plane service")
@click.option("--explicit", is_flag=True,
              help="no bridge and no network namespaces (no root needed): the control plane on 127.0.0.1, "
              "workloads only with `tether run --explicit`")
@click.option("--identity-trust-anchors-file", "anchors", type=click.Path(dir_okay=False), metavar="PATH",
              help="trust anchors (PEM); with the two issuer flags  [default: a new CA for trying things out]")
@click.option("--identity-issuer-certificate-file", "issuer_cert", type=click.Path(dir_okay=False), metavar="PATH",
              help="issuer certificate (PEM)")
@click.option("--identity-issuer-key-file", "issuer_key", type=click.Path(dir_okay=False), metavar="PATH",
              help="issuer private key (PEM)")
@click.option("--bridge", default=DEFAULT_BRIDGE, show_default=True, metavar="NAME",
              help="the host bridge the pods are attached to (created)")
@click.option("--pod-cidr", default=DEFAULT_POD_CIDR, show_default=True, metavar="CIDR",
              help="pod addresses; the first is the bridge's, where the control plane listens")
@click.option("--service-cidr", default=DEFAULT_SERVICE_CIDR, show_default=True, metavar="CIDR",
              help="virtual IPs of Services")
@control_plane_options
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="how long to wait for the control plane to be ready")
@click.option("--foreground", is_flag=True, help="run the supervisor in this process (logs on stderr)")
@output_option(("text", "json"), default="text")
def up(state_dir: str, ha: bool, explicit: bool, anchors: str | None, issuer_cert: str | None,
       issuer_key: str | None, bridge: str, pod_cidr: str, service_cidr: str, controller_namespace: str,
       trust_domain: str, timeout: float, foreground: bool, output: str) -> int:
    """Start the local mesh's control plane on this host, under a supervisor that restarts it.

    Runs the identity and destination services (the destination service also serves the policy
    API), one of each or, with --ha, three. Without --identity-* files a trust anchor and issuer are
    made for trying things out; production brings its own. Running it again on a running mesh
    only waits for it to be ready. Then: `tether run`, `tether apply -f`, `tether status`,
    `tether down`.
    """
    from tether.platform.local import network
    from tether.platform.local.layout import MeshSettings, loopback_cidr, new_mesh_id
    from tether.platform.local.supervisor import serve

    layout = _layout(state_dir)
    if foreground:
        if not _settings_or_fail(layout).explicit_only:
            _need_root("up")
        return serve(layout)
    started = time.monotonic()
    if layout.supervisor_pid() is not None:
        settings = _settings_or_fail(layout)
        if settings.ha != ha:
            click.echo(f"note: the mesh is already up with --ha={settings.ha}; tether down first to change it",
                       err=True)
        action = "already up"
    else:
        if not explicit and os.geteuid() != 0:
            raise OperationFailed("tether up needs root for pods in network namespaces (run it with sudo), or "
                                  "--explicit for workloads without them (tether run --explicit)")
        given = [anchors, issuer_cert, issuer_key]
        if any(given) and not all(given):
            raise CliError("--identity-trust-anchors-file, --identity-issuer-certificate-file and "
                           "--identity-issuer-key-file go together: give all three or none")
        for flag, path in zip(("--identity-trust-anchors-file", "--identity-issuer-certificate-file",
                               "--identity-issuer-key-file"), given, strict=True):
            if path is not None and not Path(path).is_file():
                raise CliError(f"{flag} {path}: no such file")
        pods, svcs = _network(pod_cidr, "--pod-cidr"), _network(service_cidr, "--service-cidr")
        if pods.overlaps(svcs):
            raise CliError(f"--service-cidr {service_cidr} overlaps --pod-cidr {pod_cidr}")
        if not 0 < len(bridge) <= network.IFNAME_MAX or not all(c.isalnum() or c in "-_." for c in bridge):
            raise CliError(f"--bridge {bridge!r}: an interface name of 1-15 letters, digits, '-', '_', '.'")
        old = None
        if layout.settings_path.exists():
            old = _settings_or_fail(layout)  # a mesh that stopped (or crashed): reuse its settings
        if not explicit and (old is None or (old.bridge, old.pod_cidr) != (bridge, pod_cidr)):
            if network.link_exists(bridge):
                raise CliError(f"--bridge {bridge}: an interface with that name exists already (another mesh? "
                               "pick another --bridge)")
            for net, flag in ((pods, "--pod-cidr"), (svcs, "--service-cidr")):
                used = network.addresses_in_use(net)
                if used:
                    raise CliError(f"{flag} {net}: overlaps addresses on this host: {', '.join(used)}")
        created = not layout.root.exists()
        made = [] if created else [e for e in STATE_ENTRIES if not (layout.root / e).exists()]
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"--state-dir {state_dir}: cannot create: {e.strerror}") from None
        generated = False
        if not anchors:
            generated = True
            anchors, issuer_cert, issuer_key = (str(layout.ca_dir / n) for n in ("ca.crt", "tls.crt", "tls.key"))
            if not Path(issuer_key).exists():
                r = subprocess.run([sys.executable, "-m", "tether", "identity", "create-ca", "--out",
                                    str(layout.ca_dir), "-L", controller_namespace, "--identity-trust-domain",
                                    trust_domain], capture_output=True, text=True, timeout=120)
                if r.returncode != 0:
                    raise OperationFailed(f"cannot create a CA in {layout.ca_dir}: {r.stderr.strip()}")
        assert issuer_cert is not None and issuer_key is not None
        if old is not None and (old.ha, old.explicit_only) == (ha, explicit) and (
                explicit or (old.bridge, old.pod_cidr) == (bridge, pod_cidr)):
            settings = old
        else:
            mesh_id = old.mesh_id if old else new_mesh_id()
            settings = MeshSettings(
                mesh_id=mesh_id, bridge="" if explicit else bridge, pod_cidr=str(pods),
                explicit_only=explicit, loopback_cidr=loopback_cidr(mesh_id),
                service_cidr=str(svcs), ha=ha, controller_namespace=controller_namespace,
                trust_domain=trust_domain, trust_anchors=str(Path(anchors).absolute()),
                issuer_certificate=str(Path(issuer_cert).absolute()), issuer_key=str(Path(issuer_key).absolute()),
                generated_ca=generated, created_state_dir=old.created_state_dir if old else created,
                made=old.made if old else made)
        layout.write_settings(settings)
        layout.status_path.unlink(missing_ok=True)
        with open(layout.log_path, "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "tether", "up", "--foreground", "--state-dir", str(layout.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
        _wait(lambda: layout.supervisor_pid() is not None or layout.read_status().get("error"), 20,
              "the supervisor to start", layout, alive=lambda: child.poll() is None)
        action = "started"
    status = _wait(lambda: _ready_status(layout), timeout, "the control plane to be ready", layout)
    settings = _settings_or_fail(layout)
    elapsed = time.monotonic() - started
    doc = {"stateDir": str(layout.root), "action": action, "readySeconds": round(elapsed, 3),
           "bridge": settings.bridge, "podCIDR": settings.pod_cidr, "serviceCIDR": settings.service_cidr,
           "identity": settings.identity_addrs, "destination": settings.destination_addrs,
           "destinationPlaintext": settings.destination_local_addrs,
           "trustAnchors": settings.trust_anchors, "generatedCA": settings.generated_ca,
           "components": status["components"]}
    if output == "json":
        dump(doc, "json")
        return 0
    click.echo(f"tether up: control plane {action}, ready in {elapsed:.2f}s (state {layout.root})")
    click.echo(f"  identity     {', '.join(settings.identity_addrs)} (TLS)")
    click.echo(f"  destination  {', '.join(settings.destination_addrs)} (mutual TLS; also serves inbound and outbound "
               "policy)")
    if settings.destination_local_addrs:
        click.echo(f"               {', '.join(settings.destination_local_addrs)} (plaintext, this host only: "
                   "tether diagnostics --destination-addr)")
    if settings.explicit_only:
        click.echo("  pods         --explicit only (no root: no network namespaces; HTTP and gRPC through HTTP_PROXY, "
                   "no transparent TCP)")
    else:
        click.echo(f"  pods         bridge {settings.bridge}, {settings.pod_cidr}; Services {settings.service_cidr}")
    if settings.join_addr and not settings.agent:
        click.echo(f"  other hosts  tether join --control-plane {settings.join_addr} --token "
                   f"{layout.join_token_path} (copy the token file to the other host)")
    if settings.generated_ca:
        click.echo(f"  trust anchor {settings.trust_anchors} was made for trying tether out: production brings its "
                   "own (--identity-trust-anchors-file, --identity-issuer-certificate-file, "
                   "--identity-issuer-key-file)")
    click.echo(f"next: tether run --state-dir {layout.root} NAME --port 8080 -- COMMAND; tether status; tether down")
    return 0


def _ready_status(layout: Any) -> dict[str, Any] | None:
    status = layout.read_status()
    if status.get("error"):
        raise OperationFailed(f"tether up failed: {status['error']} (log: {layout.log_path})")
    return status if status.get("controlPlaneReady") else None


# --- down ---------------------------------------------------------------------------------------


@click.command("down", short_help="stop the local mesh and remove everything it made")
@state_dir_option
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="how long pods get to stop before they are killed")
def down(state_dir: str, timeout: float) -> int:
    """Stop every pod (application first, then its proxy) and the control plane, and remove the
    network namespaces, interfaces, bridge, iptables rules, processes and files `tether up` made,
    including the state directory's resources and logs."""
    from tether.platform.local.layout import pid_alive
    from tether.platform.local.supervisor import iter_pids, teardown

    layout = _layout(state_dir)
    if not layout.settings_path.exists():
        click.echo(f"tether down: no mesh in {layout.root}; nothing to do")
        return 0
    settings = _settings_or_fail(layout)
    if not settings.explicit_only:
        _need_root("down")
    status = layout.read_status()
    pid = layout.supervisor_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            click.echo(f"tether down: the supervisor (pid {pid}) did not stop in time; killing it", err=True)
            os.kill(pid, signal.SIGKILL)
    # What a killed supervisor could not clean up: its children, then the network.
    marks = [str(layout.root).encode(), str(layout.runtime_dir(settings)).encode()]
    for p in status.get("pods", []):
        marks.append(f"POD_NAME={p['name']}\0POD_NAMESPACE={p['namespace']}\0".encode())
    for child in iter_pids(status):
        # Only a process that is still ours: a pid may have been reused since the status was written.
        if pid_alive(child) and _mentions(child, marks):
            try:
                os.killpg(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    teardown(layout, settings)
    if settings.created_state_dir:
        shutil.rmtree(layout.root, ignore_errors=True)
    else:
        for entry in settings.made:
            path = layout.root / entry
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    npods = len(status.get("pods", []))
    files = layout.root if settings.created_state_dir else "the files it made"
    network = "" if settings.explicit_only else f"bridge {settings.bridge}, the pods' namespaces and "
    click.echo(f"tether down: stopped {npods} pod{'s' * (npods != 1)} and the control plane; removed {network}{files}")
    return 0


def _mentions(pid: int, marks: list[bytes]) -> bool:
    """Whether the process's command line or environment holds one of ``marks``."""
    data = b""
    for name in ("cmdline", "environ"):
        try:
            data += Path(f"/proc/{pid}/{name}").read_bytes() + b"\0"
        except OSError:
            pass
    return any(m in data for m in marks)


# --- status -------------------------------------------------------------------------------------

COMPONENT_COLUMNS = [
    Column("component", lambda c: c["name"]),
    Column("ready", lambda c: "yes" if c["ready"] else "no"),
    Column("restarts", lambda c: c["restarts"]),
    Column("addr", lambda c: c["addr"]),
    Column("admin", lambda c: c["adminAddr"], wide=True),
    Column("pid", lambda c: c["pid"], wide=True),
]
POD_COLUMNS = [
    Column("namespace", lambda p: p["namespace"]),
    Column("pod", lambda p: p["name"]),
    Column("phase", lambda p: p["phase"]),
    Column("proxy", lambda p: ("ready" if p["proxyReady"] else "not ready") if p["meshed"] else "not meshed"),
    Column("mode", lambda p: "explicit" if p.get("explicit") else "transparent"),
    Column("restarts", lambda p: p["appRestarts"]),
    Column("ip", lambda p: p["ip"]),
    Column("identity", lambda p: p["identity"], wide=True),
    Column("message", lambda p: p["message"], wide=True),
]


@click.command("status", short_help="show the local mesh's components, their health, and the pods")
@state_dir_option
@output_option(("table", "wide", "json"), default="table")
def status(state_dir: str, output: str) -> int:
    """Show the control-plane components (ready, restarts, addresses) and every pod (phase, proxy
    readiness, application restarts). Exits 1 when the mesh is not running."""
    layout = _layout(state_dir)
    settings = _settings_or_fail(layout)
    pid = layout.supervisor_pid()
    st = layout.read_status() if pid is not None else {}
    doc = {"stateDir": str(layout.root), "running": pid is not None, "supervisorPid": pid,
           "controlPlaneReady": bool(st.get("controlPlaneReady")), "bridge": settings.bridge,
           "podCIDR": settings.pod_cidr, "serviceCIDR": settings.service_cidr,
           "components": st.get("components", []), "pods": st.get("pods", []),
           "workloads": [{**w, "ready": sum(1 for p in st.get("pods", []) if p["namespace"] == w["namespace"]
                                            and p["workload"] == w["name"] and p["phase"] == "Running"
                                            and (p["proxyReady"] or not p["meshed"]))}
                         for w in st.get("workloads", [])],
           "services": st.get("services", []), "specErrors": st.get("specErrors", {}),
           "addons": st.get("addons", [])}
    if output == "json":
        dump(doc, "json")
        return 0 if pid is not None else 1
    if pid is None:
        click.echo(f"the mesh in {layout.root} is not running (tether up --state-dir {layout.root})")
        return 1
    pods_are = ("--explicit pods only: no network namespaces, HTTP/gRPC via HTTP_PROXY, no transparent TCP"
                if settings.explicit_only else f"bridge {settings.bridge} {settings.pod_cidr}: pods run "
                "transparently (network namespace + iptables), --explicit ones via HTTP_PROXY")
    click.echo(f"mesh {layout.root}: supervisor pid {pid}, control plane "
               f"{'ready' if doc['controlPlaneReady'] else 'NOT ready'}; {pods_are}")
    emit(doc["components"], COMPONENT_COLUMNS, output, empty="no components")
    click.echo()
    emit(doc["pods"], POD_COLUMNS, output, empty="no pods (tether run NAME -- COMMAND)")
    for w in doc["workloads"]:
        click.echo(f"workload {w['namespace']}/{w['name']}: {w['ready']}/{w['replicas']} ready")
    for svc in doc["services"]:
        click.echo(f"service {svc['namespace']}/{svc['name']}: {svc['clusterIP']}")
    for addon in doc["addons"]:
        click.echo(f"add-on {addon['name']}: pid {addon['pid'] or '-'}, {addon['restarts']} restarts")
    for path, err in doc["specErrors"].items():
        click.echo(f"error: {path}: {err}")
    return 0


# --- run / scale / rm ---------------------------------------------------------------------------


def _namespace_exists(layout: Any, namespace: str) -> bool:
    if namespace == "default":
        return True
    from tether.platform.local.store import LocalStore

    return LocalStore(layout.resources_dir).get("Namespace", "", namespace) is not None


def _pods_of(layout: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in layout.read_status().get("pods", []) if p["namespace"] == namespace and p["workload"] == name]


def _wait_replicas(layout: Any, namespace: str, name: str, replicas: int, timeout: float) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = _pods_of(layout, namespace, name)
        for p in pods:
            if p["phase"] == "Failed":
                raise OperationFailed(f"pod {namespace}/{p['name']} failed: {p['message']}")
        good = [p for p in pods if p["phase"] == "Running" and (p["proxyReady"] or not p["meshed"])]
        return good if len(pods) == replicas and len(good) == replicas else None

    if replicas == 0:
        _wait(lambda: not _pods_of(layout, namespace, name), timeout, f"{namespace}/{name}'s pods to stop", layout)
        return []
    result: list[dict[str, Any]] = _wait(ready, timeout, f"{namespace}/{name}'s pods to be ready", layout)
    return result


def _spec_path(layout: Any, namespace: str, name: str) -> Path:
    return Path(layout.specs_dir) / namespace / f"{name}.yaml"


def _write_spec(layout: Any, spec: Any) -> None:
    from tether.platform.local.layout import write_json

    # JSON is YAML: the supervisor reads it as either; written with an atomic rename.
    write_json(_spec_path(layout, spec.namespace, spec.name), spec.to_dict())


def _read_spec(layout: Any, namespace: str, name: str) -> Any:
    import yaml

    from tether.platform.local.spec import SpecError, WorkloadSpec

    path = _spec_path(layout, namespace, name)
    if not path.exists():
        raise OperationFailed(f"no workload {name} in namespace {namespace} (tether status --state-dir {layout.root})")
    try:
        return WorkloadSpec.from_dict(yaml.safe_load(path.read_text()), str(path))
    except (OSError, yaml.YAMLError, SpecError) as e:
        raise OperationFailed(str(e)) from None


def _print_pods(pods: list[dict[str, Any]], since: float) -> None:
    for p in sorted(pods, key=lambda p: p["name"]):
        took = (p["readyAt"] or time.time()) - since
        click.echo(f"pod {p['namespace']}/{p['name']} ready at {p['ip']} in {took:.2f}s"
                   + (f" (identity {p['identity']})" if p["meshed"] else " (not meshed)"))


@click.command("run", short_help="start a workload as pods in the local mesh")
@click.argument("name", type=DNS_LABEL)
@click.argument("command", nargs=-1, required=False)
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL,
              help="the workload's namespace (default, or a Namespace applied to the store)")
@click.option("--service-account", type=DNS_LABEL, help="the identity's service account  [default: NAME]")
@click.option("--port", "ports", multiple=True, metavar="PORT[:NAME]",
              help="a port the application serves (repeatable)")
@click.option("--replicas", type=click.IntRange(0, 256), default=1, show_default=True, help="how many pods")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="a pod label (repeatable; app=NAME is set)")
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE",
              help="a pod annotation, read like the injector: config.linkerd.io/opaque-ports, skip-inbound-ports, "
              "skip-outbound-ports, skip-subnets, proxy-log-level, proxy-await, linkerd.io/inject; and "
              "local.tether.io/linkerd2-proxy=PATH: Linkerd's own proxy binary as the pod's sidecar")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="an environment variable of the application")
@click.option("--explicit", is_flag=True,
              help="no network namespace: the proxy on loopback addresses, the app's HTTP clients pointed at it "
              "with HTTP_PROXY; the app must listen on $POD_IP (works without root)")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until every pod is ready")
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True, help="how long to wait")
@state_dir_option
def run(name: str, command: tuple[str, ...], namespace: str, service_account: str | None, ports: tuple[str, ...],
        replicas: int, labels: tuple[str, ...], annotations: tuple[str, ...], env: tuple[str, ...], explicit: bool,
        wait: bool,
        timeout: float, state_dir: str) -> int:
    """Start the workload NAME: each replica a pod with its own network namespace and address,
    iptables rules sending its TCP through its proxy (uid 2102, identity from a bootstrap token),
    and COMMAND, started once the proxy is ready and restarted when it exits.

    Give the command after --:  tether run web --port 8080 -- python -m http.server 8080
    """
    from tether.platform.local.spec import SpecError, WorkloadSpec, parse_key_values, parse_port

    layout = _layout(state_dir)
    if not command:
        raise CliError("missing COMMAND: give the workload's command after --, e.g. "
                       "tether run web --port 8080 -- python -m http.server 8080")
    try:
        spec = WorkloadSpec(
            name=name, namespace=namespace, command=command, service_account=service_account or "",
            ports=tuple(parse_port(p) for p in ports), replicas=replicas,
            labels=parse_key_values(labels, "--label"), annotations=parse_key_values(annotations, "--annotation"),
            env=parse_key_values(env, "--env"), working_dir=os.getcwd(), explicit=explicit)
    except SpecError as e:
        msg = str(e)
        if msg.startswith(("label ", "annotation ")):
            msg = "--" + msg
        raise CliError(msg) from None
    settings = _running_or_fail(layout)
    if settings.explicit_only and not explicit:
        raise CliError("--explicit is needed: this mesh was started with `tether up --explicit` (no network "
                       "namespaces)")
    if not _namespace_exists(layout, namespace):
        raise CliError(f"-n {namespace}: no such namespace (apply a v1 Namespace named {namespace} first)")
    if _spec_path(layout, namespace, name).exists():
        raise CliError(f"NAME {name}: a workload of that name runs in namespace {namespace} already "
                       "(tether scale, or tether rm first)")
    started = time.time()
    _write_spec(layout, spec)
    click.echo(f"workload {namespace}/{name}: {replicas} replica{'s' * (replicas != 1)} asked for")
    if wait:
        _print_pods(_wait_replicas(layout, namespace, name, replicas, timeout), started)
    return 0


@click.command("scale", short_help="change how many pods a local workload has")
@click.argument("name", type=DNS_LABEL)
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL,
              help="the workload's namespace")
@click.option("--replicas", type=click.IntRange(0, 256), required=True, help="how many pods")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the pods are ready or gone")
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True, help="how long to wait")
@state_dir_option
def scale(name: str, namespace: str, replicas: int, wait: bool, timeout: float, state_dir: str) -> int:
    """Set the number of pods of the workload NAME (new pods are ready before this returns)."""
    from dataclasses import replace

    layout = _layout(state_dir)
    _running_or_fail(layout)
    spec = _read_spec(layout, namespace, name)
    started = time.time()
    _write_spec(layout, replace(spec, replicas=replicas))
    click.echo(f"workload {namespace}/{name} scaled from {spec.replicas} to {replicas}")
    if wait:
        pods = _wait_replicas(layout, namespace, name, replicas, timeout)
        _print_pods([p for p in pods if (p["createdAt"] or 0) >= started], started)
    return 0


@click.command("rm", short_help="stop a local workload's pods and remove it")
@click.argument("name", type=DNS_LABEL)
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL,
              help="the workload's namespace")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until its pods are gone")
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True, help="how long to wait")
@state_dir_option
def rm(name: str, namespace: str, wait: bool, timeout: float, state_dir: str) -> int:
    """Stop the pods of the workload NAME (each application first, then its proxy) and forget it."""
    layout = _layout(state_dir)
    _running_or_fail(layout)
    _read_spec(layout, namespace, name)
    _spec_path(layout, namespace, name).unlink()
    if wait:
        _wait_replicas(layout, namespace, name, 0, timeout)
    click.echo(f"workload {namespace}/{name} removed")
    return 0


# --- logs / exec --------------------------------------------------------------------------------


def _pods_named(layout: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    pods = [p for p in layout.read_status().get("pods", []) if p["namespace"] == namespace]
    exact = [p for p in pods if p["name"] == name]
    found = exact or sorted((p for p in pods if p["workload"] == name), key=lambda p: p["name"])
    if not found:
        raise OperationFailed(f"NAME {name}: no pod or workload of that name in namespace {namespace}")
    return found


@click.command("logs", short_help="print a local pod's application or proxy log")
@click.argument("name", type=DNS_LABEL)
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL, help="the pod's namespace")
@click.option("-c", "--container", type=click.Choice(["app", "proxy"]), default="app", show_default=True,
              help="which log: the application's or its proxy's")
@click.option("--tail", type=click.IntRange(min=0), help="only the last N lines")
@state_dir_option
def logs(name: str, namespace: str, container: str, tail: int | None, state_dir: str) -> int:
    """Print the log of the pod NAME (or of every pod of the workload NAME, each line prefixed)."""
    layout = _layout(state_dir)
    _settings_or_fail(layout)
    pods = _pods_named(layout, namespace, name)
    for p in pods:
        path = layout.pod_logs(namespace, p["name"]) / f"{container}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        if tail is not None:
            lines = lines[-tail:] if tail else []
        prefix = f"[{p['name']}] " if len(pods) > 1 else ""
        for line in lines:
            click.echo(prefix + line)
    return 0


@click.command("exec", short_help="run a command in a local pod's network namespace")
@click.argument("name", type=DNS_LABEL)
@click.argument("command", nargs=-1, required=False)
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL, help="the pod's namespace")
@state_dir_option
def exec_(name: str, command: tuple[str, ...], namespace: str, state_dir: str) -> int:
    """Run COMMAND in the network namespace of the pod NAME (the first pod of the workload NAME), with
    the pod's names resolvable, as `kubectl exec` does:  tether exec web-0 -- curl -s http://api:8080/"""
    layout = _layout(state_dir)
    if not command:
        raise CliError("missing COMMAND: give it after --, e.g. tether exec web -- curl -s http://web:8080/")
    _running_or_fail(layout)
    pod = _pods_named(layout, namespace, name)[0]
    sys.stdout.flush()
    if pod.get("explicit"):
        from tether.platform.local.supervisor import explicit_env

        # No namespace to enter: the pod's view is its proxy as HTTP_PROXY and its own address.
        os.environ.update({**explicit_env(pod["ip"]), "POD_IP": pod["appIp"]})
        argv = list(command)
    else:
        argv = ["ip", "netns", "exec", pod["netns"], *command]
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        raise OperationFailed(f"cannot run {argv[0]}: {e}") from None


# --- join ---------------------------------------------------------------------------------------


def _source_addr(dest: str) -> str:
    """This host's address on the way to ``dest`` (what the first host routes our pods through)."""
    r = subprocess.run(["ip", "-o", "route", "get", dest], capture_output=True, text=True, timeout=10)
    words = r.stdout.split()
    if r.returncode != 0 or "src" not in words:
        raise OperationFailed(f"--control-plane {dest}: no route to it from this host ({r.stderr.strip()})")
    return words[words.index("src") + 1]


@click.command("join", short_help="join this host's pods to another host's local mesh")
@click.option("--control-plane", "control_plane", required=True, metavar="HOST:PORT",
              help="the first host's join address (printed by its `tether up`)")
@click.option("--token", "token_file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="the first host's join token (its STATE_DIR/join.token, copied here)")
@state_dir_option
@click.option("--bridge", default=DEFAULT_BRIDGE, show_default=True, metavar="NAME",
              help="this host's bridge for its pods (created)")
@click.option("--pod-cidr", required=True, metavar="CIDR",
              help="this host's pod addresses: must not overlap the first host's or any other joined host's")
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="how long to wait for the first host's control plane")
def join(control_plane: str, token_file: str, state_dir: str, bridge: str, pod_cidr: str, timeout: float) -> int:
    """Make this host a member of the mesh another host started with `tether up`: pods started here
    with `tether run` get their identities and endpoints from that host's control plane and reach
    (and are reached by) its pods. `tether down` here stops this host's pods only."""
    from tether.platform.local import network
    from tether.platform.local.join import JoinError, call, read_token
    from tether.platform.local.layout import MeshSettings, loopback_cidr, new_mesh_id

    layout = _layout(state_dir)
    host, sep, port = control_plane.rpartition(":")
    try:
        ipaddress.ip_address(host)
        if not sep or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise CliError(f"--control-plane {control_plane!r}: expected IP:PORT") from None
    pods = _network(pod_cidr, "--pod-cidr")
    if layout.supervisor_pid() is not None:
        raise CliError(f"--state-dir {layout.root}: a mesh runs here already (tether down first)")
    _need_root("join")
    if network.link_exists(bridge):
        raise CliError(f"--bridge {bridge}: an interface with that name exists already")
    used = network.addresses_in_use(pods)
    if used:
        raise CliError(f"--pod-cidr {pods}: overlaps addresses on this host: {', '.join(used)}")
    try:
        token = read_token(token_file)
        info = call(control_plane, token, "POST", "/join", {"podCIDR": str(pods), "nodeAddr": _source_addr(host)})
    except JoinError as e:
        raise OperationFailed(str(e)) from None
    created = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    anchors = layout.root / "ca.crt"
    anchors.write_text(info["trustAnchorsPem"])
    fd = os.open(layout.join_token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    mesh_id = new_mesh_id()
    settings = MeshSettings(
        mesh_id=mesh_id, bridge=bridge, pod_cidr=str(pods), service_cidr=info["serviceCIDR"],
        controller_namespace=info["controllerNamespace"], trust_domain=info["trustDomain"],
        cluster_domain=info["clusterDomain"], trust_anchors=str(anchors), created_state_dir=created,
        made=[] if created else ["ca.crt", "join.token", *STATE_ENTRIES], loopback_cidr=loopback_cidr(mesh_id),
        identity_addrs=list(info["identityAddrs"]), destination_addrs=list(info["destinationAddrs"]),
        join_addr=control_plane, agent=True)
    layout.write_settings(settings)
    _enable_forwarding(layout)
    started = time.monotonic()
    with open(layout.log_path, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "tether", "up", "--foreground", "--state-dir", str(layout.root)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd="/")
    _wait(lambda: layout.supervisor_pid() is not None or layout.read_status().get("error"), 20,
          "the supervisor to start", layout, alive=lambda: child.poll() is None)
    _wait(lambda: _ready_status(layout), timeout, "the first host's control plane", layout)
    click.echo(f"tether join: this host's pods ({pods}, bridge {bridge}) are in the mesh of {control_plane}, "
               f"in {time.monotonic() - started:.2f}s; tether run --state-dir {layout.root} ... starts pods here")
    return 0


def _enable_forwarding(layout: Any) -> None:
    """This host forwards its pods' packets to the other hosts; the old setting is recorded and
    `tether down` puts it back."""
    from tether.platform.local.layout import write_json

    forward = Path("/proc/sys/net/ipv4/ip_forward")
    write_json(layout.routes_path, {"ipForward": forward.read_text().strip(), "routes": {}})
    forward.write_text("1\n")
