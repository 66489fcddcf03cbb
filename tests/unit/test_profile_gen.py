"""ServiceProfiles generated from OpenAPI documents and observed routes: the routes, and that tether's own
resource loader accepts what `tether profile` prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from tether.cli.main import main
from tether.core.resources.loader import load_text
from tether.viz.profile import from_observed, from_openapi, path_regex

SWAGGER = {
    "swagger": "2.0",
    "basePath": "/api/v1",
    "paths": {
        "/users/{id}": {"get": {"responses": {"200": {}, "503": {}}, "x-linkerd-timeout": "2s"},
                        "delete": {"responses": {"204": {}}}},
        "/charge.json": {"post": {"responses": {"200": {}}, "x-linkerd-retryable": True}},
    },
}


def test_openapi_routes_params_failures_retries_timeouts() -> None:
    doc = from_openapi("api-service", "production", SWAGGER)
    assert doc["metadata"] == {"name": "api-service.production.svc.cluster.local", "namespace": "production"}
    routes = {r["name"]: r for r in doc["spec"]["routes"]}
    assert list(routes) == ["POST /api/v1/charge.json", "GET /api/v1/users/{id}", "DELETE /api/v1/users/{id}"]
    get = routes["GET /api/v1/users/{id}"]
    assert get["condition"] == {"method": "GET", "pathRegex": "/api/v1/users/[^/]*"}
    assert get["responseClasses"] == [{"condition": {"status": {"min": 503, "max": 503}}, "isFailure": True}]
    assert get["timeout"] == "2s"
    charge = routes["POST /api/v1/charge.json"]
    assert charge["isRetryable"] is True and re.fullmatch(charge["condition"]["pathRegex"], "/api/v1/charge.json")
    assert not re.fullmatch(charge["condition"]["pathRegex"], "/api/v1/chargeXjson")
    assert re.fullmatch(path_regex("/a/{b}/c"), "/a/42/c") and not re.fullmatch(path_regex("/a/{b}/c"), "/a/4/2/c")
    result = load_text(yaml.safe_dump(doc), "generated")
    assert result.ok, result.errors


def test_observed_routes_one_per_method_and_path() -> None:
    doc = from_observed("web", "default", [("GET", "/books?page=2"), ("GET", "/books"), ("post", "/books"),
                                           ("GET", "/a.b")])
    assert [r["name"] for r in doc["spec"]["routes"]] == ["GET /a.b", "GET /books", "POST /books"]
    assert doc["spec"]["routes"][0]["condition"] == {"method": "GET", "pathRegex": r"/a\.b"}
    assert load_text(yaml.safe_dump(doc), "generated").ok


def test_cli_open_api_and_errors(tmp_path: Path) -> None:
    spec = tmp_path / "swagger.json"
    spec.write_text(json.dumps(SWAGGER))
    r = CliRunner().invoke(_cli(), ["profile", "--open-api", str(spec), "api-service", "-n", "production"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["spec"]["routes"][0]["name"] == "POST /api/v1/charge.json"
    bad = tmp_path / "bad.json"
    bad.write_text('{"paths": {}}')
    for args, text in ((["profile", "--open-api", str(bad), "x"], "not an OpenAPI document"),
                       (["profile", "x"], "give exactly one of --open-api FILE, --tap RESOURCE or --template"),
                       (["profile", "--open-api", str(tmp_path / "nope.json"), "x"], "--open-api: cannot read")):
        code, out = _run(args)
        assert code == 2 and text in out and out.strip().count("\n") == 0, out


def _cli() -> object:
    from tether.cli.tree import cli

    return cli


def _run(args: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()
