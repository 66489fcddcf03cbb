"""``tether viz ...``: Prometheus for the mesh and the metrics over it (Linkerd's viz commands).

Every number comes from Prometheus (the local mesh's, started by ``viz install``, or an external
one given with ``--prometheus-url``), through the queries in ``tether.viz.queries``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.output import Column, dump, render_table
from tether.cli.params import DNS_LABEL, POSITIVE_DURATION, state_dir_option

F = Callable[..., Any]


@click.group("viz", short_help="see the mesh: Prometheus, stat, routes, top, edges, tap, alerts and dashboards")
def viz() -> None:
    """Golden metrics (success rate, requests per second, latency) per workload, route and edge,
    from Prometheus: the local mesh's own (`tether viz install`) or an external one
    (--prometheus-url). `tether viz tap` streams live requests from the proxies' tap servers."""


def _prom_option(f: F) -> F:
    return click.option("--prometheus-url", envvar="TETHER_PROMETHEUS_URL", show_envvar=True, metavar="URL",
                        help="an external Prometheus that scrapes the mesh (default: the one `tether viz install` "
                             "started for the local mesh in --state-dir)")(f)


def _layout(state_dir: str) -> Any:
    from tether.platform.local.layout import Layout

    return Layout(state_dir)


def _prometheus(state_dir: str, url: str | None) -> Any:
    from tether.viz.local import local_url
    from tether.viz.promapi import Prometheus

    if url:
        if not url.startswith(("http://", "https://")):
            raise CliError(f"--prometheus-url: {url!r} is not an http(s) URL")
        return Prometheus(url)
    layout = _layout(state_dir)
    found = local_url(layout)
    if found is None:
        raise OperationFailed(f"no Prometheus: run `tether viz install --state-dir {layout.root}` on the local mesh, "
                              "or give --prometheus-url")
    return Prometheus(found)


def _api(state_dir: str, url: str | None) -> Any:
    from tether.viz.stat import MetricsApi

    cluster_domain = "cluster.local"
    layout = _layout(state_dir)
    if layout.settings_path.exists():
        try:
            cluster_domain = layout.read_settings().cluster_domain
        except ValueError:
            pass
    return MetricsApi(_prometheus(state_dir, url), cluster_domain)


def _run(fn: Callable[[], Any]) -> Any:
    """Turn viz's errors into one line (exit 1 for Prometheus, 2 for a bad argument)."""
    from tether.viz.local import VizError
    from tether.viz.promapi import PrometheusError
    from tether.viz.stat import StatError

    try:
        return fn()
    except PrometheusError as e:
        raise OperationFailed(str(e)) from None
    except VizError as e:
        raise OperationFailed(str(e)) from None
    except StatError as e:
        raise CliError(str(e)) from None


# --- install, uninstall, scrape-config -------------------------------------------------------------


@viz.command("install", short_help="start Prometheus for the local mesh (6h retention, loopback only)")
@state_dir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default="a free port, kept across installs",
              help="the loopback port Prometheus listens on")
@click.option("--scrape-interval", default="10s", show_default=True, metavar="DURATION",
              help="how often every proxy and controller is scraped")
@click.option("--retention", default="6h", show_default=True, metavar="DURATION", help="how long samples are kept")
@click.option("--timeout", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="how long to wait for Prometheus to be ready")
@click.option("--set", "values", multiple=True, metavar="KEY=VALUE[,KEY=VALUE]",
              help="a value of Linkerd's viz chart: prometheusUrl, prometheus.enabled (repeatable)")
