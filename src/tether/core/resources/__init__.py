"""Typed models of every resource the mesh reads: the one source of truth for validation.

One pydantic model per kind, with Linkerd's API groups, versions and camelCase field names; decoding
is strict (unknown fields are errors). :func:`load_text` turns multi-document YAML into models and
located, actionable errors.
"""

from tether.core.resources.base import Resource, parse_duration, parse_quantity
from tether.core.resources.loader import KINDS, Loaded, LoadError, LoadResult, decode, kind_named, load_text

__all__ = [
    "KINDS",
    "LoadError",
    "LoadResult",
    "Loaded",
    "Resource",
    "decode",
    "kind_named",
    "load_text",
    "parse_duration",
    "parse_quantity",
]
