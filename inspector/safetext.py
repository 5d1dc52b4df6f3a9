"""Text that reaches a terminal: strings from inspected files are escaped, once, at output.

A crafted core can carry escape sequences in OSRELEASE or ``linux_banner``, a task can
name itself anything with ``prctl(PR_SET_NAME)`` (trace prints ``comm``), and a JSON
document given to ``diff`` can hold any message.  Replayed raw, ``ESC ]`` or ``CSI``
sequences rewrite the user's terminal (title, clipboard, scroll-back).  Every text line
the CLI prints goes through :func:`for_terminal`: control characters (C0 except newline
and tab, DEL, C1) and the Unicode bidirectional overrides become visible ``\\xNN`` /
``\\uNNNN`` escapes.  JSON output needs nothing: ``json.dumps`` escapes them itself.

>>> for_terminal("6.1.0\\x1b]0;pwned\\x07")
'6.1.0\\\\x1b]0;pwned\\\\x07'
"""

from __future__ import annotations

import re
import sys

__all__ = ["for_terminal", "print_out"]

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def for_terminal(text: str) -> str:
    """*text* with every character that could drive a terminal shown as an escape."""
    return _UNSAFE.sub(_escape, text)


def print_out(text: str, *, err: bool = False, flush: bool = False) -> None:
    """Print one block of text (a table, a line, a JSON document) with
    :func:`for_terminal` applied: the CLI's only way to reach stdout and stderr."""
    stream = sys.stderr if err else sys.stdout
    stream.write(for_terminal(text) + "\n")
    if flush or err:
        stream.flush()
