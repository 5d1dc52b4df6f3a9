"""The base of the inspector's typed vocabularies: a ``str``-valued :class:`~enum.Enum`.

Severities (:class:`inspector.audit.Severity`), exercise verdicts
(:class:`inspector.exercise.Verdict`) and symbol-table kinds
(:class:`inspector.symbols.SymbolKind`) are enums of this class, so that a typo is
an ``AttributeError`` at import instead of a string nobody checks.  A member *is* its
string value: it compares, hashes, formats and serialises as the bare value, so the
JSON, text and Prometheus output is the same as with plain strings::

    >>> class Colour(StrEnum):
    ...     RED = "red"
    >>> str(Colour.RED), f"{Colour.RED:>5}", Colour.RED == "red", {"red": 1}[Colour.RED]
    ('red', '  red', True, 1)

``enum.StrEnum`` does this from Python 3.11 only; the inspector supports 3.9.  On
3.9-3.10 a ``(str, Enum)`` member formats as its value but ``str()`` gives
``Colour.RED``, and 3.12 changed ``format()`` to follow ``str()``: the three methods
are pinned here so that every version prints the value.  ``Enum.__hash__`` hashes the
member's *name*, which would make ``{"red": 1}[Colour.RED]`` a ``KeyError``: the hash
is the string's.  (``enum`` costs no import time: ``re`` imports it.)
"""

from __future__ import annotations

from enum import Enum

__all__ = ["StrEnum"]


class StrEnum(str, Enum):
    """A ``str`` enum whose members print, format, hash and serialise as their value."""

    __str__ = str.__str__
    __format__ = str.__format__             # type: ignore[assignment]  # str's, on purpose
    __hash__ = str.__hash__
