"""Progress of a long run on stderr, one line updated in place (``cpu 37/128``).

Shown only when stderr is a terminal: a log file, a pipe, the journal or a test
sees nothing.  Updates are rate-limited (one write per :data:`INTERVAL` seconds at
most), so a loop may call :meth:`Progress.update` on every item.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import IO

__all__ = ["Progress", "INTERVAL"]

#: Seconds between two updates of the line.
INTERVAL = 0.2


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):        # closed or not a file
        return False


class Progress:
    """``with Progress("cpu", 128) as p: ... p.update(i + 1)`` draws ``cpu 37/128``.

    *stream* defaults to ``sys.stderr``; *tty* overrides the terminal test (tests).
    The line is erased when the block ends, so the output that follows starts clean.
    """

    def __init__(self, label: str, total: int, stream: IO[str] | None = None,
                 tty: bool | None = None, interval: float | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.on = _isatty(self.stream) if tty is None else tty
        self.interval = INTERVAL if interval is None else interval
        self._next = 0.0
        self._shown = 0                 # length of the line on screen

    def update(self, done: int, label: str | None = None) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if now < self._next and done < self.total:
            return
        self._next = now + self.interval
        if label is not None:
            self.label = label
        self._draw(f"{self.label} {done}/{self.total}")

    def note(self, text: str) -> None:
        """Replace the line with *text* (a phase that has no count, e.g. drawing)."""
        if self.on:
            self._draw(text)

    def _draw(self, line: str) -> None:
        pad = " " * max(0, self._shown - len(line))
        try:
            self.stream.write(f"\r{line}{pad}")
            self.stream.flush()
        except (OSError, ValueError):
            self.on = False
            return
        self._shown = len(line)

    def close(self) -> None:
        if self.on and self._shown:
            try:
                self.stream.write("\r" + " " * self._shown + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._shown = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
