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


#: How a fix names the inputs when no command says how they are given (the CLI passes
#: its own words: ``--symbols``, ``--symbols-a``, a watch.conf key).
INPUT_WORDS = {"core": "the core", "symbols": "the symbol file", "cpus": "the CPU list"}


class InspectError(Exception):
    """The inspection cannot go on.  ``cause`` says what, ``fix`` what to do.

    Lower layers know nothing of the command line: a fix that asks for another input
    says ``{core}``, ``{symbols}`` or ``{cpus}`` where the CLI puts its own way of giving that input
    (``--symbols`` for validate, ``--symbols-a`` for diff, a watch.conf key for watch),
    see :meth:`line`.  The optional fields carry the data the message was made from:
    *path* the file concerned, *role* which input it is (``"core"``, ``"symbols"``),
    *field* the field or symbol, *address* the kernel or physical address.
    """

    def __init__(self, cause: str, fix: str = "", *, path: str | None = None,
                 role: str | None = None, field: str | None = None,
                 address: int | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix
        self.path = path
        self.role = role
        self.field = field
        self.address = address

    def advice(self, inputs: dict[str, str] | None = None) -> str:
        """The fix with ``{core}``/``{symbols}`` put in *inputs*' words (by role)."""
        fix = self.fix
        for role, words in {**INPUT_WORDS, **(inputs or {})}.items():
            fix = fix.replace("{" + role + "}", words)
        return fix

    def line(self, inputs: dict[str, str] | None = None) -> str:
        fix = self.advice(inputs)
        return f"{self.cause}: {fix}" if fix else self.cause


class PageFiltered(InspectError):
    """A physical page the inspection needs was filtered out of a crash dump
    (makedumpfile ``-d``): the dump says the page existed but did not save it.
    ``paddr`` is the page.  Checks that meet one report it as an info finding
    instead of failing the whole inspection; ``stacks`` shows an in-use ministack
    page that was filtered as "all zero, filtered" (a kernel page in use is never
    page cache, user or free memory, so only the zero-page filter can drop it)."""

    def __init__(self, cause: str, fix: str = "", paddr: int = 0) -> None:
        super().__init__(cause, fix, address=paddr)
        self.paddr = paddr
