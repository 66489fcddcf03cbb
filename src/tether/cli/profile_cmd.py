"""``tether profile``: print a ServiceProfile for a service, from an OpenAPI document (``--open-api``),
from live traffic (``--tap RESOURCE --tap-duration D``), or as a template to edit (``--template``).

Also ``tether viz profile`` (Linkerd's spelling of the tap form). The output applies with
``tether apply -f -`` (or ``kubectl apply -f -``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tether.cli.errors import CliError, OperationFailed
from tether.cli.params import POSITIVE_DURATION, state_dir_option


def _emit(doc: dict[str, Any], output: str) -> None:
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False).rstrip("\n"))


def _load_openapi(path: str) -> Any:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CliError(f"--open-api: cannot read {path}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise CliError(f"--open-api: {path} is not JSON or YAML: {str(e).splitlines()[0]}") from None


@click.command("profile", short_help="print a ServiceProfile from an OpenAPI file, from live traffic, or a template")
@click.argument("service", metavar="SERVICE")
@click.option("-n", "--namespace", default="default", show_default=True, help="namespace of the service")
@click.option("--open-api", "open_api", metavar="FILE", help="build the routes from this OpenAPI (Swagger) document")
@click.option("--tap", "tap_resource", metavar="RESOURCE",
              help="build the routes from the requests this resource receives (deploy/NAME, po/NAME)")
@click.option("--tap-duration", type=POSITIVE_DURATION, default="5s", show_default=True,
              help="how long --tap watches the traffic")
@click.option("--template", is_flag=True, help="print a profile with an example route, to edit")
@click.option("--cluster-domain", default="cluster.local", show_default=True, metavar="DOMAIN",
              help="the cluster domain in the profile's name (SERVICE.NAMESPACE.svc.DOMAIN)")
@click.option("-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="output format")
@state_dir_option
def profile(service: str, namespace: str, open_api: str | None, tap_resource: str | None, tap_duration: float,
            template: bool, cluster_domain: str, output: str, state_dir: str) -> int:
    """Print a ServiceProfile for SERVICE (its name: SERVICE.NAMESPACE.svc.cluster.local).

    \b
    Examples:
      tether profile --open-api swagger.json api-service -n production | tether apply -f -
      tether profile -n production api-service --tap deploy/api-service --tap-duration 60s
    """
    from tether.viz import profile as build

    chosen = [f for f, on in (("--open-api", open_api), ("--tap", tap_resource), ("--template", template)) if on]
    if len(chosen) != 1:
        raise CliError("give exactly one of --open-api FILE, --tap RESOURCE or --template"
                       + (f" (got {', '.join(chosen)})" if chosen else ""))
    if template:
        doc = build.template(service, namespace, cluster_domain)
    elif open_api is not None:
        try:
            doc = build.from_openapi(service, namespace, _load_openapi(open_api), cluster_domain)
        except build.OpenApiError as e:
            raise CliError(f"--open-api: {open_api}: {e}") from None
    else:
        assert tap_resource is not None
        doc = _from_tap(service, namespace, tap_resource, tap_duration, cluster_domain, state_dir)
    _emit(doc, output)
    return 0


def _from_tap(service: str, namespace: str, resource: str, duration: float, cluster_domain: str,
              state_dir: str) -> dict[str, Any]:
    from tether.api.gen import tap_pb2
    from tether.cli.tap_cmd import run_tap
    from tether.viz import profile as build
    from tether.viz.tap import method_name

    seen: set[tuple[str, str]] = set()

    def on_event(mesh: Any, ev: Any) -> None:
        # What the resource serves: requests its proxies received (inbound).
        if ev.proxy_direction == tap_pb2.TapEvent.INBOUND and ev.http.WhichOneof("event") == "request_init":
            r = ev.http.request_init
            seen.add((method_name(r.method), r.path))

    run_tap(state_dir, resource, namespace, to=None, to_namespace=None, max_rps=0.0, scheme=None, method=None,
            authority=None, path=None, extract_headers=False, on_event=on_event, duration=duration)
    if not seen:
        raise OperationFailed(f"no requests to {resource} in {duration:g}s: no routes to write")
    return build.from_observed(service, namespace, seen, cluster_domain)