def install(state_dir: str, port: int, scrape_interval: str, retention: str, timeout: float,
            values: tuple[str, ...]) -> None:
    """Run Debian's `prometheus` as a child of the local mesh's supervisor (restarted if it exits,
    stopped by `tether down` or `tether viz uninstall`), listening on 127.0.0.1 only, scraping every
    pod's proxy (:4191/metrics) and every control-plane component's admin port through file-based
    discovery the supervisor keeps in step with the pods. Running it again applies new flags.

    \b
    As Linkerd's viz chart: --set prometheusUrl=URL,prometheus.enabled=false uses an external
    Prometheus (scraping the jobs `tether viz scrape-config` prints) instead of starting one; the
    viz commands then use that URL by default."""
    import re

    from tether.viz import local

    for flag, value in (("--scrape-interval", scrape_interval), ("--retention", retention)):
        if not re.fullmatch(r"[1-9][0-9]*(ms|s|m|h|d)", value):
            raise CliError(f"{flag}: {value!r} is not a Prometheus duration such as 15s, 1m or 6h")
    sets = _values(values)
    url = sets.get("prometheusUrl", "")
    enabled = sets.get("prometheus.enabled", "true")
    if url and not url.startswith(("http://", "https://")):
        raise CliError(f"--set prometheusUrl: {url!r} is not an http(s) URL")
    if enabled == "false":
        if not url:
            raise CliError("--set prometheus.enabled=false needs prometheusUrl=URL (the Prometheus to use instead)")
        _run(lambda: local.use_external(_layout(state_dir), url))
        click.echo(f"viz uses the Prometheus at {url} (none started here); give it the jobs of "
                   f"`tether viz scrape-config --state-dir {state_dir}`")
        return
    if url:
        raise CliError("--set prometheusUrl: with the local Prometheus enabled, set prometheus.enabled=false too "
                       "(or give --prometheus-url to the viz commands)")
    got = _run(lambda: local.install(_layout(state_dir), port=port, scrape_interval=scrape_interval,
                                     retention=retention, timeout=timeout))
    click.echo(f"Prometheus ready at {got.url} (pid {got.pid}; config {got.config}; retention {retention}; "
               f"scrape every {scrape_interval})")
    click.echo(f"  viz commands use it by default: tether viz stat deploy -A --state-dir {state_dir}")


SET_KEYS = {"prometheusUrl", "prometheus.enabled"}


def _values(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (v for text in values for v in text.split(",") if v):
        key, eq, value = item.partition("=")
        if not eq:
            raise CliError(f"--set: {item!r} is not KEY=VALUE")
        if key not in SET_KEYS:
            raise CliError(f"--set: unknown value {key!r} (this install knows {', '.join(sorted(SET_KEYS))})")
        if key == "prometheus.enabled" and value not in ("true", "false"):
            raise CliError(f"--set prometheus.enabled: {value!r} is not true or false")
        out[key] = value
    return out


@viz.command("uninstall", short_help="stop the local mesh's Prometheus and remove its data")
@state_dir_option
def uninstall(state_dir: str) -> None:
    """Stop the Prometheus `tether viz install` started and remove its configuration and samples."""
    from tether.viz import local

    had = _run(lambda: local.uninstall(_layout(state_dir)))
    click.echo("Prometheus stopped and its data removed" if had else "viz is not installed here; nothing to do")


@viz.command("scrape-config", short_help="print the scrape jobs for an external Prometheus")
@state_dir_option
@click.option("--platform", type=click.Choice(["auto", "local", "kubernetes"]), default="auto", show_default=True,
              help="local: file-based discovery of the local mesh's targets; kubernetes: pod discovery "
                   "(auto: local when --state-dir holds a mesh)")
@click.option("-L", "--controller-namespace", default="linkerd", show_default=True, type=DNS_LABEL,
              help="the control plane's namespace (kubernetes)")
@click.option("--podmonitor", is_flag=True,
              help="print Prometheus Operator PodMonitors instead of scrape jobs (kubernetes)")
@click.option("--monitor-namespace", default="monitoring", show_default=True, type=DNS_LABEL,
              help="the PodMonitors' namespace (with --podmonitor)")
def scrape_config(state_dir: str, platform: str, controller_namespace: str, podmonitor: bool,
                  monitor_namespace: str) -> None:
    """The `scrape_configs` entries to add to an external Prometheus: the seeds' jobs
    (linkerd-controller, linkerd-service-mirror, linkerd-proxy) with the labels viz's queries and
    the alerts use (namespace, pod, deployment, component). The seeds' `grafana` job is left out:
    tether ships dashboards for your own Grafana, not a Grafana. --podmonitor prints the same as
    Prometheus Operator PodMonitors (seed 003's, with the relabelings that add deployment)."""
    from tether.viz import promconfig

    if podmonitor:
        if platform == "local":
            raise CliError("--podmonitor: PodMonitors are for the Prometheus Operator on Kubernetes, not --platform "
                           "local")
        click.echo(promconfig.dump_all(promconfig.pod_monitors(controller_namespace, monitor_namespace)), nl=False)
        return
    layout = _layout(state_dir)
    if platform == "auto":
        platform = "local" if layout.settings_path.exists() else "kubernetes"
    if platform == "local":
        if not layout.settings_path.exists():
            raise OperationFailed(f"no local mesh in {layout.root} (--state-dir); use --platform kubernetes")
        jobs = promconfig.local_jobs(layout.scrape_dir)
        click.echo(f"# scrape jobs for the local mesh in {layout.root}; its supervisor keeps the target files")
    else:
        jobs = promconfig.kubernetes_jobs(controller_namespace)
    click.echo(promconfig.dump({"scrape_configs": jobs}), nl=False)


# --- stat, routes, top, edges ----------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _rps(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}rps"


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0f}ms"


