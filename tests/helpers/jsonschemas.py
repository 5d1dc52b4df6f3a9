"""Every JSON output the host tests parse is checked against its schema.

``loads(text)`` / ``loads_lines(text)`` parse a command's ``--json`` output (a
document, or a stream of one object per line) and validate each object against the
JSON Schema its ``schema`` key names (inspector/schemas/<document>.schema.json, through
python3-jsonschema, the library ``diff`` uses).  ``check(doc)`` does the same for an
object already parsed.  A missing or unknown ``schema`` key fails too.
"""

from __future__ import annotations

import functools
import json

import jsonschema

from inspector.schema import DOCUMENTS, schema_file, schema_id

__all__ = ["check", "loads", "loads_lines", "validator"]


@functools.cache
def validator(document: str) -> jsonschema.Draft7Validator:
    with open(schema_file(document)) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _document(doc: object) -> str:
    assert isinstance(doc, dict), f"a JSON output that is not an object: {str(doc)[:200]}"
    sid = doc.get("schema")
    for name in DOCUMENTS:
        if sid == schema_id(name):
            return name
    raise AssertionError(f"no known schema key in {str(doc)[:300]}")


def check(doc: object, document: str | None = None) -> dict:
    """*doc*, after checking it against the schema it names (and is *document*'s)."""
    name = _document(doc)
    if document is not None:
        assert name == document, f"a {name} document where {document} was expected"
    error = jsonschema.exceptions.best_match(validator(name).iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise AssertionError(f"{name} JSON does not match its schema at {where}: "
                             f"{error.message[:500]}")
    assert isinstance(doc, dict)
    return doc


def loads(text: str, document: str | None = None) -> dict:
    """One JSON document (a command's whole stdout), checked."""
    return check(json.loads(text), document)


def loads_lines(text: str, document: str | None = None) -> list[dict]:
    """A JSON stream (one object per non-empty line), each line checked."""
    return [check(json.loads(line), document) for line in text.splitlines() if line.strip()]
