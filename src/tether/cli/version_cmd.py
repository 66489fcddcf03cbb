"""``tether version``: the client's version and, when reachable, the control plane's and the proxies'."""

from __future__ import annotations

from typing import Any

import click

from tether import __version__
from tether.cli.output import dump, output_option
from tether.cli.params import POSITIVE_DURATION, state_dir_option


@click.command("version", short_help="print the client, control-plane and proxy versions")
@click.option("--client", "client_only", is_flag=True, help="print the client version only")
@click.option("--proxy", is_flag=True, help="also print the version of every registered workload's proxy")
@state_dir_option
@click.option("--timeout", type=POSITIVE_DURATION, default="2s", show_default=True,
              help="time allowed for each process's answer")
@output_option(("text", "json", "yaml"), default="text")
def version(client_only: bool, proxy: bool, state_dir: str, timeout: float, output: str) -> int:
    """Print the client version and the control plane's, read from the running identity service
    found in STATE_DIR/control-plane (and with --proxy the proxies', from their proxy_build_info).

    What cannot be reached is printed as "unavailable" with the reason; the exit status is 0 either
    way (use `tether check` to fail on it).
    """
    doc: dict[str, Any] = {"client": {"version": __version__}}
    if not client_only:
        doc["server"] = _server(state_dir, timeout)
        if proxy:
            doc["proxies"] = _proxies(state_dir, timeout)
    if output != "text":
        dump(doc, output)
        return 0
    click.echo(f"Client version: {__version__}")
    if client_only:
        return 0
    click.echo(f"Server version: {_text(doc['server'])}")
    if proxy:
        if not doc["proxies"]:
            click.echo(f"Proxy versions: unavailable (no workload in {state_dir} has a proxyAdmin address)")
        for p in doc["proxies"]:
            click.echo(f"Proxy version ({p['workload']}): {_text(p)}")
    return 0


def _text(entry: dict[str, Any]) -> str:
    if entry.get("version"):
        return str(entry["version"])
    return f"unavailable ({entry['error']})"


def _server(state_dir: str, timeout: float) -> dict[str, Any]:
    from tether.cli.probe import ProbeError, get
    from tether.platform.local.controlplane import ControlPlaneRecordError, read_records

    try:
        records = read_records(state_dir, "identity")
    except ControlPlaneRecordError as e:
        return {"version": None, "error": str(e)}
    if not records:
        return {"version": None, "error": f"no control plane recorded in {state_dir}/control-plane"}
    problems = []
    for rec in records:
        try:
            status, _ = get(rec.admin_addr, "/live", timeout)
        except ProbeError as e:
            problems.append(str(e))
            continue
        if status == 200:
            return {"version": rec.version, "component": rec.component, "adminAddr": rec.admin_addr}
        problems.append(f"http://{rec.admin_addr}/live: HTTP {status}")
    return {"version": None, "error": "identity service not reachable: " + "; ".join(problems)}


def _proxies(state_dir: str, timeout: float) -> list[dict[str, Any]]:
    from tether.cli.probe import ProbeError, proxy_version
    from tether.platform.local.workloads import WorkloadError, WorkloadRegistry

    out: list[dict[str, Any]] = []
    try:
        workloads = [w for w in WorkloadRegistry(state_dir) if w.proxy_admin]
    except WorkloadError as e:
        return [{"workload": "?", "version": None, "error": str(e)}]
    for w in workloads:
        try:
            out.append({"workload": w.key, "version": proxy_version(str(w.proxy_admin), timeout)})
        except ProbeError as e:
            out.append({"workload": w.key, "version": None, "error": str(e)})
    return out
