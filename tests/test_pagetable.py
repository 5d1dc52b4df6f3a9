"""inspector/pagetable.py on its own: the walker over hand-built 4- and 5-level tables
(4 KiB pages, 2 MiB and 1 GiB pages, entries not present, PSE where it does not map a
page, the SME bit), decode_flags and the table cache.  The tables are a dict of pages,
so every expected address here is worked out by hand from arch/x86 paging, not by the
code under test."""

from __future__ import annotations

import struct

import pytest

from inspector.pagetable import (PAGE_NX, PAGE_PRESENT, PAGE_PSE, PAGE_RW, PAGE_USER,
                                 PageTableWalker, Step, decode_flags)

P = PAGE_PRESENT | PAGE_RW          # a table entry pointing to the next table
VADDR = 0xFFFFFF3A00005440          # an espfix address (ESPFIX_BASE_ADDR + ...)


class PageDict:
    """A MemorySource of just phys_page(): table pages by physical address, counted."""

    def __init__(self) -> None:
        self.pages: dict[int, list[int]] = {}
        self.fetches: dict[int, int] = {}

    def table(self, paddr: int) -> list[int]:
        return self.pages.setdefault(paddr, [0] * 512)

    def phys_page(self, paddr: int) -> bytes:
        self.fetches[paddr] = self.fetches.get(paddr, 0) + 1
        return struct.pack("<512Q", *self.pages.get(paddr, [0] * 512))


def idx(vaddr: int, shift: int) -> int:
    return (vaddr >> shift) & 511


def four_level(mem: PageDict, vaddr: int = VADDR) -> None:
    """pgd 0x1000 -> pud 0x2000 -> pmd 0x3000 -> pte 0x4000 -> page 0x7654000."""
    mem.table(0x1000)[idx(vaddr, 39)] = 0x2000 | P
    mem.table(0x2000)[idx(vaddr, 30)] = 0x3000 | P
    mem.table(0x3000)[idx(vaddr, 21)] = 0x4000 | P
    mem.table(0x4000)[idx(vaddr, 12)] = 0x7654000 | P | PAGE_NX


def test_four_level_4k_page() -> None:
    mem = PageDict()
    four_level(mem)
    w = PageTableWalker(mem, levels=4).walk(0x1000, VADDR)
    assert w.phys == 0x7654000 | 0x440 and w.page_size == 4096 and w.fault is None
    assert [s.level for s in w.steps] == ["pgd", "pud", "pmd", "pte"]
    assert [s.table for s in w.steps] == [0x1000, 0x2000, 0x3000, 0x4000]
    # VADDR = 0xffffff3a00005440: pgd 510, pud 232, pmd 0, pte 5
    assert [s.index for s in w.steps] == [510, 232, 0, 5]
    assert w.steps[-1].entry == 0x7654000 | P | PAGE_NX
    assert w.step("pmd") == Step("pmd", 0, 0x3000, 0x4000 | P) and w.step("p4d") is None


def test_the_pgd_address_is_page_aligned_first() -> None:
    mem = PageDict()
    four_level(mem)
    assert PageTableWalker(mem, levels=4).walk(0x1FFF, VADDR).phys == 0x7654440


def test_five_level_walks_the_p4d() -> None:
    mem = PageDict()
    # 5-level: pgd index is bits 48..56, then a p4d (bits 39..47), then as 4-level
    mem.table(0x9000)[idx(VADDR, 48)] = 0x1000 | P
    four_level(mem)
    w = PageTableWalker(mem, levels=5).walk(0x9000, VADDR)
    assert [s.level for s in w.steps] == ["pgd", "p4d", "pud", "pmd", "pte"]
    assert w.steps[0].index == 511 and w.steps[1].index == 510
    assert w.phys == 0x7654440
    # the same tables read as 4-level miss: pgd 0x9000 has nothing at index 510
    w4 = PageTableWalker(mem, levels=4).walk(0x9000, VADDR)
    assert w4.phys is None and w4.fault == "pgd[510] not present"


