"""The names and versions of espfix-inspect's JSON documents.

Every JSON document the tool prints, and every line of its JSON streams, carries a
top-level ``"schema": "espfix-inspect/<document>/<major>"``.  The major version is
raised when a key is renamed, removed or changes its type; adding a key is not a new
major.  Each document has a JSON Schema (draft-07) beside this module,
``inspector/schemas/<document>.schema.json``: the tests validate every JSON output
against it, and ``diff`` validates its ``validate --json`` inputs against it.

The vocabulary, the same in every document:

- ``event``, ``time``: a stream line's kind and its wall-clock time (UTC, ISO 8601,
  ``2026-12-01T10:00:00Z``); a stream ends with a ``stop`` event;
- ``cpu``: one CPU number; ``cpus`` in a finding or an event: the CPUs it concerns as
  a CPU-list string (``0-63,128``, the kernel's ``cpulist`` format); ``cpus`` at the
  top of ``layout``/``validate``/``stacks``: the list of per-CPU objects;
  ``nr_cpus``: a count of CPUs;
- addresses are hex strings (``0x...``).

This module imports nothing: a live ``validate --json`` pays no import for it.
"""

from __future__ import annotations

__all__ = ["DOCUMENTS", "schema_id", "schema_file", "error_doc"]

#: document -> major version
DOCUMENTS = {
    "layout": 1, "validate": 1, "stacks": 1, "snapshot": 1, "exercise": 1, "diff": 1,
    "watch": 1, "trace": 1, "error": 1,
}


def schema_id(document: str) -> str:
    """The ``schema`` value of *document*'s JSON: ``espfix-inspect/validate/1``."""
    return f"espfix-inspect/{document}/{DOCUMENTS[document]}"


def schema_file(document: str) -> str:
    """The path of *document*'s JSON Schema file."""
    import os
    return os.path.join(os.path.dirname(__file__), "schemas", f"{document}.schema.json")


def error_doc(command: str | None, cause: str, fix: str = "", exit: int = 2) -> dict:
    """What a ``--json`` run prints on stdout when it cannot inspect: the cause and the
    fix of the one line on stderr, and the exit status."""
    return {"schema": schema_id("error"), "command": command, "error": cause,
            "fix": fix or None, "exit": exit}