def _window_option(f: F, default: str = "1m") -> F:
    return click.option("-t", "--time-window", "window", default=default, show_default=True, metavar="DURATION",
                        help="the window the numbers cover (Prometheus range, e.g. 30s, 1m, 10m)")(f)


def _ns_options(f: F) -> F:
    f = click.option("-A", "--all-namespaces", is_flag=True, help="every namespace")(f)
    f = click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL,
                     help="the namespace of the resources")(f)
    return f


def _out(formats: tuple[str, ...] = ("table", "wide", "json")) -> Callable[[F], F]:
    return click.option("-o", "--output", type=click.Choice(list(formats)), default="table", show_default=True,
                        help="output format: " + ", ".join(formats))


def _resource(text: str, namespace: str, flag: str) -> Any:
    from tether.viz.stat import Resource, StatError

    try:
        return Resource.parse(text, namespace, flag)
    except StatError as e:
        raise CliError(str(e)) from None


STAT_COLUMNS = [
    Column("NAME", lambda r: r["resource"]["name"]),
    Column("MESHED", lambda r: "-" if r["runningPodCount"] is None
           else f"{r['meshedPodCount']}/{r['runningPodCount']}"),
    Column("SUCCESS", lambda r: _pct(r["successRate"])),
    Column("RPS", lambda r: _rps(r["rps"])),
    Column("LATENCY_P50", lambda r: _ms((r["stats"] or {}).get("latencyMsP50"))),
    Column("LATENCY_P95", lambda r: _ms((r["stats"] or {}).get("latencyMsP95"))),
    Column("LATENCY_P99", lambda r: _ms((r["stats"] or {}).get("latencyMsP99"))),
    Column("TCP_CONN", lambda r: "-" if not r["tcpStats"] or r["tcpStats"]["openConnections"] is None
           else r["tcpStats"]["openConnections"]),
    Column("ACTUAL_SUCCESS", lambda r: _pct(r["actualSuccessRate"]), wide=True),
    Column("ACTUAL_RPS", lambda r: _rps(r["actualRps"]), wide=True),
    Column("READ_BYTES/SEC", lambda r: "-" if not r["tcpStats"] or r["tcpStats"]["readBytesPerSec"] is None
           else f"{r['tcpStats']['readBytesPerSec']:.1f}B/s", wide=True),
    Column("WRITE_BYTES/SEC", lambda r: "-" if not r["tcpStats"] or r["tcpStats"]["writeBytesPerSec"] is None
           else f"{r['tcpStats']['writeBytesPerSec']:.1f}B/s", wide=True),
]


def _table(rows: Sequence[Mapping[str, Any]], columns: list[Column], fmt: str, namespaced: bool,
           ns: Callable[[Mapping[str, Any]], str]) -> str:
    cols = [c for c in columns if fmt == "wide" or not c.wide]
    if namespaced:
        cols = [Column("NAMESPACE", ns), *cols]
    return render_table(([c.value(r) for c in cols] for r in rows), [c.header for c in cols])


