"""The proxy's dataclass methods from shared code behave as the ones ``dataclasses`` generates: the same
classes are made twice, once each way, and used the same way."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tether.core import dataclass_methods

pytestmark = pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="installs on CPython 3.11 only")


def family() -> dict[str, type]:
    """A set of dataclasses covering what the proxy's use: frozen, slots, repr=False fields, nesting,
    inheritance, a class that refers to itself, a non-dataclass subclass."""

    @dataclass
    class Plain:
        a: int
        b: str = "x"
        hidden: list[int] = field(default_factory=list, repr=False)

    @dataclass(frozen=True, slots=True)
    class Key:
        authority: str
        port: int
        labels: tuple[str, ...] = ()

    @dataclass(frozen=True)
    class Empty:
        pass

    @dataclass(frozen=True)
    class Base:
        x: int

    @dataclass(frozen=True)
    class Child(Base):
        y: int = 2

    class Loose(Base):  # not a dataclass: inherits Base's methods
        pass

    @dataclass
    class Node:
        name: str
        next: Any = None

    @dataclass(repr=False)
    class NoRepr:
        a: int

    @dataclass(frozen=True, slots=True)
    class Outer:
        key: Key
        plain: Plain

    return {c.__name__: c for c in (Plain, Key, Empty, Base, Child, Loose, Node, NoRepr, Outer)}


@pytest.fixture
def both() -> Iterator[tuple[dict[str, type], dict[str, type]]]:
    stock = family()
    assert dataclass_methods.install()
    try:
        shared = family()
    finally:
        dataclass_methods.uninstall()
    yield stock, shared


def outcome(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        return "ok", repr(fn())
    except Exception as e:  # the exception's type and message are part of the behaviour
        return type(e).__name__, str(e)


def scenarios(c: dict[str, type]) -> list[tuple[str, str]]:
    plain = c["Plain"](1, "y", [3])
    key = c["Key"]("web:80", 80, ("a",))
    node = c["Node"]("a")
    node.next = node  # a repr that reaches itself
    two = c["Node"]("b", c["Node"]("c"))
    child, loose = c["Child"](1), c["Loose"](5)
    outer = c["Outer"](key, plain)
    steps: list[Callable[[], object]] = [
        lambda: repr(plain), lambda: repr(key), lambda: repr(c["Empty"]()), lambda: repr(child),
        lambda: repr(loose), lambda: repr(node), lambda: repr(two), lambda: repr(outer),
        lambda: repr(c["NoRepr"](1)).split(" object at ")[0],
        lambda: str(key), lambda: f"{outer!s}",
        lambda: setattr(key, "port", 1), lambda: setattr(key, "other", 1), lambda: delattr(key, "port"),
        lambda: delattr(key, "other"), lambda: setattr(c["Empty"](), "z", 1),
        lambda: setattr(child, "x", 9), lambda: setattr(child, "y", 9), lambda: setattr(child, "z", 9),
        lambda: delattr(child, "y"), lambda: setattr(loose, "x", 3), lambda: (setattr(loose, "z", 3), loose.z),
        lambda: delattr(loose, "x"), lambda: (setattr(plain, "a", 7), plain.a),
        lambda: key == c["Key"]("web:80", 80, ("a",)), lambda: hash(key) == hash(c["Key"]("web:80", 80, ("a",))),
        lambda: dataclasses.replace(key, port=81), lambda: copy.copy(key), lambda: copy.deepcopy(outer),
        lambda: pickle.loads(pickle.dumps(key)), lambda: dataclasses.asdict(outer),
        lambda: c["Key"].__repr__.__qualname__, lambda: c["Key"].__setattr__.__qualname__,
        lambda: c["Child"].__delattr__.__qualname__, lambda: c["Plain"].__repr__.__name__,
        lambda: c["Key"].__setattr__.__module__, lambda: c["Plain"].__repr__.__module__,
    ]
    return [outcome(s) for s in steps]


def test_the_shared_methods_behave_as_the_generated_ones(both: tuple[dict[str, type], dict[str, type]]) -> None:
    stock, shared = both
    assert stock["Key"].__repr__ is not shared["Key"].__repr__
    # Pickling finds a class by its module and name: these local classes cannot be pickled either way.
    assert scenarios(shared) == scenarios(stock)


def test_each_class_gets_its_own_methods_named_for_it(both: tuple[dict[str, type], dict[str, type]]) -> None:
    _, shared = both
    key, child = shared["Key"], shared["Child"]
    assert key.__repr__ is not child.__repr__ and key.__setattr__ is not child.__setattr__
    assert key.__repr__.__qualname__.endswith("Key.__repr__")
    assert child.__setattr__.__qualname__.endswith("Child.__setattr__")


def test_install_is_idempotent_and_uninstall_restores_the_module() -> None:
    original = dataclasses._repr_fn  # type: ignore[attr-defined]
    assert dataclass_methods.install() and dataclass_methods.install()
    assert dataclass_methods.installed() and dataclasses._repr_fn is not original  # type: ignore[attr-defined]
    dataclass_methods.uninstall()
    assert not dataclass_methods.installed() and dataclasses._repr_fn is original  # type: ignore[attr-defined]


def test_a_threaded_repr_is_not_mistaken_for_recursion(both: tuple[dict[str, type], dict[str, type]]) -> None:
    """Two objects of one class, one inside the other: the inner one's repr is printed, not '...'."""
    for classes in both:
        inner = classes["Node"]("in")
        outer = classes["Node"]("out", inner)
        assert repr(outer) == repr(classes["Node"]("out", classes["Node"]("in")))
        assert "..." not in repr(outer)
