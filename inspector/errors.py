"""Errors that end an inspection: one line naming the cause and the fix.

Every layer raises :class:`InspectError` for a condition a user can act on
(not root, no /proc/kcore, a foreign symbol file, a truncated core...); the
CLI prints ``espfix-inspect: <cause>: <fix>`` and exits with
:data:`EXIT_CANNOT_INSPECT`.  Anything else is a bug and may show a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_CANNOT_INSPECT = 2


class InspectError(Exception):
    """The inspection cannot go on.  ``cause`` says what, ``fix`` what to do."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def line(self) -> str:
        return f"{self.cause}: {self.fix}" if self.fix else self.cause


class PageFiltered(InspectError):
    """A physical page the inspection needs was filtered out of a crash dump
    (makedumpfile ``-d``): the dump says the page existed but did not save it.
    ``paddr`` is the page.  Checks that meet one report it as an info finding
    instead of failing the whole inspection; ``stacks`` shows an in-use ministack
    page that was filtered as "all zero, filtered" (a kernel page in use is never
    page cache, user or free memory, so only the zero-page filter can drop it)."""

    def __init__(self, cause: str, fix: str = "", paddr: int = 0) -> None:
        super().__init__(cause, fix)
        self.paddr = paddr
