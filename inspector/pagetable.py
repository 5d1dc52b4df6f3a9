"""x86-64 page-table walker, 4- and 5-level, over any memory source.

The paging format is data (:data:`LEVELS_4`, :data:`LEVELS_5`): one loop walks
either.  Table pages come from the memory source's page cache and are unpacked
once into tuples of 512 entries, so repeated walks through the same PUD, PMD
and PTE pages cost no reads.

Bits are those of ``arch/x86/include/asm/pgtable_types.h``.  On AMD SME/SEV
hosts the encryption bit (``sme_me_mask``, VMCOREINFO ``NUMBER(sme_mask)``)
is set in entries and is masked off before an entry's address is used.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .memory import MemorySource
from .records import dataclass
from .x86 import (PAGE_ACCESSED, PAGE_DIRTY, PAGE_GLOBAL, PAGE_MASK, PAGE_NX, PAGE_PCD,
                  PAGE_PRESENT, PAGE_PSE, PAGE_PWT, PAGE_RW, PAGE_SHIFT, PAGE_USER,
                  PGDIR_SHIFT_L4, PGDIR_SHIFT_L5, P4D_SHIFT, PMD_SHIFT,
                  PTE_PFN_MASK, PTRS_PER_TABLE, PUD_SHIFT)

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Level", "LEVELS_4", "LEVELS_5", "Step", "Walk", "PageTableWalker",
           "decode_flags", "PAGE_PRESENT", "PAGE_RW", "PAGE_USER", "PAGE_PWT",
           "PAGE_PCD", "PAGE_ACCESSED", "PAGE_DIRTY", "PAGE_PSE", "PAGE_GLOBAL",
           "PAGE_NX"]

_INDEX_MASK = PTRS_PER_TABLE - 1
_TABLE = struct.Struct(f"<{PTRS_PER_TABLE}Q")     # one table page of 8-byte entries

_FLAG_NAMES = ((PAGE_PRESENT, "P"), (PAGE_RW, "RW"), (PAGE_USER, "USER"),
               (PAGE_PWT, "PWT"), (PAGE_PCD, "PCD"), (PAGE_ACCESSED, "A"),
               (PAGE_DIRTY, "D"), (PAGE_PSE, "PSE"), (PAGE_GLOBAL, "G"),
               (PAGE_NX, "NX"))


def decode_flags(entry: int) -> str:
    """``0x8000000000000161`` -> ``'P|A|D|G|NX'`` (RW absent means read-only)."""
    return "|".join(name for bit, name in _FLAG_NAMES if entry & bit) or "-"


@dataclass(frozen=True)
class Level:
    name: str
    shift: int
    large_page: bool   # may a PSE entry here map a page (PUD: 1 GiB, PMD: 2 MiB)?

    def index(self, vaddr: int) -> int:
        return (vaddr >> self.shift) & _INDEX_MASK


LEVELS_4: tuple[Level, ...] = (Level("pgd", PGDIR_SHIFT_L4, False),
                               Level("pud", PUD_SHIFT, True), Level("pmd", PMD_SHIFT, True),
                               Level("pte", PAGE_SHIFT, False))
LEVELS_5: tuple[Level, ...] = (Level("pgd", PGDIR_SHIFT_L5, False),
                               Level("p4d", P4D_SHIFT, False), *LEVELS_4[1:])


@dataclass(frozen=True)
class Step:
    level: str
    index: int
    table: int      # physical address of the table page
    entry: int

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "index": self.index, "table": f"{self.table:#x}",
                "entry": f"{self.entry:#x}", "flags": decode_flags(self.entry)}


@dataclass(frozen=True)
class Walk:
    vaddr: int
    steps: tuple[Step, ...]
    phys: int | None          # physical address of vaddr, None if not mapped
    page_size: int
    fault: str | None         # e.g. "pmd entry 12 not present"

    def step(self, level: str) -> Step | None:
        for s in self.steps:
            if s.level == level:
                return s
        return None


class PageTableWalker:
    """Walks page tables rooted at a physical PGD address.

    >>> w = PageTableWalker(mem, levels=5, sme_mask=0)       # doctest: +SKIP
    >>> hex(w.walk(pgd_pa, 0xffffff3a00005440).phys)          # doctest: +SKIP
    '0x10a2c5440'
    """

    def __init__(self, mem: MemorySource, levels: int, sme_mask: int = 0) -> None:
        if levels not in (4, 5):
            raise ValueError("levels must be 4 or 5")
        self.mem = mem
        self.levels: Sequence[Level] = LEVELS_5 if levels == 5 else LEVELS_4
        self.addr_mask = PTE_PFN_MASK & ~sme_mask
        self._tables: dict[int, tuple[int, ...]] = {}

    def table(self, paddr: int) -> tuple[int, ...]:
        """The 512 entries of the table page at *paddr* (cached)."""
        paddr &= PAGE_MASK
        t = self._tables.get(paddr)
        if t is None:
            t = _TABLE.unpack(self.mem.phys_page(paddr))
            self._tables[paddr] = t
        return t

    def entry_addr(self, entry: int) -> int:
        return entry & self.addr_mask

    def walk(self, pgd_paddr: int, vaddr: int) -> Walk:
        table = pgd_paddr & PAGE_MASK
        steps: list[Step] = []
        for level in self.levels:
            idx = level.index(vaddr)
            entry = self.table(table)[idx]
            steps.append(Step(level.name, idx, table, entry))
            if not entry & PAGE_PRESENT:
                return Walk(vaddr, tuple(steps), None, 0,
                            f"{level.name}[{idx}] not present")
            if level.shift == PAGE_SHIFT or (level.large_page and entry & PAGE_PSE):
                size = 1 << level.shift
                base = entry & self.addr_mask & ~(size - 1)
                return Walk(vaddr, tuple(steps), base | (vaddr & (size - 1)), size, None)
            table = self.entry_addr(entry)
        raise AssertionError("unreachable: the last level maps a page")