def _show(rows: Sequence[Mapping[str, Any]], output: str, json_doc: Any, columns: list[Column], empty: str,
          namespaced: bool = False, ns: Callable[[Mapping[str, Any]], str] = lambda r: "") -> None:
    """-o json prints json_doc; a table otherwise, or `empty` on stderr when there are no rows."""
    if output == "json":
        dump(json_doc, "json")
    elif not rows:
        click.echo(empty, err=True)
    else:
        click.echo(_table(rows, columns, output, namespaced, ns), nl=False)


def pod_counts(state_dir: str, rtype: str, external: bool) -> Any:
    if external:
        return None
    from tether.viz.local import pod_counts as counts

    return counts(_layout(state_dir), rtype)


def stat_rows(state_dir: str, url: str | None, resource: str, name: str | None, namespace: str,
              all_namespaces: bool, window: str, from_: str | None, to: str | None,
              from_namespace: str | None = None, to_namespace: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    text = resource if name is None or "/" in resource else f"{resource}/{name}"
    res = _resource(text, namespace, "RESOURCE")
    frm = _resource(from_, from_namespace or namespace, "--from") if from_ else None
    dst = _resource(to, to_namespace or namespace, "--to") if to else None
    api = _api(state_dir, url)
    pods = pod_counts(state_dir, res.type, url is not None)
    rows = _run(lambda: api.stat(res, window, all_namespaces=all_namespaces, from_=frm, to=dst, pods=pods))
    return res, rows


@viz.command("stat", short_help="golden metrics per deployment, pod, namespace, service or authority")
@click.argument("resource", metavar="RESOURCE")
@click.argument("name", required=False)
@_ns_options
@click.option("--from", "from_", metavar="TYPE/NAME", help="only calls from this resource (e.g. deploy/web)")
@click.option("--from-namespace", type=DNS_LABEL, help="namespace of --from  [default: -n]")
@click.option("--to", metavar="TYPE/NAME", help="only calls to this resource (e.g. deploy/books)")
@click.option("--to-namespace", type=DNS_LABEL, help="namespace of --to  [default: -n]")
@_window_option
@_out()
@_prom_option
@state_dir_option
def stat(resource: str, name: str | None, namespace: str, all_namespaces: bool, from_: str | None,
         from_namespace: str | None, to: str | None, to_namespace: str | None, window: str, output: str,
         prometheus_url: str | None, state_dir: str) -> None:
    """RESOURCE is deploy, po, ns, svc or authority, optionally with a name (deploy/web or deploy web).

    \b
    Columns as Linkerd's: NAME MESHED SUCCESS RPS LATENCY_P50 LATENCY_P95 LATENCY_P99 TCP_CONN;
    -o wide adds ACTUAL_SUCCESS and ACTUAL_RPS (what the proxies sent, retries included, when
    --from/--to name a destination with a ServiceProfile) and TCP bytes per second. Without
    --from/--to the numbers are what the resource's own proxies answered (inbound); a Service,
    having no proxy, is seen from its clients. -o json: {"statTables": [{"podGroup": {"rows":
    [...]}}]} with stats.actualRetries."""
    res, rows = stat_rows(state_dir, prometheus_url, resource, name, namespace, all_namespaces, window, from_, to,
                          from_namespace, to_namespace)
    _show(rows, output, {"statTables": [{"podGroup": {"rows": rows}}]}, STAT_COLUMNS,
          f"No traffic found for {res} in {'any namespace' if all_namespaces else res.namespace} over "
          f"the last {window}.", all_namespaces, lambda r: r["resource"]["namespace"])


ROUTE_COLUMNS = [
    Column("ROUTE", lambda r: r["route"]),
    Column("SERVICE", lambda r: r["authority"]),
    Column("SUCCESS", lambda r: _pct(r["successRate"])),
    Column("RPS", lambda r: _rps(r["rps"])),
    Column("LATENCY_P50", lambda r: _ms(r["latencyMsP50"])),
    Column("LATENCY_P95", lambda r: _ms(r["latencyMsP95"])),
    Column("LATENCY_P99", lambda r: _ms(r["latencyMsP99"])),
    Column("ACTUAL_SUCCESS", lambda r: _pct(r["actualSuccessRate"]), wide=True),
    Column("ACTUAL_RPS", lambda r: _rps(r["actualRps"]), wide=True),
]


@viz.command("routes", short_help="golden metrics per route of a ServiceProfile")
@click.argument("target", metavar="TYPE/NAME")
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL, help="the namespace")
@click.option("--to", metavar="TYPE/NAME", help="the routes of this destination as TARGET calls it")
@click.option("--to-namespace", type=DNS_LABEL, help="namespace of --to  [default: -n]")
@_window_option
@_out()
@_prom_option
@state_dir_option
def routes(target: str, namespace: str, to: str | None, to_namespace: str | None, window: str, output: str,
           prometheus_url: str | None, state_dir: str) -> None:
    """Per route of the destination's ServiceProfile ([DEFAULT]: requests no route matched), as the
    calling proxies count them (route_response_total): without --to, every client's calls to
    TARGET; with --to, TARGET's calls to that destination. -o wide: ACTUAL_SUCCESS and ACTUAL_RPS
    count every try (retries included); SUCCESS and RPS what the applications saw."""
    from tether.viz.local import profiles

    res = _resource(target, namespace, "TARGET")
    dst = _resource(to, to_namespace or namespace, "--to") if to else None
    api = _api(state_dir, prometheus_url)
    declared = profiles(_layout(state_dir)) if prometheus_url is None else []
    rows = _run(lambda: api.routes(res, window, to=dst, profiles=declared))
    _show(rows, output, {"routes": rows}, ROUTE_COLUMNS,
          f"No route traffic found for {dst or res} over the last {window} (routes need a ServiceProfile)")


