"""JSON text exactly as ``json.dumps(doc, indent=2)`` writes it, fast for long tables.

The reports print ``json.dumps(doc, indent=2)``.  With ``indent`` set, CPython's
``json`` does not use its C encoder (``json/encoder.py``: ``c_make_encoder`` only when
``indent is None``) and walks every value in Python generators: 1.8 s for the
131,072 per-CPU rows of ``validate --json``, most of that run (docs/performance.md).
The output is kept byte for byte (consumers and the examples in docs/ read it as it
is); only the way it is produced changes:

- a :class:`Columns` value is a list of dicts that all have the same keys, held as
  one list per key.  Each column is encoded with one C-level ``map`` of the encoder
  ``json`` itself uses for that type (``json.encoder.encode_basestring_ascii``,
  ``int.__repr__``), and each row is one ``%`` of a template;
- everything else goes through :func:`iterencode`, the same rules as
  ``json.encoder._make_iterencode`` (``indent=2``, ``ensure_ascii``, no key sorting).

``tests/test_perf.py`` holds :func:`dumps` to ``json.dumps(..., indent=2)`` for every
report and for mixed documents.  :func:`write` sends the text to a file in chunks of
rows, so a 131,072-CPU document never exists as one string.
"""

from __future__ import annotations

from builtins import hex as builtins_hex
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat

try:        # json's own C string encoder, without the json package (and its decoder)
    from _json import encode_basestring_ascii as _str
except ImportError:                                     # pragma: no cover - not CPython
    from json.encoder import encode_basestring_ascii as _str

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import IO

__all__ = ["Columns", "dumps", "write", "iterencode"]

INDENT = "  "
CHUNK_ROWS = 4096


class Columns:
    """A list of rows (dicts with the same *keys*, in that order), held by column.

    Columns named in *hex* hold ints (or None) that the rows carry as ``"0x..."``
    strings (``f"{v:#x}"``), the way the reports write addresses; they are formatted
    once, straight into JSON text.

    >>> import json
    >>> dumps({"cpus": Columns(("cpu", "ok"), [[0, 1], [True, False]])}) == \\
    ...     json.dumps({"cpus": [{"cpu": 0, "ok": True}, {"cpu": 1, "ok": False}]}, indent=2)
    True
    """

    __slots__ = ("keys", "columns", "hex")

    def __init__(self, keys: Sequence[str], columns: Sequence[Sequence],
                 hex: Iterable[str] = ()) -> None:
        if len(keys) != len(columns) or len({len(c) for c in columns}) > 1:
            raise ValueError("one column per key, all of the same length")
        self.keys = tuple(keys)
        self.columns = [list(c) for c in columns]
        self.hex = frozenset(hex)

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def rows(self) -> list[dict]:
        """The rows as dicts (what ``json.dumps`` would be given)."""
        cols = [[None if v is None else f"{v:#x}" for v in c] if k in self.hex else c
                for k, c in zip(self.keys, self.columns)]
        return [dict(zip(self.keys, values)) for values in zip(*cols)]


def _float(o: float) -> str:
    if o != o:
        return "NaN"
    if o == float("inf"):
        return "Infinity"
    if o == -float("inf"):
        return "-Infinity"
    return float.__repr__(o)


def _scalar(o) -> str | None:
    """The text of a scalar as ``json`` writes it, or None for containers."""
    if isinstance(o, str):
        return _str(o)
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return int.__repr__(o)
    if isinstance(o, float):
        return _float(o)
    return None


def _key(k) -> str:
    if isinstance(k, str):
        return _str(k)
    if isinstance(k, float):
        return _str(_float(k))
    if k is True or k is False or k is None:
        return _str({True: "true", False: "false", None: "null"}[k])
    if isinstance(k, int):
        return _str(int.__repr__(k))
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


def iterencode(o, level: int = 0) -> Iterator[str]:
    """Chunks of ``json.dumps(o, indent=2)`` for *o* at nesting *level*."""
    text = _scalar(o)
    if text is not None:
        yield text
    elif isinstance(o, Columns):
        yield from _columns(o, level)
    elif isinstance(o, (list, tuple)):
        if not o:
            yield "[]"
            return
        inner = "\n" + INDENT * (level + 1)
        yield "[" + inner
        for i, v in enumerate(o):
            if i:
                yield "," + inner
            yield from iterencode(v, level + 1)
        yield "\n" + INDENT * level + "]"
    elif isinstance(o, dict):
        if not o:
            yield "{}"
            return
        inner = "\n" + INDENT * (level + 1)
        yield "{" + inner
        for i, (k, v) in enumerate(o.items()):
            yield ("," + inner if i else "") + _key(k) + ": "
            yield from iterencode(v, level + 1)
        yield "\n" + INDENT * level + "}"
    else:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


