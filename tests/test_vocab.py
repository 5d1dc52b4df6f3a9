"""The typed vocabularies print, compare, hash and serialise as their bare string value,
so that moving from plain strings to enums changed no JSON, text or metric output, on
every Python the inspector supports (``(str, Enum)`` alone prints ``Severity.ERROR``
through ``str()`` on 3.9-3.10 and through ``format()`` from 3.12)."""

from __future__ import annotations

import json

import pytest
from tabulate import tabulate

from inspector import jsonfmt
from inspector.audit import SEVERITIES, Severity
from inspector.exercise import COULD_NOT_RUN, FINDING_VERDICTS, Verdict
from inspector.symbols import SymbolKind
from inspector.vocab import StrEnum

MEMBERS = [*Severity, *Verdict, *SymbolKind]


@pytest.mark.parametrize("m", MEMBERS, ids=lambda m: f"{type(m).__name__}.{m.name}")
def test_member_is_its_value(m):
    v = m.value
    assert isinstance(m, str) and isinstance(m, StrEnum) and type(v) is str
    assert str(m) == f"{m}" == "%s" % m == f"{m}" == v  # noqa: UP031 - %-formatting is what is tested
    assert f"{m:>16}|{m:<16}" == f"{v:>16}|{v:<16}"
    assert m == v and v == m and hash(m) == hash(v)
    assert {v: 1}[m] == 1 and {m: 1}[v] == 1 and m in {v} and v in (m,)
    assert json.dumps(m) == json.dumps(v)
    assert json.dumps({m: [m]}, indent=2, sort_keys=True) == json.dumps({v: [v]}, indent=2)
    assert "".join(jsonfmt.iterencode({m: [m]})) == "".join(jsonfmt.iterencode({v: [v]}))
    assert tabulate([[m, 1]], headers=["A", "B"], disable_numparse=True) == \
        tabulate([[v, 1]], headers=["A", "B"], disable_numparse=True)
    assert type(m)(v) is m


def test_values_are_the_strings_the_output_always_carried():
    assert [s.value for s in SEVERITIES] == ["error", "warning", "info"]
    assert {v.value for v in Verdict} == {"ok", "LEAK", "NO-FRAME", "CONTROL-FAILED", "IDLE",
                                          "could not run", "?"}
    assert set(FINDING_VERDICTS) == {"LEAK", "NO-FRAME", "CONTROL-FAILED"}
    assert COULD_NOT_RUN == "could not run" and COULD_NOT_RUN not in FINDING_VERDICTS
    assert {k.value for k in SymbolKind} == {"kallsyms", "system.map", "vmlinux", "snapshot"}


def test_unknown_value_is_refused():
    with pytest.raises(ValueError):
        Severity("fatal")
