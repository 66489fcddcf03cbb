"""Log level specs and one-line output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tether.proxy.logging import (
    OFF,
    TRACE,
    LogControl,
    LogSpecError,
    configure_logging,
    parse_spec,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in ("tether", "tether.proxy", "tether.proxy.http", "other"):
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_parse_spec() -> None:
    spec = parse_spec("warn,tether=info,tether.proxy.http=debug")
    assert spec.root == logging.WARNING
    assert spec.targets == (("tether", logging.INFO), ("tether.proxy.http", logging.DEBUG))
    assert spec.text == "warn,tether=info,tether.proxy.http=debug"
    assert parse_spec("TRACE").root == TRACE
    assert parse_spec("off").root == OFF
    assert parse_spec(" tether::proxy = error , warning ").targets == (("tether.proxy", logging.ERROR),)
    assert parse_spec("tether=debug").root == logging.WARNING  # no bare level: the default root


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("tether=loud", "'tether=loud': unknown level 'loud'"),
        ("warn,verbose", "'verbose': unknown level"),
        ("a b=info", "'a b' is not a logger name"),
        ("=info", "'' is not a logger name"),
        ("info,debug", "'debug': a second bare level"),
        ("", "is empty"),
        (" , ", "is empty"),
    ],
)
def test_bad_specs_name_the_bad_part(spec: str, names: str) -> None:
    with pytest.raises(LogSpecError) as e:
        parse_spec(spec)
    assert names in str(e.value)


def test_control_applies_and_replaces_at_runtime() -> None:
    control = LogControl("warn,tether=info,tether.proxy.http=debug")
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("tether.proxy.http").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("tether.proxy").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("other").isEnabledFor(logging.INFO)

    control.set("error,tether.proxy=debug")
    assert control.spec == "error,tether.proxy=debug"
    # Targets the new spec does not name go back to inheriting.
    assert logging.getLogger("tether").level == logging.NOTSET
    assert logging.getLogger("tether.proxy.http").level == logging.NOTSET
    assert logging.getLogger("tether.proxy.http").isEnabledFor(logging.DEBUG)  # from tether.proxy
    assert not logging.getLogger("tether").isEnabledFor(logging.WARNING)

    with pytest.raises(LogSpecError):
        control.set("tether=nope")
    assert control.spec == "error,tether.proxy=debug", "a bad spec leaves the levels as they were"


def test_plain_output_is_one_line_per_event() -> None:
    out = io.StringIO()
    configure_logging("info", "plain", out)
    lg = logging.getLogger("tether.proxy")
    lg.info("accepted\nconnection", extra={"peer": "10.0.0.1:5"})
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        lg.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert " INFO tether.proxy: accepted\\nconnection peer=10.0.0.1:5" in lines[0]
    assert lines[0].endswith("peer=10.0.0.1:5")
    assert "ERROR tether.proxy: failed error=ValueError('bad\\nthing')" in lines[1]
    assert lines[0][:4].isdigit() and "Z " in lines[0]


def test_plain_output_uses_linkerds_level_names() -> None:
    out = io.StringIO()
    configure_logging("trace", "plain", out)
    lg = logging.getLogger("tether.levels")
    lg.log(TRACE, "t")
    lg.warning("w")
    lg.critical("c")
    levels = [line.split()[1] for line in out.getvalue().splitlines()]
    assert levels == ["TRACE", "WARN", "ERROR"]


def test_json_output() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("tether.x").warning("slow %s", "peer", extra={"ms": 12})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("tether.x").exception("oops")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "WARN"  # Linkerd's spelling
    assert first["target"] == "tether.x"
    assert first["message"] == "slow peer"
    assert first["fields"] == {"ms": 12}
    assert second["error"] == "RuntimeError('boom')"
    assert "Traceback" in second["traceback"]  # debug enabled: traceback kept, still one line


def test_configure_replaces_its_own_handler_and_rejects_bad_format() -> None:
    out1, out2 = io.StringIO(), io.StringIO()
    configure_logging("info", "plain", out1)
    configure_logging("info", "plain", out2)
    logging.getLogger("tether").info("once")
    assert out1.getvalue() == "" and out2.getvalue().count("once") == 1
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure_logging("info", "xml")
