"""The espfix state of one kernel, read through a target's memory.

Everything the audit and the reports need, read once: the paging mode, the
CPU masks (``__cpu_possible_mask``, ``__cpu_online_mask``, ``nr_cpu_ids``),
each possible CPU's per-CPU ``espfix_stack`` and ``espfix_waddr``,
``espfix_pages[]``, the ``espfix_pud_page`` and the page-table roots
(``init_top_pgt`` and, with PTI, its user half at +4096).

Per-CPU addresses are ``&var + __per_cpu_offset[cpu]`` modulo 2**64 in both
conventions (zero-based ``A`` symbols before 6.15, relative image addresses
from 6.15; see ``include/linux/percpu-defs.h``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .errors import InspectError, PageFiltered
from .hostfacts import HostFacts
from .model import ESPFIX_BASE_ADDR, ESPFIX_STACKS_PER_PAGE, FRAME_WORDS
from .pagetable import PAGE_PRESENT, PageTableWalker, Step, Walk
from .records import dataclass, field
from .target import Target
from .x86 import (MASK64, PAGE_MASK, PAGE_OFFSET_BASE, PAGE_SIZE, direct_map_pa,
                  is_image_address)

__all__ = ["KernelInfo", "CpuState", "EspfixState", "KernelReader", "load_state",
           "FrameUnreadable", "FRAME_BYTES"]

#: The six words ``native_irq_return_ldt`` copies to the ministack (entry_64.S).
FRAME_BYTES = 8 * len(FRAME_WORDS)


class FrameUnreadable(InspectError):
    """One CPU's ministack frame cannot be read (a corrupt ``espfix_stack``, an
    unmapped alias, a page the core lacks); the rest of the inspection goes on."""



class KernelReader:
    """Kernel virtual reads: the core's own segments first, then the
    kernel-image and direct-map linear aliases, then a page-table walk."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.mem = target.mem
        self.page_offset_base: int | None = None
        self.levels: int | None = None
        self.walker: PageTableWalker | None = None
        self.pgd_pa: int | None = None

    def read(self, addr: int, size: int) -> bytes:
        addr &= MASK64
        data = self.mem.read_virt(addr, size)
        if data is not None:
            return data
        return self._read_alias(addr, size)

    def read_many(self, addrs: list[int], size: int) -> list[bytes]:
        """``[read(a, size) for a in addrs]``: one batch for the core's own segments
        (``MemorySource.read_virts``), the aliases only where a segment is missing."""
        addrs = [a & MASK64 for a in addrs]
        datas = self.mem.read_virts(addrs, size)
        return [d if d is not None else self._read_alias(a, size) for a, d in zip(addrs, datas)]

    def _read_alias(self, addr: int, size: int) -> bytes:
        if is_image_address(addr):
            return self.mem.read_phys(self.target.pa_symbol(addr), size)
        pob = self.page_offset_base
        pa = direct_map_pa(addr, pob, self.levels) if pob is not None and self.levels else None
        if pa is not None:
            return self.mem.read_phys(pa, size)
        if self.walker is not None and self.pgd_pa is not None:
            w = self.walker.walk(self.pgd_pa, addr)
            if w.phys is not None and (w.phys & ~PAGE_MASK) + size <= PAGE_SIZE:
                return self.mem.read_phys(w.phys, size)
        raise InspectError(f"kernel address {addr:#x} is not readable from {self.target.core.path}",
                           "the core lacks that memory; capture a complete core or snapshot")

    def u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def u32(self, addr: int) -> int:
        return struct.unpack("<I", self.read(addr, 4))[0]

    def u64s(self, addr: int, count: int) -> tuple[int, ...]:
        return struct.unpack(f"<{count}Q", self.read(addr, 8 * count)) if count else ()

    def bitmap(self, addr: int, nbits: int) -> tuple[list[int], list[int]]:
        """The set bits below *nbits*, and those set beyond it in the last word read
        (a ``struct cpumask`` keeps bits from ``nr_cpu_ids`` up clear)."""
        words = self.u64s(addr, (nbits + 63) // 64)
        return bits_set(words, nbits), bits_set(words, len(words) * 64, start=nbits)


def bits_set(words: Sequence[int], nbits: int, start: int = 0) -> list[int]:
    """The numbers of the bits set from *start* up to (not including) *nbits* of a
    bitmap of 64-bit words (a ``struct cpumask``), a full or empty word at a time when
    it can."""
    out: list[int] = []
    for i, word in enumerate(words):
        base = i * 64
        lo, hi = max(base, start), min(base + 64, nbits)
        if lo >= hi or not word:
            continue
        if word == MASK64 and lo == base and hi == base + 64:
            out.extend(range(base, base + 64))
        else:
            out.extend(n for n in range(lo, hi) if word >> (n - base) & 1)
    return out


@dataclass
class KernelInfo:
    osrelease: str
    core: str
    symbols: str
    live: bool
    levels: int
    kaslr_offset: int
    phys_base: int
    page_offset_base: int
    sme_mask: int
    nr_cpu_ids: int
    percpu: str                     # "zero-based" (before 6.15) or "relative"
    supported_pte_mask: int | None
    init_top_pgt: int
    pgd_pa: int
    pti: bool
    user_pgd_pa: int | None
    espfix_pud_page: int
    pud_pa: int
    page_random: int | None         # the statics, when the symbols show them
    slot_random: int | None

    def as_dict(self) -> dict:
        hexed = ("kaslr_offset", "page_offset_base", "sme_mask", "supported_pte_mask",
                 "init_top_pgt", "pgd_pa", "user_pgd_pa", "espfix_pud_page", "pud_pa")
        d = dict(self.__dict__)
        for k in hexed:
            if d[k] is not None:
                d[k] = f"{d[k]:#x}"
        d["phys_base"] = f"{self.phys_base:#x}" if self.phys_base >= 0 else f"-{-self.phys_base:#x}"
        return d


@dataclass
class CpuState:
    cpu: int
    online: bool
    espfix_stack: int
    espfix_waddr: int

    @property
    def initialised(self) -> bool:
        return self.espfix_stack != 0


@dataclass
class EspfixState:
    info: KernelInfo
    reader: KernelReader
    walker: PageTableWalker
    possible: list[int]
    online: list[int]
    cpus: dict[int, CpuState]              # possible CPUs
    espfix_pages: tuple[int, ...]          # direct-map addresses, 0 = NULL
    host: HostFacts = field(default_factory=HostFacts)
    #: mask name -> CPUs set at or above nr_cpu_ids (in the last word read)
    beyond_nr_cpu_ids: dict[str, list[int]] = field(default_factory=dict)
    _walks: dict[tuple[int, int], Walk] = field(default_factory=dict)

    @property
    def pud_page(self) -> tuple[int, ...]:
        return self.walker.table(self.info.pud_pa)

    def walk(self, vaddr: int, user: bool = False) -> Walk:
        """Walk (memoised per page) from the kernel or the PTI user PGD."""
        root = self.info.user_pgd_pa if user else self.info.pgd_pa
        assert root is not None
        key = (root, vaddr & PAGE_MASK)
        w = self._walks.get(key)
        if w is None:
            w = self.walker.walk(root, vaddr & PAGE_MASK)
            self._walks[key] = w
        return w

    def top_entry(self, user: bool = False) -> Step | None:
        """The entry that installs ``espfix_pud_page``: pgd[510] (4-level) or
        p4d[510] under pgd[511] (5-level); None if the walk stops above it."""
        w = self.walk(ESPFIX_BASE_ADDR, user)
        return w.step("p4d" if self.info.levels == 5 else "pgd")

    def direct_map_pa(self, vaddr: int) -> int | None:
        """``__pa()`` of a direct-map address, None outside the direct map."""
        return direct_map_pa(vaddr, self.info.page_offset_base, self.info.levels)

    def frame(self, cpu: int, fresh: bool = False) -> dict[str, int] | None:
        """The last IRET frame the entry code left in *cpu*'s ministack
        (``native_irq_return_ldt`` writes RAX, RIP, CS, RFLAGS, RSP, SS through
        ``espfix_waddr``), or None when the slot was never used.  *fresh* re-reads
        the stack page instead of using the cached copy (live kernels).

        Raises :class:`FrameUnreadable` with the reason when the frame cannot be read:
        the tool exists to report such corruption, so callers show it and go on."""
        st = self.cpus[cpu]
        if not st.initialised:
            return None
        off = st.espfix_stack & ~PAGE_MASK
        if off + FRAME_BYTES > PAGE_SIZE:
            raise FrameUnreadable(f"espfix_stack {st.espfix_stack:#x} puts the {FRAME_BYTES}-byte "
                                  f"frame at page offset {off:#x}, across the page end: "
                                  "espfix_stack is corrupt")
        w = self.walk(st.espfix_stack)
        if w.phys is None:
            raise FrameUnreadable(f"espfix_stack {st.espfix_stack:#x} is not mapped: {w.fault}")
        try:
            if fresh:
                self.reader.mem.invalidate(w.phys)
            page = self.reader.mem.phys_page(w.phys)
        except PageFiltered:
            raise                   # a crash dump left the page out: the caller says so
        except InspectError as e:
            raise FrameUnreadable(e.cause) from None
        words = struct.unpack_from("<6Q", page, off)
        if not any(words):
            return None
        return dict(zip(FRAME_WORDS, words))

    def frames(self, cpus: Iterable[int]) -> list[dict[str, int] | None]:
        """``[frame(cpu) for cpu in cpus]``, each stack page walked and fetched once
        for its 64 CPUs."""
        out: list[dict[str, int] | None] = []
        pages: dict[int, bytes | None] = {}
        frame = struct.Struct("<6Q").unpack_from
        for cpu in cpus:
            stack = self.cpus[cpu].espfix_stack
            base = stack & PAGE_MASK
            if not stack:
                out.append(None)
                continue
            if base not in pages:
                w = self.walk(base)
                pages[base] = None if w.phys is None else self.reader.mem.phys_page(w.phys)
            page = pages[base]
            words = frame(page, stack & ~PAGE_MASK) if page is not None else None
            out.append(dict(zip(FRAME_WORDS, words)) if words and any(words) else None)
        return out


def _levels(target: Target, reader: KernelReader) -> int:
    v = target.vmcoreinfo.pgtable_l5_enabled
    if v is not None:
        return 5 if v else 4
    sym = target.symbols.get("__pgtable_l5_enabled")
    if sym is not None:
        return 5 if reader.u32(sym) else 4
    raise InspectError("cannot tell 4- from 5-level paging: no NUMBER(pgtable_l5_enabled) "
                       "in VMCOREINFO and no __pgtable_l5_enabled symbol",
                       "pass the kernel's vmlinux as {symbols}", role="symbols",
                       field="pgtable_l5_enabled")


def _page_offset_base(target: Target, reader: KernelReader, levels: int) -> int:
    sym = target.symbols.get("page_offset_base")
    if sym is not None:
        return reader.u64(sym)
    v = target.vmcoreinfo.page_offset
    if v is not None:
        return v
    # Fall back on the core's RAM segments: direct-map address minus physical.
    deltas: dict[int, int] = {}
    for s in target.core.segments:
        if s.has_paddr and not is_image_address(s.vaddr):
            d = (s.vaddr - s.paddr) & MASK64
            deltas[d] = deltas.get(d, 0) + 1
    if deltas:
        return max(deltas, key=deltas.__getitem__)
    return PAGE_OFFSET_BASE[levels]


def _need(target: Target, name: str, why: str) -> int:
    addr = target.symbols.get(name)
    if addr is not None:
        return addr
    syms = target.symbols
    if "espfix_stack" not in syms and "init_espfix_ap" in syms:
        raise InspectError(f"{syms.source} has no data symbols ({name} is missing): the kernel "
                           "was built without CONFIG_KALLSYMS_ALL",
                           "pass the kernel's vmlinux or System.map as {symbols}",
                           path=syms.source, role="symbols", field=name)
    if "init_espfix_ap" not in syms and "espfix_stack" not in syms and "_text" in syms \
            and name.startswith("espfix"):
        raise InspectError(f"{syms.source} has no espfix symbols: the kernel was built without "
                           "CONFIG_X86_ESPFIX64 (or CONFIG_X86_16BIT=n), so there is no espfix",
                           "nothing to inspect on this kernel")
    raise InspectError(f"symbol {name} ({why}) is not in {syms.source}",
                       "pass the kernel's vmlinux as {symbols} (it has every static)",
                       path=syms.source, role="symbols", field=name)


def load_state(target: Target, host: HostFacts) -> EspfixState:
    """Read the espfix state of *target*.

    *host*: the facts about the machine that are not in kernel memory (NUMA nodes,
    memory block size, sysfs CPU lists, PTI and FRED status).  The caller supplies
    them (:func:`inspector.hostfacts.target_host_facts`: sysfs for a live target, the
    recorded facts of a snapshot); this layer reads kernel memory only.
    """
    syms = target.symbols
    reader = KernelReader(target)
    levels = _levels(target, reader)
    pob = _page_offset_base(target, reader, levels)
    reader.page_offset_base, reader.levels = pob, levels
    walker = PageTableWalker(target.mem, levels, target.sme_mask)
    init_top_pgt = _need(target, "init_top_pgt", "the kernel page-table root")
    pgd_pa = target.pa_symbol(init_top_pgt)
    reader.walker, reader.pgd_pa = walker, pgd_pa

    nr_cpu_ids = reader.u32(_need(target, "nr_cpu_ids", "the number of CPU ids"))
    if not 0 < nr_cpu_ids <= 1 << 17:
        raise InspectError(f"nr_cpu_ids reads as {nr_cpu_ids}: the core or symbols are wrong",
                           "use the symbol file of the inspected kernel")
    possible, possible_beyond = reader.bitmap(
        _need(target, "__cpu_possible_mask", "possible CPUs"), nr_cpu_ids)
    online, online_beyond = reader.bitmap(
        _need(target, "__cpu_online_mask", "online CPUs"), nr_cpu_ids)
    offsets = reader.u64s(_need(target, "__per_cpu_offset", "per-CPU area offsets"), nr_cpu_ids)
    stack_sym = _need(target, "espfix_stack", "per-CPU ministack address")
    waddr_sym = _need(target, "espfix_waddr", "per-CPU ministack writable alias")
    pages_sym = _need(target, "espfix_pages", "stack page array")
    pud_sym = _need(target, "espfix_pud_page", "the espfix PUD page")

    online_set = set(online)
    cpus: dict[int, CpuState] = {}
    lo = min(stack_sym, waddr_sym)
    span = max(stack_sym, waddr_sym) + 8 - lo
    if span <= 64:          # both words in one read per CPU, all CPUs in one batch
        raws = reader.read_many([lo + offsets[cpu] for cpu in possible], span)
        stack_at, waddr_at = stack_sym - lo, waddr_sym - lo
        if not (stack_at | waddr_at | span) & 7:        # aligned: one unpack per CPU
            words = struct.Struct(f"<{span // 8}Q").unpack
            si, wi = stack_at // 8, waddr_at // 8
            for cpu, raw in zip(possible, raws):
                w = words(raw)
                cpus[cpu] = CpuState(cpu, cpu in online_set, w[si], w[wi])
        else:
            word = struct.Struct("<Q").unpack_from
            for cpu, raw in zip(possible, raws):
                cpus[cpu] = CpuState(cpu, cpu in online_set, word(raw, stack_at)[0],
                                     word(raw, waddr_at)[0])
    else:
        for cpu in possible:
            stack = reader.u64(stack_sym + offsets[cpu])
            waddr = reader.u64(waddr_sym + offsets[cpu])
            cpus[cpu] = CpuState(cpu, cpu in online_set, stack, waddr)

    npages = (nr_cpu_ids + ESPFIX_STACKS_PER_PAGE - 1) // ESPFIX_STACKS_PER_PAGE
    espfix_pages = reader.u64s(pages_sym, npages)

    pti_pgd = pgd_pa + PAGE_SIZE       # PTI: the user half of init_top_pgt (arch/x86/mm/pti.c)
    user_pgd_pa: int | None = None
    try:
        if any(e & PAGE_PRESENT for e in walker.table(pti_pgd)):
            user_pgd_pa = pti_pgd
    except InspectError:
        user_pgd_pa = None          # no user half in this core: PTI off or not captured

    def _u32(name: str) -> int | None:
        a = syms.get(name)
        return reader.u32(a) if a is not None else None

    mask_sym = syms.get("__supported_pte_mask")
    info = KernelInfo(
        osrelease=target.osrelease, core=target.core.path, symbols=syms.source,
        live=target.live, levels=levels, kaslr_offset=target.kaslr_offset,
        phys_base=target.phys_base, page_offset_base=pob, sme_mask=target.sme_mask,
        nr_cpu_ids=nr_cpu_ids,
        percpu="zero-based" if syms.is_percpu_zero_based() else "relative",
        supported_pte_mask=reader.u64(mask_sym) if mask_sym is not None else None,
        init_top_pgt=init_top_pgt, pgd_pa=pgd_pa, pti=user_pgd_pa is not None,
        user_pgd_pa=user_pgd_pa, espfix_pud_page=pud_sym,
        pud_pa=target.pa_symbol(pud_sym),
        page_random=_u32("page_random"), slot_random=_u32("slot_random"))
    state = EspfixState(info, reader, walker, possible, online, cpus, espfix_pages, host,
                        beyond_nr_cpu_ids={"possible": possible_beyond,
                                           "online": online_beyond})
    _refuse_if_disabled(state)
    return state


def _refuse_if_disabled(state: EspfixState) -> None:
    """No CPU set up and nothing installed at ESPFIX_BASE_ADDR: espfix is off."""
    if any(c.initialised for c in state.cpus.values()):
        return
    top = state.top_entry()
    installed = top is not None and top.entry & PAGE_PRESENT
    if installed:
        return                      # tables exist: the audit reports the CPUs
    if state.host.fred:
        raise InspectError("espfix is disabled: this kernel uses FRED, whose ERETU returns "
                           "restore the full RSP, so init_espfix_bsp() set nothing up",
                           "nothing to inspect; boot with fred=off to use espfix")
    raise InspectError("espfix is not set up on this kernel: no CPU has an espfix_stack and "
                       "nothing is installed at 0xffffff0000000000 (FRED in use, Xen PV, or "
                       "16-bit segments disabled)",
                       "nothing to inspect on this kernel")