_BOOL = {True: "true", False: "false"}
_NONE = type(None)


def _column_text(values: list, level: int, hex: bool = False) -> list[str]:
    """Each value of one column as ``json`` writes it at nesting *level*."""
    kinds = set(map(type, values))
    if hex and kinds <= {int, _NONE}:
        if _NONE in kinds:
            return [f'"{v:#x}"' if v is not None else "null" for v in values]
        return list(map('"%#x"'.__mod__, values))
    if kinds <= {str}:
        return list(map(_str, values))
    if kinds <= {int}:
        return list(map(int.__repr__, values))
    if kinds <= {bool}:
        return list(map(_BOOL.__getitem__, values))
    if kinds <= {str, _NONE}:
        return [_str(v) if v is not None else "null" for v in values]
    if kinds <= {int, _NONE}:
        return [int.__repr__(v) if v is not None else "null" for v in values]
    if kinds <= {dict, _NONE}:                 # e.g. a CPU's frame, or null
        present = [v for v in values if v is not None]
        keys = tuple(present[0]) if present else ()
        if keys and all(tuple(v) == keys for v in present):
            texts = _row_texts(keys, [[v[k] for v in present] for k in keys], level)
            texts.reverse()
            return [texts.pop() if v is not None else "null" for v in values]
    if hex:
        values = [None if v is None else f"{v:#x}" for v in values]
    return ["".join(iterencode(v, level)) for v in values]


def _interleave(keys: Sequence, columns: list[list], level: int, hex: frozenset = frozenset(),
                after: str = "") -> str:
    """The rows (dicts at nesting *level*) of *columns*, each followed by *after*, as
    one string: the constant texts (keys, and any column whose value is the same in
    every row) and the varying value texts are interleaved and joined once.  A hex
    column without None is formatted by ``hex()`` with its quotes in the constant text."""
    key_indent = "\n" + INDENT * (level + 1)
    n = len(columns[0])
    pieces: list = []           # constant strings and lists of per-row texts, in order
    for i, (key, values) in enumerate(zip(keys, columns)):
        pieces.append(("{" if i == 0 else ",") + key_indent + _key(key) + ": ")
        if key in hex and set(map(type, values)) == {int}:     # hex(v) == f"{v:#x}"
            pieces += ['"', list(map(builtins_hex, values)), '"']
        else:
            texts = _column_text(values, level + 1, key in hex)
            pieces.append(texts[0] if texts.count(texts[0]) == n else texts)
    pieces.append("\n" + INDENT * level + "}" + after)
    parts: list = []
    for piece in pieces:        # merge neighbouring constants into one
        if isinstance(piece, str) and parts and isinstance(parts[-1], str):
            parts[-1] += piece
        else:
            parts.append(piece)
    varying = [p if isinstance(p, list) else repeat(p, n) for p in parts]
    if len(varying) == 1:
        return parts[0] * n if isinstance(parts[0], str) else "".join(parts[0])
    return "".join(chain.from_iterable(zip(*varying)))


def _row_texts(keys: tuple, columns: list[list], level: int) -> list[str]:
    """The text of each row (a dict at nesting *level* with *keys*) of *columns*."""
    end = "\0"                                  # json escapes NUL, so it cannot occur
    return _interleave(keys, columns, level, after=end).split(end)[:-1]


def _columns(table: Columns, level: int) -> Iterator[str]:
    n = len(table)
    if not n:
        yield "[]"
        return
    sep = ",\n" + INDENT * (level + 1)
    yield "[\n" + INDENT * (level + 1)
    for start in range(0, n, CHUNK_ROWS):
        text = _interleave(table.keys, [c[start:start + CHUNK_ROWS] for c in table.columns],
                           level + 1, table.hex, sep)
        yield text if start + CHUNK_ROWS < n else text[:-len(sep)]
    yield "\n" + INDENT * level + "]"


def dumps(doc) -> str:
    """``json.dumps(doc, indent=2)``, with :class:`Columns` written as lists of dicts."""
    return "".join(iterencode(doc))


def write(fp: IO[str], doc, end: str = "\n") -> None:
    """Write ``dumps(doc) + end`` to *fp* chunk by chunk."""
    pending: list[str] = []
    size = 0
    for chunk in iterencode(doc):
        pending.append(chunk)
        size += len(chunk)
        if size >= 1 << 20:
            fp.write("".join(pending))
            pending.clear()
            size = 0
    pending.append(end)
    fp.write("".join(pending))
