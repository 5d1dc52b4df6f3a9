"""x86-64 facts the inspector depends on, each written once: paging, the kernel's
linear maps, and segment selectors.

Pure constants and arithmetic, no I/O (layer 0, beside :mod:`inspector.model`, as
volatility3 keeps ``constants/linux``).  Every other module imports from here instead
of spelling a shift, a mask or an address again.

Sources, by file:

- ``arch/x86/include/asm/page_types.h``: ``PAGE_SHIFT``.
- ``arch/x86/include/asm/pgtable_64_types.h``: ``PGDIR_SHIFT`` (39, or 48 with
  5-level paging), ``P4D_SHIFT``, ``PUD_SHIFT``, ``PMD_SHIFT``, ``PTRS_PER_*``.
- ``arch/x86/include/asm/pgtable_types.h``: the ``_PAGE_BIT_*`` entry bits.
- ``arch/x86/include/asm/page_64_types.h``: ``__START_KERNEL_map``,
  ``__PHYSICAL_MASK_SHIFT``, ``__PAGE_OFFSET_BASE_L4/L5``, ``KERNEL_IMAGE_SIZE``.
- ``arch/x86/include/asm/page_64.h``: ``__phys_addr_nodebug()``: an image address
  translates through ``phys_base``, any other kernel address through the direct map.
- ``arch/x86/include/asm/segment.h``: selector bits and the user selectors;
  ``arch/x86/include/uapi/asm/ldt.h``: ``struct user_desc``.

>>> hex(pa_symbol(0xffffffff81000000, phys_base=0x2c00000))
'0x3c00000'
>>> hex(direct_map_pa(0xffff888000123000, 0xffff888000000000, levels=4))
'0x123000'
>>> hex(ldt_selector(0))
'0x7'
"""

from __future__ import annotations

__all__ = [
    "MASK64", "PAGE_SHIFT", "PAGE_SIZE", "PAGE_MASK", "PTRS_PER_TABLE", "PTRS_PER_PGD",
    "PTRS_PER_P4D", "PTRS_PER_PUD", "PTRS_PER_PMD", "PTRS_PER_PTE", "PGDIR_SHIFT_L4",
    "PGDIR_SHIFT_L5", "P4D_SHIFT", "PUD_SHIFT", "PMD_SHIFT", "P4D_SIZE",
    "PHYSICAL_MASK_SHIFT", "PTE_PFN_MASK", "PTE_FLAGS_MASK", "PAGE_PRESENT", "PAGE_RW",
    "PAGE_USER", "PAGE_PWT", "PAGE_PCD", "PAGE_ACCESSED", "PAGE_DIRTY", "PAGE_PSE",
    "PAGE_GLOBAL", "PAGE_NX", "START_KERNEL_MAP", "KERNEL_IMAGE_SIZE",
    "PAGE_OFFSET_BASE", "DIRECT_MAP_SIZE", "SELECTOR_RPL_MASK", "SELECTOR_TI",
    "USER_CS", "USER32_CS", "USER_DS", "USER_DESC_FIELDS", "ldt_selector",
    "decode_user_desc", "is_image_address", "pa_symbol", "direct_map_pa",
    "direct_map_va", "signed64",
]

#: All 64 bits: addresses and kernel words wrap modulo 2**64.
MASK64 = (1 << 64) - 1

# ---------------------------------------------------------------- paging

#: ``PAGE_SHIFT`` (page_types.h): 4 KiB pages; also the PTE level's shift.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
#: ``PTRS_PER_PGD/P4D/PUD/PMD/PTE``: 512 eight-byte entries per table page at every
#: level (``PTRS_PER_P4D`` is 1 at run time with 4-level paging: the level is folded).
PTRS_PER_TABLE = 512
PTRS_PER_PGD = PTRS_PER_P4D = PTRS_PER_PUD = PTRS_PER_PMD = PTRS_PER_PTE = PTRS_PER_TABLE
#: ``PGDIR_SHIFT``: 39 with 4-level paging, 48 with 5-level (pgtable_64_types.h).
PGDIR_SHIFT_L4 = 39
PGDIR_SHIFT_L5 = 48
#: ``P4D_SHIFT``, ``PUD_SHIFT``, ``PMD_SHIFT`` (pgtable_64_types.h).
P4D_SHIFT = 39
PUD_SHIFT = 30
PMD_SHIFT = 21
#: One P4D entry (one PGD entry with 4-level paging) maps 512 GiB.
P4D_SIZE = 1 << P4D_SHIFT

#: ``__PHYSICAL_MASK_SHIFT`` (page_64_types.h).
PHYSICAL_MASK_SHIFT = 52
#: ``PTE_PFN_MASK``: the physical-address bits of an entry (12..51).
PTE_PFN_MASK = ((1 << PHYSICAL_MASK_SHIFT) - 1) & PAGE_MASK
#: ``PTE_FLAGS_MASK``: everything that is not the address: bits 0..11 and 52..63.
PTE_FLAGS_MASK = ~PTE_PFN_MASK & MASK64

