"""The espfix64 layout model: pure arithmetic, no I/O.

This module is ``arch/x86/kernel/espfix_64.c`` explained.  It knows where every
CPU's espfix ministack must be for a given boot-time random number, which
page-table entries the kernel installs for it, and what that costs.  Nothing
here reads memory; everything above (memory sources, walker, audit, CLI) uses
it as the single source of truth for the formula.

>>> hex(espfix_base_addr(0, page_random=0x3a5, slot_random=17))
'0xffffff3a00005440'
>>> invert_espfix_stack(0, 0xffffff3a00005440)
(933, 17)

Facts and names come from ``arch/x86/kernel/espfix_64.c`` and
``arch/x86/include/asm/pgtable_64_types.h`` (``ESPFIX_BASE_ADDR``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat

from .records import dataclass
from .x86 import (MASK64, P4D_SHIFT, P4D_SIZE, PAGE_SHIFT, PAGE_SIZE, PGDIR_SHIFT_L4,
                  PGDIR_SHIFT_L5, PMD_SHIFT, PTRS_PER_PMD, PTRS_PER_PTE, PTRS_PER_TABLE,
                  PUD_SHIFT)

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "PAGE_SIZE", "PAGE_SHIFT", "ESPFIX_BASE_ADDR", "ESPFIX_STACK_SIZE",
    "ESPFIX_STACKS_PER_PAGE", "ESPFIX_PAGE_SPACE", "ESPFIX_MAX_CPUS",
    "PTE_STRIDE", "ESPFIX_PTE_CLONES", "ESPFIX_PMD_CLONES", "ESPFIX_PUD_CLONES",
    "CPUS_PER_GROUP", "FRAME_WORDS", "Randomness", "CpuLayout", "GroupLayout",
    "MemoryCost", "espfix_base_addr", "invert_espfix_stack", "cpu_layout",
    "group_layouts", "memory_cost", "table_indices", "pud_slots", "pte_slots",
    "parse_cpu_list", "format_cpu_list", "group_pud_index", "page_and_slot",
    "is_espfix_address", "espfix_base_addrs", "layout_columns",
]

#: ``ESPFIX_BASE_ADDR`` = ``ESPFIX_PGD_ENTRY << P4D_SHIFT`` with
#: ``ESPFIX_PGD_ENTRY = -2``: 0xffffff0000000000 for both paging modes
#: (pgtable_64_types.h).
ESPFIX_BASE_ADDR = 0xFFFFFF0000000000
#: One ministack slot: ``#define ESPFIX_STACK_SIZE (8*8UL)``.
ESPFIX_STACK_SIZE = 64
#: ``ESPFIX_STACKS_PER_PAGE = PAGE_SIZE / ESPFIX_STACK_SIZE``.
ESPFIX_STACKS_PER_PAGE = PAGE_SIZE // ESPFIX_STACK_SIZE
#: ``ESPFIX_PAGE_SPACE = 1UL << (P4D_SHIFT - PAGE_SHIFT - 16)`` (4- and 5-level).
ESPFIX_PAGE_SPACE = 2048
#: ``ESPFIX_MAX_CPUS = ESPFIX_STACKS_PER_PAGE * ESPFIX_PAGE_SPACE``.
ESPFIX_MAX_CPUS = ESPFIX_STACKS_PER_PAGE * ESPFIX_PAGE_SPACE
#: ``PTE_STRIDE = 65536 / PAGE_SIZE``: every 16th PTE maps the same page.
PTE_STRIDE = 65536 // PAGE_SIZE
#: ``ESPFIX_PTE_CLONES = PTRS_PER_PTE / PTE_STRIDE``.
ESPFIX_PTE_CLONES = PTRS_PER_PTE // PTE_STRIDE
#: ``ESPFIX_PMD_CLONES = PTRS_PER_PMD``.
ESPFIX_PMD_CLONES = PTRS_PER_PMD
#: ``ESPFIX_PUD_CLONES = 65536 / (ESPFIX_PTE_CLONES * ESPFIX_PMD_CLONES)``.
ESPFIX_PUD_CLONES = 65536 // (ESPFIX_PTE_CLONES * ESPFIX_PMD_CLONES)
#: CPUs that share one PUD slot group, one PMD page and one PTE page.
CPUS_PER_GROUP = ESPFIX_STACKS_PER_PAGE * PTE_STRIDE
#: ``cpu >> CPU_PAGE_SHIFT`` is ``cpu / ESPFIX_STACKS_PER_PAGE`` (the espfix_pages index),
#: ``cpu >> CPU_GROUP_SHIFT`` is ``cpu / CPUS_PER_GROUP``.
CPU_PAGE_SHIFT = (ESPFIX_STACKS_PER_PAGE - 1).bit_length()
CPU_GROUP_SHIFT = (CPUS_PER_GROUP - 1).bit_length()
#: A group's stack pages are ``PTE_STRIDE`` consecutive page numbers, so the shuffled
#: page's bits from ``GROUP_PAGE_SHIFT`` up pick the group's PUD slots, one of
#: ``PUD_GROUPS`` (:func:`group_pud_index`).
GROUP_PAGE_SHIFT = CPU_GROUP_SHIFT - CPU_PAGE_SHIFT
PUD_GROUPS = ESPFIX_PAGE_SPACE >> GROUP_PAGE_SHIFT
#: Words of the IRET frame the entry code copies to the ministack through
#: ``espfix_waddr`` (entry_64.S, ``native_irq_return_ldt``), in slot order.
FRAME_WORDS = ("rax", "rip", "cs", "rflags", "rsp", "ss")

#: Page-table index shifts by level (:mod:`inspector.x86`); "pgd4"/"pgd5" are the
#: PGD's for 4- and 5-level paging.
_SHIFTS = {"pgd4": PGDIR_SHIFT_L4, "pgd5": PGDIR_SHIFT_L5, "p4d": P4D_SHIFT,
           "pud": PUD_SHIFT, "pmd": PMD_SHIFT, "pte": PAGE_SHIFT}
_INDEX_MASK = PTRS_PER_TABLE - 1


@dataclass(frozen=True)
class Randomness:
    """The two statics ``init_espfix_random()`` draws from one number:
    ``slot_random = rand % 64`` and ``page_random = (rand / 64) & 2047``."""

    page_random: int
    slot_random: int

    def __post_init__(self) -> None:
        if not 0 <= self.page_random < ESPFIX_PAGE_SPACE:
            raise ValueError(f"page_random must be 0..{ESPFIX_PAGE_SPACE - 1}")
        if not 0 <= self.slot_random < ESPFIX_STACKS_PER_PAGE:
            raise ValueError(f"slot_random must be 0..{ESPFIX_STACKS_PER_PAGE - 1}")

    @classmethod
    def from_rand(cls, rand: int) -> Randomness:
        rand &= MASK64
        return cls((rand // ESPFIX_STACKS_PER_PAGE) & (ESPFIX_PAGE_SPACE - 1),
                   rand % ESPFIX_STACKS_PER_PAGE)


def espfix_base_addr(cpu: int, page_random: int, slot_random: int) -> int:
    """``espfix_base_addr(cpu)``: the bottom of CPU *cpu*'s ministack.

    Bits 16..31 of the result are zero; the entry code ORs the user's
    RSP[31:16] into them.
    """
    page = (cpu // ESPFIX_STACKS_PER_PAGE) ^ page_random
    slot = (cpu + slot_random) % ESPFIX_STACKS_PER_PAGE
    addr = (page << PAGE_SHIFT) + slot * ESPFIX_STACK_SIZE
    addr = (addr & 0xFFFF) | ((addr & ~0xFFFF) << 16)
    return (addr + ESPFIX_BASE_ADDR) & MASK64


def espfix_base_addrs(cpus: Sequence[int], page_random: int, slot_random: int) -> list[int]:
    """``[espfix_base_addr(cpu, page_random, slot_random) for cpu in cpus]``, for
    131,072 CPUs at a time.

    ``page * 4096 + slot * 64`` is ``page << 12 | slot << 6`` (``slot * 64 < 4096``),
    the shuffle moves only bits 16 and up, and the result stays below 2**39, under
    ``ESPFIX_BASE_ADDR``'s lowest set bit: so the address is one term that depends on
    ``cpu / 64`` ORed with one that depends on ``cpu % 64``, each from a table.
    """
    if not cpus:
        return []
    if min(cpus) < 0 or max(cpus) >= ESPFIX_MAX_CPUS:
        return [espfix_base_addr(c, page_random, slot_random) for c in cpus]
    pages = [ESPFIX_BASE_ADDR | _shuffle((i ^ page_random) << PAGE_SHIFT)
             for i in range(max(cpus) // ESPFIX_STACKS_PER_PAGE + 1)]
    slots = [((j + slot_random) % ESPFIX_STACKS_PER_PAGE) * ESPFIX_STACK_SIZE
             for j in range(ESPFIX_STACKS_PER_PAGE)]
    return list(map(operator.or_, map(pages.__getitem__, _page_indices(cpus)),
                    map(slots.__getitem__,
                        map(operator.and_, cpus, repeat(ESPFIX_STACKS_PER_PAGE - 1)))))


def _page_indices(cpus: Sequence[int]) -> list[int]:
    """``cpu / ESPFIX_STACKS_PER_PAGE`` of each CPU (its index in ``espfix_pages[]``)."""
    return list(map(operator.rshift, cpus, repeat(CPU_PAGE_SHIFT)))


def _shuffle(a: int) -> int:
    """Bits 16 and up move up by 16, leaving RSP[31:16] (bits 16..31) zero."""
    return (a & 0xFFFF) | ((a & ~0xFFFF) << 16)


def _unshuffle(espfix_stack: int) -> int:
    """``page * 4096 + slot * 64`` from an alias address (any RSP[31:16])."""
    a = (espfix_stack - ESPFIX_BASE_ADDR) & MASK64
    return (a & 0xFFFF) | ((a >> 16) & ~0xFFFF)


def page_and_slot(espfix_stack: int) -> tuple[int, int]:
    """The shuffled ``page`` and ``slot`` encoded in an espfix address."""
    a = _unshuffle(espfix_stack)
    return a >> PAGE_SHIFT, (a >> 6) & (ESPFIX_STACKS_PER_PAGE - 1)


def invert_espfix_stack(cpu: int, espfix_stack: int) -> tuple[int, int]:
    """Recover ``(page_random, slot_random)`` from one CPU's ``espfix_stack``.

    Raises ValueError when the value cannot come from ``espfix_base_addr``.
    """
    if espfix_stack & (ESPFIX_STACK_SIZE - 1) or espfix_stack & 0xFFFF0000:
        raise ValueError(f"{espfix_stack:#x} is not an espfix_base_addr() value")
    if not is_espfix_address(espfix_stack):
        raise ValueError(f"{espfix_stack:#x} is outside the espfix area")
    page, slot = page_and_slot(espfix_stack)
    if page >= ESPFIX_PAGE_SPACE:
        raise ValueError(f"{espfix_stack:#x} has a page index beyond {ESPFIX_PAGE_SPACE}")
    return (page ^ (cpu // ESPFIX_STACKS_PER_PAGE),
            (slot - cpu) % ESPFIX_STACKS_PER_PAGE)


def is_espfix_address(addr: int) -> bool:
    """True for addresses in the 512 GiB espfix P4D/PGD slot."""
    return ESPFIX_BASE_ADDR <= addr < ESPFIX_BASE_ADDR + P4D_SIZE


def table_indices(addr: int, levels: int) -> dict[str, int]:
    """Page-table indices of *addr*: pgd (and p4d on 5-level), pud, pmd, pte."""
    idx = {}
    if levels == 5:
        idx["pgd"] = (addr >> _SHIFTS["pgd5"]) & _INDEX_MASK
        idx["p4d"] = (addr >> _SHIFTS["p4d"]) & _INDEX_MASK
    else:
        idx["pgd"] = (addr >> _SHIFTS["pgd4"]) & _INDEX_MASK
    for name in ("pud", "pmd", "pte"):
        idx[name] = (addr >> _SHIFTS[name]) & _INDEX_MASK
    return idx


def pud_slots(group_pud_index: int) -> range:
    """The ``ESPFIX_PUD_CLONES`` consecutive ``espfix_pud_page`` entries of a group."""
    return range(group_pud_index, group_pud_index + ESPFIX_PUD_CLONES)


def pte_slots(page: int) -> range:
    """The ``ESPFIX_PTE_CLONES`` PTE indices that map shuffled stack page *page*."""
    return range(page % PTE_STRIDE, PTRS_PER_PTE, PTE_STRIDE)


@dataclass(frozen=True)
class CpuLayout:
    """Where one CPU's ministack must be."""

    cpu: int
    espfix_stack: int
    page: int            # shuffled page number: (cpu / 64) ^ page_random
    slot: int            # (cpu + slot_random) % 64
    page_index: int      # cpu / 64: the index in espfix_pages[]
    group: int           # cpu / 1024: shares PUD slots, PMD and PTE page
    indices: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "espfix_stack": f"{self.espfix_stack:#x}",
                "page": self.page, "slot": self.slot,
                "espfix_pages_index": self.page_index, "group": self.group,
                **self.indices}