EDGE_COLUMNS = [
    Column("SRC", lambda r: r["src"]),
    Column("DST", lambda r: r["dst"]),
    Column("SRC_NS", lambda r: r["srcNamespace"]),
    Column("DST_NS", lambda r: r["dstNamespace"]),
    Column("SECURED", lambda r: "√" if r["secured"] else "×"),  # noqa: RUF001 (Linkerd's marks)
    Column("CLIENT_ID", lambda r: r["clientId"], wide=True),
    Column("SERVER_ID", lambda r: r["serverId"], wide=True),
    Column("MSG", lambda r: r["msg"], wide=True),
]


@viz.command("edges", short_help="which deployments call which, with their mTLS identities")
@click.argument("resource", metavar="deploy")
@_ns_options
@_window_option
@_out()
@_prom_option
@state_dir_option
def edges(resource: str, namespace: str, all_namespaces: bool, window: str, output: str,
          prometheus_url: str | None, state_dir: str) -> None:
    """Edges between deployments that exchanged requests in the window: SECURED when the calls
    were mTLS; -o wide adds the client's and the server's identities."""
    from tether.viz.queries import TYPE_ALIASES

    if TYPE_ALIASES.get(resource) != "deployment":
        raise CliError(f"RESOURCE: edges are between deployments (deploy), not {resource!r}")
    api = _api(state_dir, prometheus_url)
    rows = _run(lambda: api.edges(namespace, window, all_namespaces=all_namespaces))
    _show(rows, output, {"edges": rows}, EDGE_COLUMNS,
          f"No edges found in {'any namespace' if all_namespaces else namespace} over the last {window}.")


TOP_COLUMNS = [
    Column("SOURCE", lambda r: r["source"]),
    Column("DESTINATION", lambda r: r["destination"]),
    Column("ROUTE", lambda r: r["route"]),
    Column("COUNT", lambda r: r["count"]),
    Column("RPS", lambda r: _rps(r["rps"])),
    Column("SUCCESS", lambda r: _pct(r["successRate"])),
    Column("P50", lambda r: _ms(r["latencyMsP50"])),
    Column("P99", lambda r: _ms(r["latencyMsP99"])),
]


