"""Where the charts are and what the user's values are: files, ``--set``, ``--set-file``, schema-checked.

The charts ship in the repository's charts/ (the same files `helm install` takes); TETHER_CHARTS_DIR
points elsewhere (an installed package without the checkout).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tether.cli.errors import CliError, OperationFailed
from tether.core.install.values import ValuesInputError, check, combine, parse_set, set_value

CONTROL_PLANE = "tether-control-plane"
CRDS = "tether-crds"


def charts_dir() -> Path:
    override = os.environ.get("TETHER_CHARTS_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[3] / "charts"
    if not (path / CONTROL_PLANE / "Chart.yaml").is_file():
        raise OperationFailed(f"the charts are not in {path}: set TETHER_CHARTS_DIR to the directory holding "
                              f"{CONTROL_PLANE}/ and {CRDS}/")
    return path


def read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise OperationFailed(f"{what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CliError(f"{what} {path}: invalid YAML: {' '.join(str(e).split())}") from None


def defaults(chart: str = CONTROL_PLANE) -> dict[str, Any]:
    data = read_yaml(charts_dir() / chart / "values.yaml", "values")
    return data if isinstance(data, dict) else {}


def chart_version(chart: str = CONTROL_PLANE) -> str:
    meta = read_yaml(charts_dir() / chart / "Chart.yaml", "chart")
    return str(meta["version"])


def user_values(
    files: Sequence[str], sets: Sequence[str], set_strings: Sequence[str] = (), set_files: Sequence[str] = (),
    *, first: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The layers the user gave (``first``, then -f files, --set, --set-string, --set-file), not yet defaults."""
    layers: list[dict[str, Any]] = [*first]
    for f in files:
        data = read_yaml(Path(f), "values file")
        if data is None:
            continue
        if not isinstance(data, dict):
            raise CliError(f"-f {f}: not a map of values")
        layers.append(data)
    try:
        if sets:
            layers.append(parse_set(sets, "--set"))
        if set_strings:
            layers.append(parse_set(set_strings, "--set-string", as_string=True))
        for item in set_files:
            key, eq, path = item.partition("=")
            if not eq or not key or not path:
                raise ValuesInputError(f"--set-file {item!r}: expected KEY=FILE")
            try:
                text = Path(path).read_text()
            except OSError as e:
                raise OperationFailed(f"--set-file {key}={path}: {e.strerror}") from None
            layer: dict[str, Any] = {}
            set_value(layer, key, text, "--set-file")
            layers.append(layer)
    except ValuesInputError as e:
        raise CliError(str(e)) from None
    return combine({}, layers)


def checked(values: dict[str, Any], chart: str = CONTROL_PLANE) -> dict[str, Any]:
    """The defaults with ``values`` over them; an unknown or mistyped key is a one-line error."""
    schema = read_yaml(charts_dir() / chart / "values.schema.json", "schema")
    problems = check(values, schema)
    if problems:
        raise CliError("values: " + "; ".join(problems))
    return combine(defaults(chart), [values])


def combine_defaults(values: dict[str, Any], name: str = CONTROL_PLANE) -> dict[str, Any]:
    """The chart's defaults with ``values`` over them, unchecked."""
    return combine(defaults(name), [values])
