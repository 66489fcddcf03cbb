"""Dataclass methods from shared code instead of source compiled per class (the proxy's idle RSS).

``dataclasses`` writes each class's methods as source text and compiles it (``exec``) when the class
is created. :func:`install` makes it build two kinds as closures over shared code instead, which
takes ~0.2 MiB off a meshed proxy's idle RSS (issue 16, docs/notes/issue-16-idlemem2.md). Each class
still gets its own function objects, named and ``__qualname__``-d as before, and each behaves exactly
as the generated one:

- ``__repr__``: ``Cls(a=1, b='x')`` over the ``repr`` fields, ``...`` when it reaches itself again
  (the module's guard per method, without its wrapper function per class);
- frozen ``__setattr__``/``__delattr__``: ``FrozenInstanceError`` when ``type(self) is cls`` or the
  name is a field's, else ``super(cls, self)``'s, for the same ``cls`` the module would close over.

``__init__``, ``__eq__`` and ``__hash__`` stay generated: they run per request (dictionary keys,
comparisons) and the generated ones are faster (specialised attribute loads), where a shared
``__eq__`` took 1.5x the time. A frozen class's ``__setattr__`` never runs but to refuse, and a
``__repr__`` runs for logs and errors.

Only on the CPython whose ``dataclasses`` this was written against (3.11, what tether pins); anywhere
else :func:`install` changes nothing. Only the proxy installs it (``tether proxy``'s start), before it
imports its modules.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from _thread import get_ident
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["install", "installed", "uninstall"]

# The module's functions this replaces, with the signatures they have in 3.11.
_REPLACED = {
    "_repr_fn": "(fields, globals)",
    "_frozen_get_del_attr": "(cls, fields, globals)",
}
_originals: dict[str, Any] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def _in_module(fn: _F, globals: dict[str, Any]) -> _F:
    """``fn`` with the ``__module__`` a generated method has: the class's module."""
    fn.__module__ = globals.get("__name__", fn.__module__)
    return fn


# The reprs running now, by (object, thread, method): a repr that reaches itself again prints "...",
# as the module's per-method guard does (the method's own names tuple stands for the method).
_repr_running: set[tuple[int, int, int]] = set()


def _repr_fn(fields: Sequence[dataclasses.Field[Any]], globals: dict[str, Any]) -> Callable[[object], str]:
    names = tuple(f.name for f in fields)

    def __repr__(self: object) -> str:
        key = (id(self), get_ident(), id(names))
        if key in _repr_running:
            return "..."
        _repr_running.add(key)
        try:
            return (self.__class__.__qualname__ + "("
                    + ", ".join([f"{name}={getattr(self, name)!r}" for name in names]) + ")")
        finally:
            _repr_running.discard(key)

    return _in_module(__repr__, globals)


def _frozen_get_del_attr(cls: Any, fields: Sequence[dataclasses.Field[Any]],
                         globals: dict[str, Any]) -> tuple[Callable[..., None], Callable[..., None]]:
    names = tuple(f.name for f in fields)
    error = dataclasses.FrozenInstanceError

    def __setattr__(self: object, name: str, value: object) -> None:
        if type(self) is cls or name in names:
            raise error(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in names:
            raise error(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    return _in_module(__setattr__, globals), _in_module(__delattr__, globals)


_REPLACEMENTS: dict[str, Any] = {
    "_repr_fn": _repr_fn,
    "_frozen_get_del_attr": _frozen_get_del_attr,
}


def _supported() -> bool:
    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
        return False
    for name, signature in _REPLACED.items():
        fn = getattr(dataclasses, name, None)
        if fn is None or str(inspect.signature(fn)) != signature:
            return False
    return True


def install() -> bool:
    """Use the shared methods for dataclasses created from now on; True when installed."""
    if _originals:
        return True
    if not _supported():
        return False
    for name, replacement in _REPLACEMENTS.items():
        _originals[name] = getattr(dataclasses, name)
        setattr(dataclasses, name, replacement)
    return True


def uninstall() -> None:
    """Back to the module's own generated methods (classes made meanwhile keep theirs)."""
    for name, original in _originals.items():
        setattr(dataclasses, name, original)
    _originals.clear()


def installed() -> bool:
    return bool(_originals)
