"""inspector/records.py behaves as dataclasses does for what the inspector uses.

Each class body below is decorated twice, once by each module, and every behaviour the
core modules rely on is compared: construction (positional, keyword, defaults,
factories), __post_init__, repr, equality, hashing, frozenness, asdict.  The core
modules' own classes are then checked to be records with the fields they declare.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from inspector import records


def make(deco_module):
    dc, fld = deco_module.dataclass, deco_module.field

    @dc
    class Plain:
        a: int
        b: str = "x"
        c: list[int] = fld(default_factory=list)
        d: dict = fld(default_factory=dict, repr=False)

    @dc(frozen=True)
    class Frozen:
        """A frozen record."""
        name: str
        n: int = 3

    @dc
    class Post:
        a: int
        twice: int = 0

        def __post_init__(self) -> None:
            self.twice = 2 * self.a

    return Plain, Frozen, Post


REF, OURS = make(dataclasses), make(records)


@pytest.mark.parametrize("i", range(3), ids=["plain", "frozen", "post_init"])
def test_same_behaviour_as_dataclasses(i):
    ref, ours = REF[i], OURS[i]
    cases = {0: [((1,), {}), ((1, "y"), {}), ((), {"a": 2, "c": [1]}), ((3, "z", [4], {5: 6}), {})],
             1: [(("a",), {}), (("b", 4), {}), ((), {"name": "c", "n": 5})],
             2: [((4,), {}), ((), {"a": 5})]}[i]
    for args, kwargs in cases:
        r, o = ref(*args, **kwargs), ours(*args, **kwargs)
        assert repr(o) == repr(r)
        assert (o == ours(*args, **kwargs)) and not (o == object())
        assert dataclasses.asdict(r) == records.asdict(o)
        if i == 1:
            assert hash(o) == hash(ours(*args, **kwargs))
            with pytest.raises(AttributeError) as ours_err:
                o.name = "changed"
            with pytest.raises(AttributeError) as ref_err:
                r.name = "changed"
            assert str(ours_err.value) == str(ref_err.value)
            with pytest.raises(AttributeError):
                del o.n
        else:
            with pytest.raises(TypeError):
                hash(o)
    if i == 0:
        assert ours(1).c is not ours(1).c                     # a fresh list each time
        assert ours(1) != ours(2) and ours(1, "y") != ours(1, "x")
    with pytest.raises(TypeError):
        ours()                                                # a required field
    with pytest.raises(TypeError):
        ours(*range(9))                                       # too many


def test_bad_definitions_are_refused():
    with pytest.raises(ValueError):
        @records.dataclass
        class Shared:
            items: list = []                                  # noqa: RUF012
    with pytest.raises(TypeError):
        @records.dataclass
        class Order:
            a: int = 1
            b: int


CORE = {"elfcore": ["Segment", "Note"], "memory": ["ReadStats"], "symbols": ["SymbolTable"],
        "target": ["Target"], "hostfacts": ["HostFacts"],
        "model": ["Randomness", "CpuLayout", "GroupLayout", "MemoryCost"],
        "pagetable": ["Level", "Step", "Walk"], "state": ["KernelInfo", "CpuState", "EspfixState"],
        "audit": ["Finding", "Context", "AuditResult"]}


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_classes_are_records(module):
    mod = importlib.import_module(f"inspector.{module}")
    for name in CORE[module]:
        cls = getattr(mod, name)
        assert [f.name for f in cls.__record_fields__] == list(cls.__annotations__), name