def cpu_layout(cpu: int, rnd: Randomness, levels: int = 4) -> CpuLayout:
    if not 0 <= cpu < ESPFIX_MAX_CPUS:
        raise ValueError(f"cpu {cpu} is outside 0..{ESPFIX_MAX_CPUS - 1}")
    addr = espfix_base_addr(cpu, rnd.page_random, rnd.slot_random)
    page, slot = page_and_slot(addr)
    return CpuLayout(cpu, addr, page, slot, cpu // ESPFIX_STACKS_PER_PAGE,
                     cpu // CPUS_PER_GROUP, table_indices(addr, levels))


def layout_columns(cpus: Sequence[int], rnd: Randomness, levels: int = 4) -> dict[str, list[int]]:
    """:func:`cpu_layout` of every CPU in *cpus*, one list per field of
    ``CpuLayout.as_dict()`` (``espfix_stack`` as an int), computed column by column:
    the page, PUD, PMD and PTE indices depend only on ``cpu / 64``, so they come from
    per-page tables."""
    if cpus and (min(cpus) < 0 or max(cpus) >= ESPFIX_MAX_CPUS):
        bad = min(cpus) if min(cpus) < 0 else max(cpus)
        raise ValueError(f"cpu {bad} is outside 0..{ESPFIX_MAX_CPUS - 1}")
    n = len(cpus)
    idx = _page_indices(cpus)
    npages = max(idx) + 1 if idx else 0
    page_of = [i ^ rnd.page_random for i in range(npages)]
    addr_of = [espfix_base_addr(i * ESPFIX_STACKS_PER_PAGE, rnd.page_random, 0)
               for i in range(npages)]                  # slot 0: bits 12 and up
    cols: dict[str, list[int]] = {
        "cpu": list(cpus),
        "espfix_stack": espfix_base_addrs(cpus, rnd.page_random, rnd.slot_random),
        "page": list(map(page_of.__getitem__, idx)),
        "slot": list(map(operator.and_, map(operator.add, cpus, repeat(rnd.slot_random)),
                         repeat(ESPFIX_STACKS_PER_PAGE - 1))),
        "espfix_pages_index": idx,
        "group": list(map(operator.rshift, cpus, repeat(CPU_GROUP_SHIFT)))}
    names = ("pgd5", "p4d") if levels == 5 else ("pgd4",)
    for name in (*names, "pud", "pmd", "pte"):
        per_page = [(a >> _SHIFTS[name]) & _INDEX_MASK for a in addr_of]
        cols[name.rstrip("45")] = list(map(per_page.__getitem__, idx)) if n else []
    return cols


@dataclass(frozen=True)
class GroupLayout:
    """One 1024-CPU group: 4 PUD slots -> one PMD page -> one PTE page."""

    group: int
    pud_index: int                     # first of the 4 espfix_pud_page slots
    cpus: tuple[int, ...]              # the group's CPUs asked about
    stack_pages: tuple[tuple[int, int], ...]   # (espfix_pages index, shuffled page)

    @property
    def pud_slots(self) -> range:
        return pud_slots(self.pud_index)

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "pud_slots": list(self.pud_slots),
                "cpus": format_cpu_list(self.cpus),
                "stack_pages": [{"espfix_pages_index": i, "page": p,
                                 "pte_index": p % PTE_STRIDE} for i, p in self.stack_pages]}


