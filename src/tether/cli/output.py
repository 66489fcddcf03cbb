"""How commands print data: ``-o table`` (default), ``-o wide``, ``-o json``, ``-o yaml``.

A command builds its result as plain data (dicts with camelCase keys, in a fixed order: that order
is the stable contract of ``-o json`` and ``-o yaml``) and a list of :class:`Column` for the table;
:func:`emit` prints it in the chosen format. Tables are aligned like kubectl's and Linkerd's
(upper-case headers, columns separated by three spaces, no borders, never wrapped), so they can be
piped to ``awk`` and ``column``. ``-o wide`` adds the columns marked ``wide``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import click

FORMATS = ("table", "wide", "json", "yaml")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Mapping[str, Any]], object]  # from one item of the data
    wide: bool = False  # shown only with -o wide


def output_option(formats: Sequence[str] = FORMATS, default: str = "table") -> Callable[[F], F]:
    """The ``-o/--output`` flag, limited to ``formats``."""
    notes = {"wide": "wide (the table with more columns)"}
    names = [notes.get(f, f) for f in formats]
    shown = ", ".join(names[:-1]) + " or " + names[-1]
    return click.option(
        "-o", "--output", type=click.Choice(list(formats)), default=default, show_default=True,
        help=f"output format: {shown}",
    )


def render_table(rows: Iterable[Sequence[object]], headers: Sequence[str]) -> str:
    """Columns aligned to their widest cell, three spaces apart; empty cells print ``-``."""
    cells = [[h.upper() for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _cell(v: object) -> str:
    if v is None or v == "" or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple):
        return ",".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def dump(doc: object, fmt: str, out: TextIO | None = None) -> None:
    """Print ``doc`` as JSON (2-space indent) or YAML, keys in the order the command built them."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(doc, indent=2, default=str) + "\n")
    elif fmt == "yaml":
        import yaml

        out.write(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    else:
        raise ValueError(f"dump: {fmt!r} is not json or yaml")


def emit(
    items: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: str,
    out: TextIO | None = None,
    empty: str = "No resources found.",
) -> None:
    """Print ``items``: a table (``wide`` adds columns), or ``{"items": [...]}`` as JSON/YAML."""
    out = out or sys.stdout
    if fmt in ("json", "yaml"):
        dump({"items": [dict(i) for i in items]}, fmt, out)
        return
    if not items:
        # Like kubectl: the note goes to stderr so a pipeline sees no rows, not a sentence.
        click.echo(empty, err=True)
        return
    cols = [c for c in columns if fmt == "wide" or not c.wide]
    out.write(render_table(([c.value(i) for c in cols] for i in items), [c.header for c in cols]))
