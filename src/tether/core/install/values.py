"""Chart values as a user gives them: ``--set`` strings, values files, and the schema both tether and
Helm check them against (generated from the chart's defaults, so an unknown key is refused).

Pure: texts and mappings in, merged values or a :class:`ValuesInputError` naming the key out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tether.core.inject.values import merge

# Keys the seeds use that belong elsewhere: refused with what to do instead.
MISPLACED = {
    "linkerd-sip": "not a value of the control-plane chart; the issuer's certificate and key are "
                   "identity.issuer.tls.crtPEM and identity.issuer.tls.keyPEM "
                   "(or --identity-issuer-certificate-file / --identity-issuer-key-file)",
    "dashboard": "belongs to the viz extension: tether viz install --set dashboard....",
    "prometheus": "belongs to the viz extension: tether viz install --set prometheus....",
    "grafana": "belongs to the viz extension: tether viz install --set grafana....",
}
_INT = re.compile(r"^-?[0-9]+$")


class ValuesInputError(ValueError):
    """A --set, --set-file or values file is malformed or names an unknown key."""


def _scalar(text: str) -> Any:
    """Helm's --set typing: true/false, null, integers; everything else a string."""
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if _INT.match(text) and (text == "0" or not text.lstrip("-").startswith("0")):
        return int(text)
    return text


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside braces, honouring backslash escapes."""
    out, cur, depth, i = [], "", 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            # An escaped separator is kept as text; other escapes (\. in a key) are left for the key.
            cur += text[i + 1] if text[i + 1] in (sep, "{", "}") else text[i : i + 2]
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    out.append(cur)
    return out


def set_value(values: dict[str, Any], path: str, value: Any, flag: str) -> None:
    """Set the dotted ``path`` (``proxy.resources.cpu.limit``) in ``values``, making maps as needed."""
    parts = [p for p in re.split(r"(?<!\\)\.", path)]
    parts = [p.replace("\\.", ".") for p in parts]
    if not path or any(not p for p in parts):
        raise ValuesInputError(f"{flag} {path!r}: not a key path like proxy.logLevel")
    node = values
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_set(items: Sequence[str], flag: str = "--set", *, as_string: bool = False) -> dict[str, Any]:
    """``--set a.b=c,d=e`` (repeatable) as nested values; ``{x,y}`` is a list."""
    out: dict[str, Any] = {}
    for item in items:
        for assignment in _split(item, ","):
            key, eq, raw = assignment.partition("=")
            if not eq:
                raise ValuesInputError(f"{flag} {assignment!r}: expected KEY=VALUE")
            value: Any
            if raw.startswith("{") and raw.endswith("}"):
                value = [_scalar(x) for x in _split(raw[1:-1], ",") if x != ""]
            else:
                value = raw if as_string else _scalar(raw)
            set_value(out, key.strip(), value, flag)
    return out


def schema_for(defaults: Any, path: str = "") -> dict[str, Any]:
    """A JSON schema admitting what ``defaults`` has: known keys only (empty maps are free-form)."""
    if isinstance(defaults, bool):
        return {"type": "boolean"}
    if isinstance(defaults, int):
        return {"type": "integer"}
    if isinstance(defaults, float):
        return {"type": "number"}
    if isinstance(defaults, str) or defaults is None:
        # --set types 1 as an integer; a string value may be given as a number.
        return {"type": ["string", "number", "null"]}
    if isinstance(defaults, list):
        return {"type": "array"}
    if isinstance(defaults, Mapping):
        if not defaults:
            return {"type": "object"}
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {k: schema_for(v, f"{path}.{k}" if path else k) for k, v in defaults.items()},
        }
    raise TypeError(f"{path}: unexpected default {defaults!r}")


def _type_ok(value: Any, types: str | list[str]) -> bool:
    names = [types] if isinstance(types, str) else types
    for t in names:
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "number" and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if t == "string" and isinstance(value, str):
            return True
        if t == "null" and value is None:
            return True
        if t == "array" and isinstance(value, list):
            return True
        if t == "object" and isinstance(value, Mapping):
            return True
    return False


def check(values: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Every problem of ``values`` against ``schema`` (the subset :func:`schema_for` writes)."""
    problems: list[str] = []
    if not _type_ok(values, schema["type"]):
        want = schema["type"] if isinstance(schema["type"], str) else " or ".join(schema["type"])
        return [f"{path or 'values'}: {values!r} is not {want}"]
    if isinstance(values, Mapping) and schema.get("additionalProperties") is False:
        props = schema.get("properties", {})
        for key, value in values.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in props:
                hint = MISPLACED.get(str(key)) if not path else None
                problems.append(f"{where}: unknown value" + (f": {hint}" if hint else
                                                              f" (known here: {', '.join(sorted(props))})"))
            else:
                problems.extend(check(value, props[key], where))
    return problems


def combine(defaults: Mapping[str, Any], layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The defaults with each layer merged over in order (values files, then --set, as Helm)."""
    out = dict(defaults)
    for layer in layers:
        out = merge(out, layer)
    return out
