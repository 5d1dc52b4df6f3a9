"""Synthetic kernels for tests and benchmarks: realistic ELF cores, built entry by entry.

A :class:`SynthKernel` lays out a kernel image (``init_top_pgt`` with its PTI
user half, ``espfix_pud_page``, ``espfix_pages``, CPU masks, ``__per_cpu_offset``,
``page_offset_base``...), per-CPU areas in the direct map, and runs the
kernel's own ``init_espfix_ap()`` algorithm (arch/x86/kernel/espfix_64.c) for
each CPU brought up, allocating PMD, PTE and stack pages from per-node pools.
Tests then corrupt what they like (``write_u64``, ``set_percpu``...) and
:meth:`SynthKernel.write` emits a core shaped like /proc/kcore (VMCOREINFO note,
``KCORE_TEXT`` segment, RAM segments with ``p_paddr``, virtual-only segments)
plus a kallsyms, System.map or vmlinux symbol file.

This is test scaffolding only: features are proven on real kernels in the VM
harness (tests/vm), and this builder must agree with those captures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from inspector.elfcore import NO_PADDR
from inspector.elfwrite import LoadSegment, NoteEntry, write_core
from inspector.fileio import atomic_output
from inspector.model import (ESPFIX_PMD_CLONES, ESPFIX_PTE_CLONES,
                             ESPFIX_PUD_CLONES, ESPFIX_STACKS_PER_PAGE, PTE_STRIDE,
                             Randomness, espfix_base_addr)

MASK64 = (1 << 64) - 1
START_KERNEL_MAP = 0xFFFFFFFF80000000
LINK_TEXT = 0xFFFFFFFF81000000
P, RW, USER, A, D, G = 0x1, 0x2, 0x4, 0x20, 0x40, 0x100
NX = 1 << 63
PAGE_TABLE = P | RW | USER | A | D           # _PAGE_TABLE (p4d_populate)
KERNPG_TABLE = P | RW | A | D                # _KERNPG_TABLE
PGTABLE_PROT = (KERNPG_TABLE & ~RW) | NX     # espfix_64.c PGTABLE_PROT
PAGE_KERNEL_RO = P | A | D | G | NX          # __PAGE_KERNEL_RO
RAM_PERCPU = 0x1_0000_0000                   # per-CPU units
RAM_POOL = 0x1_8000_0000                     # page-table and stack pages, per node
NODE_STRIDE = 0x4000_0000
BLOCK_SIZE = 0x800_0000                      # memory block size for NUMA facts


@dataclass
class SynthSpec:
    nr_cpus: int = 4                       # nr_cpu_ids = possible CPUs
    online: list[int] | None = None        # default: all possible
    brought_up: list[int] | None = None    # CPUs that ran init_espfix_ap; default: online
    levels: int = 5
    pti: bool = False
    percpu: str = "zero-based"             # or "relative" (6.15+)
    rand: int = 0x5EED_1234_ABCD
    kaslr_offset: int = 0x2A400000
    phys_base: int = -0x1A000000           # signed, as under KASLR
    page_offset_base: int | None = None
    sme_mask: int = 0
    nx: bool = True                        # __supported_pte_mask has _PAGE_NX
    osrelease: str = "6.1.0-99-amd64"
    statics: bool = True                   # page_random/slot_random in the symbols
    pte_dirty: bool = True                 # __PAGE_KERNEL_RO has _PAGE_DIRTY before 6.6
    percpu_unit: int | None = None         # bytes per CPU unit (default: by size)
    nodes: int = 1                         # NUMA nodes; CPUs spread round-robin by default
    cpu_node: dict[int, int] | None = None
    frames: dict[int, tuple[int, ...]] = field(default_factory=dict)
    vmcoreinfo: bool = True
    layout_shift: int = 0                  # move the data symbols: "another build"
    espfix: bool = True                    # False: init_espfix_bsp() returned early (FRED)


class SynthKernel:
    def __init__(self, spec: SynthSpec) -> None:
        self.spec = s = spec
        self.rnd = Randomness.from_rand(s.rand)
        self.pob = s.page_offset_base or (0xFF3EBA5D00000000 if s.levels == 5
                                          else 0xFFFF9C8A40000000)
        self.nr_cpus_config = max(64, s.nr_cpus)
        self.online = list(range(s.nr_cpus)) if s.online is None else sorted(s.online)
        self.brought_up = self.online if s.brought_up is None else list(s.brought_up)
        if not s.espfix:
            self.brought_up = []
        self.cpu_node = s.cpu_node or {c: c % s.nodes for c in range(s.nr_cpus)}
        self.phys: dict[int, bytearray] = {}          # page-aligned pa -> page
        self.pool_next = {n: RAM_POOL + n * NODE_STRIDE for n in range(s.nodes)}
        self.syms: dict[str, int] = {}
        self.types: dict[str, str] = {}
        self._image_layout()
        self._page_tables()
        self._percpu()
        self.pmd_pa: dict[int, int] = {}    # group pud index -> PMD page pa
        self.pte_pa: dict[int, int] = {}    # group pud index -> PTE page pa
        self.stack_pa: dict[int, int] = {}  # espfix_pages index -> stack page pa
        self.calls: list[tuple[int, bool]] = []
        for cpu in self.brought_up:
            self.init_espfix_ap(cpu)
        for cpu, frame in s.frames.items():
            self.write_frame(cpu, frame)

    # -- kernel image ------------------------------------------------------
    def _image_layout(self) -> None:
        s = self.spec
        self.text = (LINK_TEXT + s.kaslr_offset) & MASK64
        n = self.nr_cpus_config
        size = 0x400000 + 8 * n + 3 * (n // 8 + 8) + 8 * (n // 64 + 1) + 0x10000
        size = (size + 0xFFFFF) & ~0xFFFFF
        if s.percpu == "relative":
            size += self._unit()
        self.image = bytearray(size)
        self._cursor = 0x200000 + s.layout_shift
        self.sym("_text", 0, "T")
        self.sym("_stext", 0x1000, "T")
        self.sym("init_espfix_ap", 0x41230, "T")
        self.sym("linux_banner", 0x100000, "D")
        banner = (f"Linux version {s.osrelease} (debian-kernel@lists.debian.org) "
                  "(gcc-12 (Debian 12.2.0-14) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian "
                  f"{s.osrelease}\n\0").encode()
        self.image[0x100000:0x100000 + len(banner)] = banner
        self.sym("init_top_pgt", self._alloc(8192, 8192), "D")
        self.sym("level4_kernel_pgt", self._alloc(4096, 4096), "D")
        self.sym("level3_kernel_pgt", self._alloc(4096, 4096), "D")
        self.sym("espfix_pud_page", self._alloc(4096, 4096), "b")
        self.sym("espfix_pages", self._alloc(8 * (n // 64 + 1), 64), "b")
        self.sym("page_random", self._alloc(4, 4), "b")
        self.sym("slot_random", self._alloc(4, 4), "b")
        self.sym("nr_cpu_ids", self._alloc(4, 8), "D")
        self.sym("__cpu_possible_mask", self._alloc(n // 8 + 8, 64), "D")
        self.sym("__cpu_online_mask", self._alloc(n // 8 + 8, 64), "D")
        self.sym("__cpu_present_mask", self._alloc(n // 8 + 8, 64), "D")
        self.sym("__per_cpu_offset", self._alloc(8 * n, 64), "D")
        self.sym("page_offset_base", self._alloc(8, 8), "D")
        self.sym("phys_base", self._alloc(8, 8), "D")
        self.sym("__pgtable_l5_enabled", self._alloc(4, 4), "D")
        self.sym("__supported_pte_mask", self._alloc(8, 8), "D")
        self.sym("init_uts_ns", self._alloc(64, 64), "D")
        self.sym("mem_section", self._alloc(8, 8), "D")   # a pointer, see vmcoreinfo_text
        self.put_u32(self.syms["page_random"], self.rnd.page_random)
        self.put_u32(self.syms["slot_random"], self.rnd.slot_random)
        self.put_u32(self.syms["nr_cpu_ids"], s.nr_cpus)
        self._set_mask("__cpu_possible_mask", range(s.nr_cpus))
        self._set_mask("__cpu_present_mask", range(s.nr_cpus))
        self._set_mask("__cpu_online_mask", self.online)
        self.put_u64(self.syms["page_offset_base"], self.pob)
        self.put_u64(self.syms["phys_base"], s.phys_base & MASK64)
        self.put_u32(self.syms["__pgtable_l5_enabled"], int(s.levels == 5))
        supported = (MASK64 if s.nx else MASK64 & ~NX) & ~s.sme_mask
        self.put_u64(self.syms["__supported_pte_mask"], supported)
        self.ptemask = supported
        if not s.statics:       # the statics exist; a kallsyms without them hides them
            for name in ("page_random", "slot_random"):
                del self.syms[name]
        if s.percpu == "relative":
            self.percpu_start = self.text + self._alloc(self._unit(), 4096)
            self.syms["__per_cpu_start"] = self.percpu_start
            self.types["__per_cpu_start"] = "D"
            self.syms["espfix_stack"] = self.percpu_start + 0x10
            self.syms["espfix_waddr"] = self.percpu_start + 0x18
            self.types["espfix_stack"] = self.types["espfix_waddr"] = "D"
        else:
            self.percpu_start = 0
            self.syms["__per_cpu_start"] = 0
            self.types["__per_cpu_start"] = "A"
            base = 0x19000 if self._unit() > 0x19020 else 0x10
            self.syms["espfix_stack"] = base + 0x8
            self.syms["espfix_waddr"] = base + 0x10
            self.types["espfix_stack"] = self.types["espfix_waddr"] = "A"

    def _raw_put(self, addr: int, data: bytes) -> None:
        off = addr - self.text
        self.image[off:off + len(data)] = data

    def _unit(self) -> int:
        if self.spec.percpu_unit:
            return self.spec.percpu_unit
        return 0x20000 if self.spec.nr_cpus <= 64 else 64

    def _alloc(self, size: int, align: int) -> int:
        self._cursor = (self._cursor + align - 1) & ~(align - 1)
        off = self._cursor
        self._cursor += size
        assert self._cursor <= len(self.image), "image too small"
        return off

    def sym(self, name: str, off: int, typ: str) -> None:
        self.syms[name] = self.text + off
        self.types[name] = typ

    def pa_symbol(self, vaddr: int) -> int:
        return (vaddr - START_KERNEL_MAP + self.spec.phys_base) & MASK64

    def _set_mask(self, name: str, cpus) -> None:
        words = [0] * (self.nr_cpus_config // 64 + 1)
        for c in cpus:
            words[c // 64] |= 1 << (c % 64)
        self._raw_put(self.syms[name], struct.pack(f"<{len(words)}Q", *words))

    def write_mask(self, name: str, cpus) -> None:
        """Overwrite a cpumask (``__cpu_online_mask``...) without touching anything else:
        the corruption a test wants."""
        self._set_mask(name, cpus)

    # -- memory access -----------------------------------------------------
    def _image_off(self, vaddr: int) -> int | None:
        off = (vaddr - self.text) & MASK64
        return off if off < len(self.image) else None

    def put_u64(self, vaddr: int, value: int) -> None:
        off = self._image_off(vaddr)
        if off is not None:
            struct.pack_into("<Q", self.image, off, value & MASK64)
        else:
            self.write_u64(self._dm_pa(vaddr), value)

    def put_u32(self, vaddr: int, value: int) -> None:
        struct.pack_into("<I", self.image, self._image_off(vaddr), value)

    def get_u64(self, vaddr: int) -> int:
        off = self._image_off(vaddr)
        if off is not None:
            return struct.unpack_from("<Q", self.image, off)[0]
        return self.read_u64(self._dm_pa(vaddr))

    def _dm_pa(self, vaddr: int) -> int:
        return (vaddr - self.pob) & MASK64

    def page(self, pa: int) -> bytearray:
        base = pa & ~0xFFF
        pg = self.phys.get(base)
        if pg is None:
            img = (base - self.pa_symbol(self.text)) & MASK64
            if img < len(self.image):
                raise ValueError("write image pages through put_u64")
            pg = self.phys[base] = bytearray(4096)
        return pg

    def write_u64(self, pa: int, value: int) -> None:
        img = (pa - self.pa_symbol(self.text)) & MASK64
        if img < len(self.image):
            struct.pack_into("<Q", self.image, img, value & MASK64)
            return
        struct.pack_into("<Q", self.page(pa), pa & 0xFFF, value & MASK64)

    def read_u64(self, pa: int) -> int:
        img = (pa - self.pa_symbol(self.text)) & MASK64
        if img < len(self.image):
            return struct.unpack_from("<Q", self.image, img)[0]
        return struct.unpack_from("<Q", self.page(pa), pa & 0xFFF)[0]

    def alloc_page(self, node: int) -> int:
        pa = self.pool_next[node]
        self.pool_next[node] += 4096
        self.page(pa)
        return pa

    # -- page tables -------------------------------------------------------
    def _page_tables(self) -> None:
        s = self.spec
        self.pgd_pa = self.pa_symbol(self.syms["init_top_pgt"])
        self.user_pgd_pa = self.pgd_pa + 4096
        self.pud_pa = self.pa_symbol(self.syms["espfix_pud_page"])
        l4 = self.pa_symbol(self.syms["level4_kernel_pgt"])
        l3 = self.pa_symbol(self.syms["level3_kernel_pgt"])
        sme = s.sme_mask
        # direct map and kernel text entries, as a real init_top_pgt has them
        dm_pud = self.alloc_page(0)
        self.write_u64(dm_pud, 0 | P | RW | A | D | 0x80 | G | NX | sme)   # a 1 GiB page
        if s.levels == 5:
            self.write_u64(self.pgd_pa + 8 * ((self.pob >> 48) & 511), dm_pud | PAGE_TABLE | sme)
            self.write_u64(self.pgd_pa + 8 * 511, l4 | PAGE_TABLE | sme)
            self.write_u64(l4 + 8 * 511, l3 | PAGE_TABLE | sme)
            if s.espfix:
                self.write_u64(l4 + 8 * 510, self.pud_pa | PAGE_TABLE | sme)   # p4d_populate
            if s.pti:
                up4d = self.alloc_page(0)
                self.write_u64(self.user_pgd_pa + 8 * 511, up4d | KERNPG_TABLE | sme)
                self.write_u64(up4d + 8 * 510, self.read_u64(l4 + 8 * 510))   # pti_clone_p4d
                self.write_u64(up4d + 8 * 511, l3 | PAGE_TABLE | sme)
                self.user_p4d_pa = up4d
        else:
            self.write_u64(self.pgd_pa + 8 * ((self.pob >> 39) & 511), dm_pud | PAGE_TABLE | sme)
            self.write_u64(self.pgd_pa + 8 * 511, l3 | PAGE_TABLE | sme)
            if s.espfix:
                self.write_u64(self.pgd_pa + 8 * 510, self.pud_pa | PAGE_TABLE | sme)
            if s.pti:
                self.write_u64(self.user_pgd_pa + 8 * 510, self.read_u64(self.pgd_pa + 8 * 510))
                self.write_u64(self.user_pgd_pa + 8 * 511, l3 | PAGE_TABLE | sme)

    def espfix_top_entry_pa(self, user: bool = False) -> int:
        """Physical address of the entry that installs espfix_pud_page."""
        if self.spec.levels == 5:
            p4d = self.user_p4d_pa if user else self.pa_symbol(self.syms["level4_kernel_pgt"])
            return p4d + 8 * 510
        return (self.user_pgd_pa if user else self.pgd_pa) + 8 * 510

    # -- per-CPU -----------------------------------------------------------
    def _percpu(self) -> None:
        unit = self._unit()
        self.unit = unit
        offs = []
        for cpu in range(self.spec.nr_cpus):
            unit_va = self.pob + RAM_PERCPU + cpu * unit
            offs.append((unit_va - self.percpu_start) & MASK64)
        self._raw_put(self.syms["__per_cpu_offset"], struct.pack(f"<{len(offs)}Q", *offs))
        self.offsets = offs
        # touch the pages holding espfix_stack/espfix_waddr of every CPU
        for cpu in range(self.spec.nr_cpus):
            for name in ("espfix_stack", "espfix_waddr"):
                self.page(self._dm_pa(self.percpu_addr(cpu, name)))

    def percpu_addr(self, cpu: int, name: str) -> int:
        return (self.syms[name] + self.offsets[cpu]) & MASK64

    def set_percpu(self, cpu: int, name: str, value: int) -> None:
        self.write_u64(self._dm_pa(self.percpu_addr(cpu, name)), value)

    def get_percpu(self, cpu: int, name: str) -> int:
        return self.read_u64(self._dm_pa(self.percpu_addr(cpu, name)))

    # -- init_espfix_ap(), as arch/x86/kernel/espfix_64.c does it -----------
    def init_espfix_ap(self, cpu: int) -> None:
        sme = self.spec.sme_mask
        if self.get_percpu(cpu, "espfix_stack"):
            self.calls.append((cpu, False))
            return
        rnd = self.rnd
        addr = espfix_base_addr(cpu, rnd.page_random, rnd.slot_random)
        page = cpu // ESPFIX_STACKS_PER_PAGE
        pages_addr = self.syms["espfix_pages"] + 8 * page
        stack_va = self.get_u64(pages_addr)
        if not stack_va:
            node = self.cpu_node.get(cpu, 0)
            pud_idx = (addr >> 30) & 511
            pud_entry_pa = self.pud_pa + 8 * pud_idx
            pud = self.read_u64(pud_entry_pa)
            if not pud & P:
                pmd_p = self.alloc_page(node)
                pud = pmd_p | (PGTABLE_PROT & self.ptemask) | sme
                for n in range(ESPFIX_PUD_CLONES):
                    self.write_u64(pud_entry_pa + 8 * n, pud)
                self.pmd_pa[pud_idx] = pmd_p
            pmd_p = pud & ((1 << 52) - 1) & ~0xFFF & ~sme
            pmd_entry_pa = pmd_p + 8 * ((addr >> 21) & 511)
            pmd = self.read_u64(pmd_entry_pa)
            if not pmd & P:
                pte_p = self.alloc_page(node)
                pmd = pte_p | (PGTABLE_PROT & self.ptemask) | sme
                for n in range(ESPFIX_PMD_CLONES):
                    self.write_u64(pmd_p + 8 * n, pmd)
                self.pte_pa[pud_idx - pud_idx % ESPFIX_PUD_CLONES] = pte_p
            pte_p = pmd & ((1 << 52) - 1) & ~0xFFF & ~sme
            stack_pa = self.alloc_page(node)
            ro = PAGE_KERNEL_RO if self.spec.pte_dirty else PAGE_KERNEL_RO & ~D
            pte = stack_pa | (ro & self.ptemask) | sme
            first = (addr >> 12) & 511
            for n in range(ESPFIX_PTE_CLONES):
                self.write_u64(pte_p + 8 * (first + n * PTE_STRIDE), pte)
            stack_va = self.pob + stack_pa
            self.put_u64(pages_addr, stack_va)
            self.stack_pa[page] = stack_pa
        self.set_percpu(cpu, "espfix_stack", addr)
        self.set_percpu(cpu, "espfix_waddr", stack_va + (addr & 0xFFF))
        self.calls.append((cpu, True))

    def write_frame(self, cpu: int, frame: tuple[int, ...]) -> None:
        waddr = self.get_percpu(cpu, "espfix_waddr")
        for i, w in enumerate(frame):
            self.write_u64(self._dm_pa(waddr) + 8 * i, w)

    def group_pud_index(self, cpu: int) -> int:
        rnd = self.rnd
        return (espfix_base_addr(cpu, rnd.page_random, rnd.slot_random) >> 30) & 511

    def host_facts(self) -> dict:
        """NUMA facts as /sys/devices/system/node would show them."""
        blocks = {}
        for n in range(self.spec.nodes):
            start = (RAM_POOL + n * NODE_STRIDE) // BLOCK_SIZE
            for b in range(start, start + NODE_STRIDE // BLOCK_SIZE):
                blocks[str(b)] = n
        return {"online": self.online, "possible": list(range(self.spec.nr_cpus)),
                "cpu_node": {str(c): n for c, n in self.cpu_node.items()},
                "block_size": BLOCK_SIZE, "block_node": blocks, "fred": False}

    # -- output ------------------------------------------------------------
    def vmcoreinfo_text(self) -> str:
        s = self.spec
        lines = [f"OSRELEASE={s.osrelease}", "BUILD-ID=0123456789abcdef", "PAGESIZE=4096",
                 f"SYMBOL(init_uts_ns)={self.syms['init_uts_ns']:x}",
                 f"SYMBOL(_stext)={self.syms['_stext']:x}",
                 # VMCOREINFO_SYMBOL_ARRAY: the pointer's value, not &mem_section
                 f"SYMBOL(mem_section)={self.pob + 0x7FF1F000:x}",
                 f"SYMBOL(init_top_pgt)={self.syms['init_top_pgt']:x}",
                 f"NUMBER(phys_base)={s.phys_base}",
                 f"NUMBER(pgtable_l5_enabled)={int(s.levels == 5)}",
                 f"KERNELOFFSET={s.kaslr_offset:x}",
                 f"NUMBER(KERNEL_IMAGE_SIZE)={1 << 30}", f"NUMBER(sme_mask)={s.sme_mask}"]
        return "\n".join(lines) + "\n"

    def segments(self) -> list[LoadSegment]:
        segs = [LoadSegment(self.text, bytes(self.image), self.pa_symbol(self.text))]
        # RAM: one segment per run of touched pages, at its direct-map address
        run_start = prev = None
        chunks: list[bytes] = []
        for pa in sorted(self.phys):
            if prev is not None and pa != prev + 4096:
                segs.append(LoadSegment(self.pob + run_start, b"".join(chunks), run_start))
                run_start, chunks = None, []
            if run_start is None:
                run_start = pa
            chunks.append(bytes(self.phys[pa]))
            prev = pa
        if run_start is not None:
            segs.append(LoadSegment(self.pob + run_start, b"".join(chunks), run_start))
        # virtual-only ranges (vmalloc, vmemmap) like kcore's, p_paddr = -1
        vmalloc = 0xFFA0000000000000 if self.spec.levels == 5 else 0xFFFFC90000000000
        segs.append(LoadSegment(vmalloc, bytes(4096), NO_PADDR, memsz=1 << 30))
        segs.append(LoadSegment(0xFFFFEA0000000000, bytes(64), NO_PADDR, memsz=1 << 20))
        return segs

    def write(self, core_path: str, symbols_path: str | None = None,
              symbols_kind: str = "kallsyms") -> None:
        notes = [NoteEntry("CORE", 1, bytes(336))]
        if self.spec.vmcoreinfo:
            notes.append(NoteEntry("VMCOREINFO", 0, self.vmcoreinfo_text().encode()))
        write_core(core_path, self.segments(), notes)
        if symbols_path is not None:
            if symbols_kind == "vmlinux":
                self.write_vmlinux(symbols_path)
            else:
                with atomic_output(symbols_path) as fh:
                    fh.write(self.symbol_text(unrelocated=symbols_kind == "system.map").encode())

    def link_address(self, addr: int) -> int:
        return (addr - self.spec.kaslr_offset) & MASK64 if addr >= START_KERNEL_MAP else addr

    def symbol_text(self, unrelocated: bool = False) -> str:
        out = []
        for name, addr in sorted(self.syms.items(), key=lambda kv: kv[1]):
            a = self.link_address(addr) if unrelocated else addr
            out.append(f"{a:016x} {self.types[name]} {name}")
        out.append(f"{0xffffffffc0a01000:016x} t espfix_dummy_mod_fn\t[dummy]")
        return "\n".join(out) + "\n"

    def write_vmlinux(self, path: str) -> None:
        """A minimal unrelocated vmlinux: one PT_LOAD with the banner, and a .symtab."""
        strtab = bytearray(b"\0")
        symtab = bytearray(bytes(24))                       # the null symbol
        for name, addr in self.syms.items():
            off = len(strtab)
            strtab += name.encode() + b"\0"
            info = 0x11 if self.types[name] in "DdBbA" else 0x12
            shndx = 0xFFF1 if self.types[name] == "A" else 1
            symtab += struct.pack("<IBBHQQ", off, info, 0, shndx, self.link_address(addr), 0)
        shstr = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
        text = bytes(self.image[:0x200000])
        ehsz, phsz, shsz = 64, 56, 64
        text_off = 0x1000
        sym_off = text_off + len(text)
        str_off = sym_off + len(symtab)
        shs_off = str_off + len(strtab)
        sh_off = (shs_off + len(shstr) + 7) & ~7
        link = LINK_TEXT
        ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
            "<HHIQQQIHHHHHH", 2, 62, 1, link, ehsz, sh_off, 0, ehsz, phsz, 1, shsz, 5, 4)
        phdr = struct.pack("<IIQQQQQQ", 1, 5, text_off, link, link - START_KERNEL_MAP,
                           len(text), len(text), 4096)
        shdrs = bytes(64)
        shdrs += struct.pack("<IIQQQQIIQQ", 1, 1, 6, link, text_off, len(text), 0, 0, 4096, 0)
        shdrs += struct.pack("<IIQQQQIIQQ", 7, 2, 0, 0, sym_off, len(symtab), 3, 1, 8, 24)
        shdrs += struct.pack("<IIQQQQIIQQ", 15, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0)
        shdrs += struct.pack("<IIQQQQIIQQ", 23, 3, 0, 0, shs_off, len(shstr), 0, 0, 1, 0)
        with atomic_output(path) as fh:
            fh.write(ehdr + phdr)
            fh.write(bytes(text_off - ehsz - phsz))
            fh.write(text + symtab + strtab + shstr)
            fh.write(bytes(sh_off - shs_off - len(shstr)))
            fh.write(shdrs)


def build(**kw) -> SynthKernel:
    return SynthKernel(SynthSpec(**kw))
