"""What every command module shares: the help formatter, the SIGTERM exception, and how
an error's fix names the inputs of the command that failed.

cli.py, trace_cli.py and watch_cli.py all import this module and none imports another
command module at module level, so the command modules form no import cycle.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import InspectError

__all__ = ["PROG", "HelpFormatter", "terminal_columns", "Terminated", "INPUTS", "reword"]

PROG = "espfix-inspect"

#: How validate, stacks and snapshot take the inputs an error's fix may ask for
#: (``{core}``, ``{symbols}``, ``{cpus}`` in :attr:`InspectError.fix`).
INPUTS = {"core": "--core", "symbols": "--symbols", "cpus": "--cpu"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's RawDescriptionHelpFormatter, with the width ``shutil.get_terminal_size()``
    would give (``$COLUMNS``, else the terminal's, else 80) found without importing
    shutil: argparse makes a formatter in every ``add_argument`` and its default one
    imports shutil, 25-180 ms of a live ``validate --json`` under TCG (docs/performance.md)
    that never prints help."""

    def __init__(self, prog: str, *args, **kwargs) -> None:
        if len(args) < 3 and kwargs.get("width") is None:
            kwargs["width"] = terminal_columns() - 2
        super().__init__(prog, *args, **kwargs)


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, the same way (Lib/shutil.py)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]  # None: AttributeError
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Terminated(Exception):
    """SIGTERM arrived: unwind (finally blocks kill and reap children), then exit 2."""


def reword(e: InspectError, inputs: dict[str, str]) -> InspectError:
    """*e* with its fix worded for a command that takes the inputs as *inputs* says
    (e.g. ``{"symbols": "--symbols-a"}`` for diff's first side); the data stays."""
    return InspectError(e.cause, e.advice(inputs), path=e.path, role=e.role, field=e.field,
                        address=e.address)