def _top_window(f: F) -> F:
    return click.option("-t", "--time-window", "window", default="30s", show_default=True, metavar="DURATION",
                        help="the window each refresh covers")(f)


@viz.command("top", short_help="a live table of the busiest routes to and from a deployment")
@click.argument("target", metavar="TYPE/NAME")
@click.option("-n", "--namespace", default="default", show_default=True, type=DNS_LABEL, help="the namespace")
@_top_window
@click.option("--interval", type=POSITIVE_DURATION, default="2s", show_default=True, help="time between refreshes")
@click.option("--count", "count", type=click.IntRange(1), default=None, help="stop after this many refreshes")
@click.option("--once", is_flag=True, help="print one table and exit (as --count 1)")
@_out(("table", "json"))
@_prom_option
@state_dir_option
def top(target: str, namespace: str, window: str, interval: float, count: int | None, once: bool, output: str,
        prometheus_url: str | None, state_dir: str) -> None:
    """Per (source pod, destination, route), the requests of the last window, busiest first,
    refreshed every --interval until Ctrl-C (or --count). From Prometheus's route metrics, so
    per ServiceProfile route, not per path: the per-path view needs live tap (`tether viz tap`)."""
    res = _resource(target, namespace, "TARGET")
    if res.type not in ("deployment", "pod") or not res.name:
        raise CliError(f"TARGET: {target!r} is not one deployment or pod (e.g. deploy/web)")
    api = _api(state_dir, prometheus_url)
    n = 1 if once else count
    done = 0
    live = sys.stdout.isatty() and output == "table"
    while True:
        rows = _run(lambda: api.top(res, window))
        if output == "json":
            dump({"rows": rows}, "json")
        else:
            if live:
                click.echo("\x1b[H\x1b[2J", nl=False)
            stamp = time.strftime("%H:%M:%S")
            click.echo(f"{res} in {res.namespace}, last {window}, at {stamp}"
                       f"{'' if rows else ': no route traffic (routes need a ServiceProfile)'}")
            if rows:
                click.echo(render_table(([c.value(r) for c in TOP_COLUMNS] for r in rows),
                                        [c.header for c in TOP_COLUMNS]), nl=False)
        sys.stdout.flush()
        done += 1
        if n is not None and done >= n:
            return
        time.sleep(interval)


# --- check -----------------------------------------------------------------------------------------


@viz.command("check", short_help="check that Prometheus answers and has fresh data from the mesh")
@click.option("--max-age", type=POSITIVE_DURATION, default="60s", show_default=True,
              help="the newest scrape must be younger than this")
@_out(("table", "json"))
@_prom_option
@state_dir_option
def check(max_age: float, output: str, prometheus_url: str | None, state_dir: str) -> None:
    """Prometheus reachable and ready; proxies and controllers among its targets and scraped
    successfully; the newest sample fresh; the alert rules loaded (local Prometheus); on a local
    mesh, every running meshed pod's proxy accepts a tap (a stream opened and closed at once)."""
    from tether.viz.checks import run_checks, tap_results
    from tether.viz.local import read_settings

    layout = _layout(state_dir)
    own = prometheus_url is None and not (read_settings(layout) or {}).get("external")
    probe = (lambda: tap_results(state_dir)) if layout.supervisor_pid() is not None else None
    results = run_checks(_prometheus(state_dir, prometheus_url), max_age, local=own, tap_probe=probe)
    if output == "json":
        dump({"checks": results}, "json")
    else:
        click.echo("tether-viz")
        click.echo("----------")
        for r in results:
            mark = {"ok": "√", "warn": "‼", "fail": "×", "skip": "-"}[r["status"]]  # noqa: RUF001
            click.echo(f"{mark} {r['description']}" + (f"\n    {r['hint']}" if r["hint"] else ""))
        failed = [r for r in results if r["status"] == "fail"]
        click.echo("\nStatus check results are " + ("×" if failed else "√"))  # noqa: RUF001
    if any(r["status"] == "fail" for r in results):
        raise SystemExit(1)


# --- alerts, dashboards, web dashboard --------------------------------------------------------------