#: ``_PAGE_BIT_PRESENT`` .. ``_PAGE_BIT_NX`` (pgtable_types.h), as masks.
PAGE_PRESENT = 1 << 0
PAGE_RW = 1 << 1
PAGE_USER = 1 << 2
PAGE_PWT = 1 << 3
PAGE_PCD = 1 << 4
PAGE_ACCESSED = 1 << 5
PAGE_DIRTY = 1 << 6
PAGE_PSE = 1 << 7
PAGE_GLOBAL = 1 << 8
PAGE_NX = 1 << 63

# ---------------------------------------------------------------- the kernel's linear maps

#: ``__START_KERNEL_map`` (page_64_types.h): the kernel image is mapped from here.
START_KERNEL_MAP = 0xFFFFFFFF80000000
#: ``KERNEL_IMAGE_SIZE`` with CONFIG_RANDOMIZE_BASE (page_64_types.h): the image, and so
#: ``kaslr_offset()``, stays within the top 1 GiB.
KERNEL_IMAGE_SIZE = 1 << 30
#: ``__PAGE_OFFSET_BASE_L4/L5`` (page_64_types.h): the direct map's base without memory
#: KASLR.  Since Linux kernel commit d52888aa2753 ("x86/mm: Move LDT remap out of KASLR
#: region on 5-level paging") (in v4.20) the 4-level base is 0xffff888000000000; before
#: it, 0xffff880000000000.
PAGE_OFFSET_BASE = {4: 0xFFFF888000000000, 5: 0xFF11000000000000}
#: The direct map's size per paging depth: 64 TiB (4-level) or 32 PiB (5-level), the
#: "direct mapping of all physical memory" regions of
#: Documentation/arch/x86/x86_64/mm.rst (``1 << MAX_PHYSMEM_BITS``, 46 or 52 bits).
DIRECT_MAP_SIZE = {4: 1 << 46, 5: 1 << 52}


def is_image_address(vaddr: int) -> bool:
    """True for addresses in the kernel-image map (at or above ``__START_KERNEL_map``)."""
    return vaddr >= START_KERNEL_MAP


def pa_symbol(vaddr: int, phys_base: int) -> int:
    """``__pa_symbol()``: the physical address of kernel-image address *vaddr*.

    *phys_base* is a signed delta (it is "negative" when KASLR loads the image below
    its link address); the result wraps modulo 2**64 as the kernel's arithmetic does.
    """
    return (vaddr - START_KERNEL_MAP + phys_base) & MASK64


def direct_map_pa(vaddr: int, page_offset_base: int, levels: int) -> int | None:
    """``__pa()`` of a direct-map address (``vaddr - page_offset_base``), or None
    when *vaddr* is not in the direct map of a kernel with *levels*-level paging."""
    off = (vaddr - page_offset_base) & MASK64
    return off if off < DIRECT_MAP_SIZE[levels] else None


def direct_map_va(paddr: int, page_offset_base: int) -> int:
    """``__va()``: the direct-map address of physical address *paddr*."""
    return (page_offset_base + paddr) & MASK64


def signed64(value: int) -> int:
    """A 64-bit word read as two's complement (``phys_base``, KASLR deltas)."""
    return value - (1 << 64) if value >> 63 else value


# ---------------------------------------------------------------- segments

#: ``SEGMENT_RPL_MASK`` and ``SEGMENT_TI_MASK`` (segment.h): a selector's privilege
#: level (bits 0..1) and table indicator (bit 2: the selector names an LDT entry; the
#: entry code's ``testb $4`` on the saved SS sends such returns through espfix).
SELECTOR_RPL_MASK = 0x3
SELECTOR_TI = 0x4
#: ``__USER_CS``, ``__USER32_CS``, ``__USER_DS`` (segment.h).
USER_CS, USER32_CS, USER_DS = 0x33, 0x23, 0x2B

#: ``struct user_desc``'s bit fields after ``limit`` (uapi/asm/ldt.h), packed in one
#: u32 in this order: (name, first bit, width).
USER_DESC_FIELDS = (("seg_32bit", 0, 1), ("contents", 1, 2), ("read_exec_only", 3, 1),
                    ("limit_in_pages", 4, 1), ("seg_not_present", 5, 1), ("useable", 6, 1),
                    ("lm", 7, 1))


def ldt_selector(entry: int) -> int:
    """The user-mode selector of LDT entry *entry*: ``(entry << 3) | TI | RPL 3``."""
    return (entry << 3) | SELECTOR_TI | SELECTOR_RPL_MASK


def decode_user_desc(flags: int) -> dict[str, int]:
    """The bit fields of a packed ``struct user_desc`` flags word, by name."""
    return {name: (flags >> bit) & ((1 << width) - 1) for name, bit, width in USER_DESC_FIELDS}