@pytest.mark.parametrize("level, shift", [("pud", 30), ("pmd", 21)])
def test_huge_pages_stop_the_walk(level: str, shift: int) -> None:
    mem = PageDict()
    four_level(mem)
    size = 1 << shift
    table = 0x2000 if level == "pud" else 0x3000
    base = 7 * size
    mem.table(table)[idx(VADDR, shift)] = base | P | PAGE_PSE
    w = PageTableWalker(mem, levels=4).walk(0x1000, VADDR)
    assert w.page_size == size and w.steps[-1].level == level
    assert w.phys == base | (VADDR & (size - 1))


def test_pse_in_a_pgd_or_pte_entry_maps_no_large_page() -> None:
    mem = PageDict()
    four_level(mem)
    mem.table(0x1000)[idx(VADDR, 39)] |= PAGE_PSE    # ignored at the top level
    mem.table(0x4000)[idx(VADDR, 12)] |= PAGE_PSE    # bit 7 of a PTE is PAT
    w = PageTableWalker(mem, levels=4).walk(0x1000, VADDR)
    assert len(w.steps) == 4 and w.page_size == 4096 and w.phys == 0x7654440


@pytest.mark.parametrize("level, table, shift, depth",
                         [("pgd", 0x1000, 39, 1), ("pud", 0x2000, 30, 2),
                          ("pmd", 0x3000, 21, 3), ("pte", 0x4000, 12, 4)])
def test_not_present_entry_ends_the_walk(level: str, table: int, shift: int,
                                         depth: int) -> None:
    mem = PageDict()
    four_level(mem)
    mem.table(table)[idx(VADDR, shift)] &= ~PAGE_PRESENT     # address bits stay
    w = PageTableWalker(mem, levels=4).walk(0x1000, VADDR)
    assert w.phys is None and w.page_size == 0
    assert w.fault == f"{level}[{idx(VADDR, shift)}] not present"
    assert len(w.steps) == depth


def test_sme_bit_and_nx_are_not_address_bits() -> None:
    sme = 1 << 47
    mem = PageDict()
    mem.table(0x1000)[idx(VADDR, 39)] = 0x2000 | sme | P
    mem.table(0x2000)[idx(VADDR, 30)] = 0x3000 | sme | P
    mem.table(0x3000)[idx(VADDR, 21)] = 0x4000 | sme | P
    mem.table(0x4000)[idx(VADDR, 12)] = 0x5000 | sme | P | PAGE_NX
    assert PageTableWalker(mem, levels=4, sme_mask=sme).walk(0x1000, VADDR).phys == 0x5440
    # without the mask the encryption bit reads as an address bit
    unmasked = PageTableWalker(mem, levels=4).walk(0x1000, VADDR)
    assert unmasked.steps[1].table == 0x2000 | sme


def test_tables_are_read_once() -> None:
    mem = PageDict()
    four_level(mem)
    w = PageTableWalker(mem, levels=4)
    for off in range(0, 4096, 64):
        assert w.walk(0x1000, (VADDR & ~0xFFF) + off).phys == 0x7654000 + off
    assert mem.fetches == {0x1000: 1, 0x2000: 1, 0x3000: 1, 0x4000: 1}
    assert len(w.table(0x4123)) == 512 and mem.fetches[0x4000] == 1   # aligned, cached


def test_levels_must_be_4_or_5() -> None:
    with pytest.raises(ValueError):
        PageTableWalker(PageDict(), levels=3)


def test_decode_flags() -> None:
    assert decode_flags(0x8000000000000161) == "P|A|D|G|NX"
    assert decode_flags(0x67) == "P|RW|USER|A|D"
    assert decode_flags(0) == "-"
    assert decode_flags(PAGE_USER | PAGE_PSE) == "USER|PSE"


def test_step_as_dict() -> None:
    s = Step("pte", 5, 0x4000, 0x8000000007654063)
    assert s.as_dict() == {"level": "pte", "index": 5, "table": "0x4000",
                           "entry": "0x8000000007654063", "flags": "P|RW|A|D|NX"}