@viz.command("alerts", short_help="print the alert rules as a PrometheusRule")
@click.option("-L", "--controller-namespace", default="linkerd", show_default=True, type=DNS_LABEL,
              help="the control plane's namespace (its alert matches it)")
@click.option("--workload-namespace", default=None, type=DNS_LABEL, metavar="NS",
              help="only alert on workloads of this namespace  [default: every namespace]")
@click.option("--rules-only", is_flag=True, help="print only the rule groups (a Prometheus rule file)")
def alerts(controller_namespace: str, workload_namespace: str | None, rules_only: bool) -> None:
    """A monitoring.coreos.com/v1 PrometheusRule: the seeds' four rules (low success rate, high
    latency, control plane down, certificate expiry) made to fire on tether, and tether's own
    (a control-plane component with no replica up, proxies not ready, workload certificates not
    renewed, issuer and trust anchor expiry)."""
    from tether.viz import alerts as rules
    from tether.viz.promconfig import dump as ydump

    doc = rules.prometheus_rule(controller_namespace, workload_namespace or "")
    click.echo(ydump({"groups": doc["spec"]["groups"]} if rules_only else doc), nl=False)


@viz.command("dashboards", short_help="write the Grafana dashboards (JSON) into a directory")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="where to write the dashboards (created if missing)")
def dashboards(output_dir: str) -> None:
    """Grafana dashboards for a Grafana with a Prometheus data source that scrapes the mesh: top
    line, namespace, deployment, pod, route, TCP and authorization. No multicluster dashboard:
    tether has no multicluster metrics yet."""
    from pathlib import Path

    from tether.viz.grafana import shipped

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in shipped().items():
            (out / name).write_text(text)
            click.echo(str(out / name))
    except OSError as e:
        raise OperationFailed(f"--output-dir {output_dir}: {e.strerror or e}") from None
    click.echo("no multicluster dashboard: tether exports no multicluster metrics yet", err=True)


@viz.command("dashboard", short_help="serve the web dashboard on loopback")
@click.option("--port", type=click.IntRange(0, 65535), default=50750, show_default=True,
              help="the loopback port (0: any free port)")
@click.option("--address", default="127.0.0.1", show_default=True, help="the address to listen on")
@click.option("--show", type=click.Choice(["url", "none"]), default="url", show_default=True,
              help="print the URL once serving")
@_prom_option
@state_dir_option
def dashboard(port: int, address: str, show: str, prometheus_url: str | None, state_dir: str) -> None:
    """A web page of the mesh: namespaces, workloads with their golden metrics, routes, the edges
    between workloads as a graph, refreshing on its own, and live tap of a selected workload (on a
    local mesh). Served from this process (plain HTML, JS and CSS shipped with tether; nothing from
    the internet); Ctrl-C stops it."""
    from tether.viz.web import local_tap, serve

    api = _api(state_dir, prometheus_url)

    def counts(rtype: str) -> Any:
        return pod_counts(state_dir, rtype, prometheus_url is not None)

    # Live tap reaches the proxies of a local mesh (its pods and trust material are in the state dir).
    tap = local_tap(state_dir) if _layout(state_dir).supervisor_pid() is not None else None
    _run(lambda: serve(api, address, port, counts, announce=(show == "url"), tap=tap))


def _diagnostics() -> click.Command:
    # `linkerd viz diagnostics proxy-metrics POD -n NS`, as the seeds write it: the same commands.
    from tether.cli.diagnostics_cmd import diagnostics

    return diagnostics


viz.add_command(_diagnostics(), "diagnostics")


def _tap_commands() -> None:
    """`viz tap` and `viz profile` live in tether.cli.tap_cmd (the tap work); this group carries
    them whenever that module is part of the build."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("tether.cli.tap_cmd") is None:
        return
    tap_cmd = importlib.import_module("tether.cli.tap_cmd")
    for name in ("tap", "profile"):
        cmd = getattr(tap_cmd, name, None)
        if isinstance(cmd, click.Command):
            viz.add_command(cmd, name)


_tap_commands()
