"""`tether apply -f`, `tether delete -f`, `tether get KIND`: the local store's resources, like kubectl.

These read and write the store directory directly (``--resources-dir``, default
``$TETHER_RESOURCES_DIR`` or ``.tether/resources``); a running `tether controller destination` over
the same directory picks the change up within a second. ``--dry-run`` validates only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from tether.cli.main import CliError

DEFAULT_DIR = ".tether/resources"


def _dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resources-dir",
        default=os.environ.get("TETHER_RESOURCES_DIR", DEFAULT_DIR),
        help=f"the local store's directory (default $TETHER_RESOURCES_DIR or {DEFAULT_DIR})",
    )


def register(subparsers: Any) -> None:
    for name, func, what in (("apply", _apply, "create or update"), ("delete", _delete, "delete")):
        p = subparsers.add_parser(name, help=f"{what} resources in the local store from YAML")
        p.add_argument(
            "-f",
            "--filename",
            action="append",
            required=True,
            metavar="FILE|DIR|-",
            help="a YAML file (multi-document), a directory of them, or - for stdin; repeatable",
        )
        p.add_argument(
            "--dry-run",
            nargs="?",
            const="client",
            choices=("client", "server", "none"),
            default="none",
            help="validate and report without writing",
        )
        _dir_flag(p)
        p.set_defaults(func=func)
    p = subparsers.add_parser("get", help="list resources of a kind in the local store")
    p.add_argument("kind", metavar="KIND", help="a kind: ServiceProfile (sp), HTTPRoute, Service (svc), ...")
    p.add_argument("-n", "--namespace", help="only this namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (the default)")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.add_argument("--state-dir", default=".tether", help="local state (workload registry) for `get workloads`")
    _dir_flag(p)
    p.set_defaults(func=_get)


def _report_errors(e: Exception) -> int:
    from tether.platform.local.apply import ApplyError

    assert isinstance(e, ApplyError)
    for line in e.errors:
        print(f"error: {line}", file=sys.stderr)
    print(f"tether: nothing was written ({len(e.errors)} error(s))", file=sys.stderr)
    return 1


def _apply(args: argparse.Namespace) -> int:
    from tether.platform.local import apply as lib

    dry = args.dry_run != "none"
    try:
        report = lib.apply(args.resources_dir, lib.read_inputs(args.filename), dry_run=dry)
    except lib.ApplyError as e:
        return _report_errors(e)
    for n in report.notices:
        print(f"notice: {n}", file=sys.stderr)
    for o in report.outcomes:
        print(o.line(dry))
    return 0


def _delete(args: argparse.Namespace) -> int:
    from tether.platform.local import apply as lib

    dry = args.dry_run != "none"
    try:
        report = lib.delete(args.resources_dir, lib.read_inputs(args.filename), dry_run=dry)
    except lib.ApplyError as e:
        return _report_errors(e)
    missing = 0
    for o in report.outcomes:
        if o.action == "not found":
            missing += 1
            print(f"error: {o.ref}{' -n ' + o.namespace if o.namespace else ''} not found", file=sys.stderr)
        else:
            print(o.line(dry))
    return 1 if missing else 0


def _get(args: argparse.Namespace) -> int:
    from tether.platform.local import apply as lib

    try:
        objs = lib.get(args.resources_dir, args.kind, args.namespace, args.state_dir)
    except ValueError as e:
        raise CliError(f"get: {e}") from None
    docs = [o.dump() for o in objs]
    if args.output == "json":
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": docs}, sort_keys=False), end="")
    elif not objs:
        where = f" in namespace {args.namespace}" if args.namespace else ""
        print(f"No resources found{where}.", file=sys.stderr)
    else:
        rows = [("NAMESPACE", "NAME", "APIVERSION")] + [(o.namespace or "-", o.name, o.api_version) for o in objs]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
