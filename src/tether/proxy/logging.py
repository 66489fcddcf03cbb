"""Log level specs (``warn,tether=info,tether.proxy.http=debug``) and one-line log output.

A spec is a comma-separated list: a bare level sets the root logger; ``target=level`` sets the
Python logger named ``target`` (``::`` is accepted for ``.``, as in Linkerd's Rust targets). Levels:
trace, debug, info, warn (warning), error, off. The spec can be replaced at runtime (the admin
server's PUT /proxy-log-level); targets the new spec no longer names go back to inheriting.

Output is one line per event, ``plain`` or ``json``; tracebacks are folded into that line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import TextIO

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
OFF = logging.CRITICAL + 10

LEVELS: dict[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": OFF,
}
FORMATS = ("plain", "json")

_TARGET = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*\Z")
_MAX_SPEC = 4096


class LogSpecError(ValueError):
    """A log level spec could not be parsed; the message names the bad part."""


@dataclass(frozen=True, slots=True)
class LogSpec:
    root: int
    targets: tuple[tuple[str, int], ...]
    text: str


def parse_level(word: str, part: str) -> int:
    level = LEVELS.get(word.strip().lower())
    if level is None:
        raise LogSpecError(
            f"log level spec part {part!r}: unknown level {word.strip()!r}"
            f" (expected one of trace, debug, info, warn, error, off)"
        )
    return level


def parse_spec(text: str, default_root: int = logging.WARNING) -> LogSpec:
    """Parse a spec; raises LogSpecError naming the offending part."""
    if len(text) > _MAX_SPEC:
        raise LogSpecError(f"log level spec is longer than {_MAX_SPEC} characters")
    root: int | None = None
    targets: dict[str, int] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        name, eq, word = part.partition("=")
        if not eq:
            level = parse_level(name, part)
            if root is not None:
                raise LogSpecError(f"log level spec part {part!r}: a second bare level (only one allowed)")
            root = level
            continue
        target = name.strip().replace("::", ".")
        if not _TARGET.match(target):
            raise LogSpecError(f"log level spec part {part!r}: {name.strip()!r} is not a logger name")
        targets[target] = parse_level(word, part)
    if root is None and not targets:
        raise LogSpecError(f"log level spec {text!r} is empty")
    parts = [_level_name(root)] if root is not None else []
    parts += [f"{t}={_level_name(lv)}" for t, lv in targets.items()]
    normalized = ",".join(parts)
    return LogSpec(default_root if root is None else root, tuple(targets.items()), normalized)


def _level_name(level: int) -> str:
    for name, lv in LEVELS.items():
        if lv == level and name != "warning":
            return name
    return str(level)


class LogControl:
    """The process's current log levels; ``set(spec)`` applies a new spec at once."""

    def __init__(self, spec: str = "warn,tether=info") -> None:
        self._applied: tuple[str, ...] = ()
        self._spec = parse_spec(spec)
        self._apply(self._spec)

    @property
    def spec(self) -> str:
        """The current spec, normalized (what GET /proxy-log-level returns)."""
        return self._spec.text

    def set(self, text: str) -> None:
        """Parse and apply a new spec; on LogSpecError the current levels stay."""
        new = parse_spec(text)
        self._apply(new)
        self._spec = new

    def _apply(self, spec: LogSpec) -> None:
        named = {t for t, _ in spec.targets}
        for target in self._applied:
            if target not in named:
                logging.getLogger(target).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(spec.root)
        for target, level in spec.targets:
            logging.getLogger(target).setLevel(level)
        self._applied = tuple(named)


# Attributes every LogRecord has; anything else was passed with ``extra=`` and becomes a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


# Linkerd's level names (the proxy's tracing output and the Go controllers' logs print WARN, not WARNING).
_LEVEL_NAMES = {TRACE: "TRACE", logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
                logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}


def level_name(levelno: int) -> str:
    """The Linkerd spelling of a Python level: ``WARN`` for WARNING, ``ERROR`` for CRITICAL too."""
    return _LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(created: float) -> str:
    t = time.gmtime(created)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', t)}.{int(created % 1 * 1_000_000):06d}Z"


class PlainFormatter(logging.Formatter):
    """``2026-11-22T21:53:10.123456Z  INFO tether.proxy: message key=value`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record.created)} {level_name(record.levelno):>5} {record.name}: {record.getMessage()}"
        for k, v in _fields(record).items():
            line += f" {k}={v}"
        if record.exc_info and record.exc_info[1] is not None:
            line += f" error={record.exc_info[1]!r}"
            if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line.replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp, level, target, message, fields, error."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "timestamp": _timestamp(record.created),
            "level": level_name(record.levelno),
            "target": record.name,
            "message": record.getMessage(),
        }
        fields = _fields(record)
        if fields:
            obj["fields"] = fields
        if record.exc_info and record.exc_info[1] is not None:
            obj["error"] = repr(record.exc_info[1])
            if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


_HANDLER_MARK = "_tether_handler"


def configure_logging(
    spec: str = "warn,tether=info", fmt: str = "plain", stream: TextIO | None = None
) -> LogControl:
    """Install the one-line handler on the root logger and apply ``spec``; returns the control.

    Raises LogSpecError for a bad spec and ValueError for a format other than plain or json.
    Calling it again replaces the handler it installed before.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    control = LogControl(spec)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
    root.addHandler(handler)
    return control
