"""``@dataclass`` for the modules a live ``validate`` imports, without ``dataclasses``.

Under QEMU/TCG, importing the standard library's ``dataclasses`` (it imports
``inspect``) and ``typing``, and letting dataclasses process the nineteen record
classes of the inspector's core modules, took 0.26 s of the imports of a live
``validate``: in one trixie guest, with and without, ``validate`` took 1.48 and 1.09 s
against drgn's 2.19 s (docs/performance.md).  This module is the part of
``dataclasses`` those classes use, written down once: the fields are the class
annotations in order, a default is a class attribute or a :func:`field`.  ``__init__``
is generated as source and compiled, as ``dataclasses`` does, so making an instance
costs the same; the other methods are closures over the field names, so defining a
class costs no more compiling (0.06 ms a class on this host, against 0.36-0.64 ms for
``dataclasses`` on Python 3.13).

Supported (and nothing else): ``@dataclass`` and ``@dataclass(frozen=True)``;
``field(default=, default_factory=, repr=)``; ``__init__`` (which calls
``__post_init__`` when the class has one), ``__repr__``, ``__eq__`` (same class, fields
compared as a tuple), and for frozen classes ``__setattr__``/``__delattr__`` raising
:class:`FrozenInstanceError` and a ``__hash__`` of the fields; non-frozen classes are
unhashable, as with ``eq=True``.  :func:`asdict` converts records, lists, tuples and
dicts recursively.  Classes that need more (``fields()``, ``replace()``, inheritance)
use ``dataclasses`` itself.  ``tests/test_records.py`` holds this to ``dataclasses``.
"""

from __future__ import annotations

__all__ = ["dataclass", "field", "asdict", "FrozenInstanceError", "MISSING"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record (as ``dataclasses.FrozenInstanceError``)."""


class Field:
    __slots__ = ("name", "default", "default_factory", "repr")

    def __init__(self, default=MISSING, default_factory=MISSING, repr: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


def _field(*, default=MISSING, default_factory=MISSING, repr: bool = True):
    """A field with a default, a default factory, or left out of ``repr``."""
    return Field(default, default_factory, repr)


def _fields(cls: type) -> list[Field]:
    out = []
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        if isinstance(value, Field):
            if f.default is MISSING:
                delattr(cls, name)              # no class attribute for factories
            else:
                setattr(cls, name, f.default)
        if isinstance(f.default, (list, dict, set)):
            raise ValueError(f"mutable default {type(f.default).__name__} for field "
                             f"{name} is not allowed: use default_factory")
        out.append(f)
    seen_default = False
    for f in out:
        has = f.default is not MISSING or f.default_factory is not MISSING
        if seen_default and not has:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
        seen_default = seen_default or has
    return out


def _process(cls: type, frozen: bool) -> type:
    fields = _fields(cls)
    names = tuple(f.name for f in fields)
    shown = tuple(f.name for f in fields if f.repr)
    env: dict = {"MISSING": MISSING, "__dataclass_builtins_object__": object}
    params, body = [], []
    set_ = "__dataclass_builtins_object__.__setattr__(self, {0!r}, {1})" if frozen \
        else "self.{0} = {1}"
    for f in fields:
        if f.default_factory is not MISSING:
            env[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=MISSING")
            value = f"_factory_{f.name}() if {f.name} is MISSING else {f.name}"
        elif f.default is not MISSING:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
            value = f.name
        else:
            params.append(f.name)
            value = f.name
        body.append(set_.format(f.name, value))
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    # Only __init__ is compiled (instances are made by the hundred thousand); the rest
    # are closures over the field names, which cost nothing to define.
    exec("\n".join([f"def __init__(self, {', '.join(params)}):" if params
                    else "def __init__(self):", *(f"    {line}" for line in body or ["pass"])]),
         env)                           # noqa: S102 - source built above from field names

    def __repr__(self) -> str:
        return f"{self.__class__.__qualname__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in shown) + ")"

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return tuple(getattr(self, n) for n in names) == \
                tuple(getattr(other, n) for n in names)
        return NotImplemented

    methods = {"__init__": env["__init__"], "__repr__": __repr__, "__eq__": __eq__}
    if frozen:
        def __setattr__(self, name: str, value) -> None:
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            super(cls, self).__setattr__(name, value)   # type: ignore[arg-type]  # cls is a class

        def __delattr__(self, name: str) -> None:
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            super(cls, self).__delattr__(name)          # type: ignore[arg-type]  # cls is a class

        def __hash__(self) -> int:
            return hash(tuple(getattr(self, n) for n in names))
        methods.update(__setattr__=__setattr__, __delattr__=__delattr__, __hash__=__hash__)
    for name, fn in methods.items():
        if name not in cls.__dict__:
            fn.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, fn)
    if not frozen and "__hash__" not in cls.__dict__:
        cls.__hash__ = None             # type: ignore[assignment]  # eq without frozen
    cls.__record_fields__ = tuple(fields)   # type: ignore[attr-defined]
    cls.__match_args__ = names              # type: ignore[attr-defined,misc]
    return cls


def _dataclass(cls: type | None = None, *, frozen: bool = False):
    """The record decorator: ``@dataclass`` or ``@dataclass(frozen=True)``."""
    if cls is None:
        return lambda c: _process(c, frozen)
    return _process(cls, frozen)


def _asdict(obj) -> dict:
    """A record as a dict, records, lists, tuples and dicts inside converted too."""
    return _plain(obj)


def _plain(obj):
    if hasattr(type(obj), "__record_fields__"):
        return {f.name: _plain(getattr(obj, f.name)) for f in type(obj).__record_fields__}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    return obj


TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    # Type checkers see the standard library's, whose behaviour these copy (and
    # tests/test_records.py holds them to), so mypy knows each record's __init__.
    from dataclasses import asdict, dataclass, field
else:
    dataclass, field, asdict = _dataclass, _field, _asdict