def group_pud_index(group: int, page_random: int) -> int:
    """``pud_index(espfix_base_addr(cpu))`` for any CPU of 1024-group *group*.

    The page bits 16..22 of ``page << 12`` are moved to address bits 32..38,
    so the PUD index is ``4 * (page >> 4)`` and bits 30..31 (RSP[31:30])
    select among the 4 clones.
    """
    return ((group ^ (page_random >> GROUP_PAGE_SHIFT)) & (PUD_GROUPS - 1)) * ESPFIX_PUD_CLONES


def group_layouts(cpus: Iterable[int], rnd: Randomness) -> list[GroupLayout]:
    by_group: dict[int, list[int]] = {}
    for cpu in cpus:
        by_group.setdefault(cpu // CPUS_PER_GROUP, []).append(cpu)
    out = []
    for group in sorted(by_group):
        members = sorted(by_group[group])
        idxs = sorted({c // ESPFIX_STACKS_PER_PAGE for c in members})
        out.append(GroupLayout(group, group_pud_index(group, rnd.page_random),
                               tuple(members),
                               tuple((i, i ^ rnd.page_random) for i in idxs)))
    return out


@dataclass(frozen=True)
class MemoryCost:
    """What ``init_espfix_ap()`` allocates for a set of CPUs, plus the static
    ``espfix_pud_page``."""

    cpus: int
    stack_pages: int
    pmd_pages: int
    pte_pages: int

    @property
    def pages(self) -> int:
        return 1 + self.stack_pages + self.pmd_pages + self.pte_pages

    @property
    def bytes(self) -> int:
        return self.pages * PAGE_SIZE

    def as_dict(self) -> dict[str, Any]:
        return {"nr_cpus": self.cpus, "stack_pages": self.stack_pages,
                "pmd_pages": self.pmd_pages, "pte_pages": self.pte_pages,
                "pud_pages": 1, "pages": self.pages, "bytes": self.bytes}


def memory_cost(cpus: Iterable[int]) -> MemoryCost:
    cpus = list(cpus)
    groups = len({c // CPUS_PER_GROUP for c in cpus})
    return MemoryCost(len(cpus), len({c // ESPFIX_STACKS_PER_PAGE for c in cpus}),
                      groups, groups)


def parse_cpu_list(text: str, limit: int = ESPFIX_MAX_CPUS) -> list[int]:
    """Parse the kernel's cpulist format (``0-3,8,10-11``) as in
    ``/sys/devices/system/cpu/online``; raises ValueError, also for a CPU at or
    above *limit* (checked before a range is expanded).

    >>> parse_cpu_list("0-2,8")
    [0, 1, 2, 8]
    """
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        lo_s, dash, hi_s = part.partition("-")
        if not lo_s.isdigit() or (dash and not hi_s.isdigit()) or len(part) > 24:
            raise ValueError(f"bad CPU list item {part[:24]!r}")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
        if hi < lo:
            raise ValueError(f"bad CPU range {part!r}")
        if hi >= limit:
            raise ValueError(f"CPU {hi} is beyond the last possible CPU id {limit - 1}")
        cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpu_list`: ``[0,1,2,3,8]`` -> ``0-3,8``."""
    out: list[str] = []
    for lo, hi in _runs(sorted(set(cpus))):
        out.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return ",".join(out)


def _runs(sorted_cpus: Sequence[int]) -> Iterator[tuple[int, int]]:
    if not sorted_cpus:
        return
    lo = prev = sorted_cpus[0]
    for c in sorted_cpus[1:]:
        if c != prev + 1:
            yield lo, prev
            lo = c
        prev = c
    yield lo, prev
