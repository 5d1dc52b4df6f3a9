"""Synthetic crash dumps of a :class:`~tests.helpers.synthcore.SynthKernel`, for unit tests.

The real formats are proven against real dumps in the VM matrix (tests/vm/test_dumps.py:
QEMU dump-guest-memory and makedumpfile in a kdump capture kernel); these writers let
the host suite reach the corners those cannot show on demand: every kallsyms address
form, a "big" symbol, filtered page-table pages, registers in the espfix path.

- :func:`add_kallsyms` lays the kernel's compressed kallsyms tables into the image the
  way scripts/kallsyms.c does (names as token bytes behind a length, 256 tokens, an
  offsets array in one of four forms) and returns the VMCOREINFO lines that point at them;
- :func:`write_elf_vmcore` writes an ELF vmcore: physical PT_LOADs only (``p_vaddr`` 0,
  as QEMU's ``dump-guest-memory`` without paging), one NT_PRSTATUS per CPU, VMCOREINFO;
- :func:`write_diskdump` writes a kdump-compressed file, header version 6 (the layout of
  makedumpfile's diskdump_mod.h), zlib or uncompressed pages, dropped pages cleared in
  the second bitmap like ``makedumpfile -d``; ``flattened=True`` writes the ``-F`` stream.
"""

from __future__ import annotations

import struct
import zlib

from inspector.elfwrite import LoadSegment, NoteEntry, write_core
from inspector.kdump import REGISTER_NAMES
from tests.helpers.synthcore import MASK64, START_KERNEL_MAP, SynthKernel

PAGE = 4096
#: multi-character tokens for byte values that are not printable ASCII
TOKENS = ("espfix_", "per_cpu", "__", "init_", "_mask", "page", "random", "offset",
          "kallsyms_", "stack", "cpu", "_pgt", "top", "waddr")


def _token_table() -> list[bytes]:
    tokens = [b"?"] * 256
    for b in range(0x20, 0x7F):
        tokens[b] = bytes([b])
    for i, t in enumerate(TOKENS):
        tokens[0x80 + i] = t.encode()
    return tokens


def _compress(text: str, tokens: list[bytes]) -> bytes:
    multi = sorted(((t, b) for b, t in enumerate(tokens) if len(t) > 1),
                   key=lambda tb: -len(tb[0]))
    out = bytearray()
    data = text.encode()
    i = 0
    while i < len(data):
        for t, b in multi:
            if data.startswith(t, i):
                out.append(b)
                i += len(t)
                break
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def add_kallsyms(k: SynthKernel, form: str = "absolute-percpu", big_name: bool = True,
                 extra: dict[str, tuple[int, str]] | None = None) -> str:
    """Write kallsyms tables for *k*'s symbols into its image; return VMCOREINFO lines.

    *form*: ``absolute-percpu`` (x86-64 before 6.15: zero-based per-CPU symbols are
    non-negative offsets, the rest ``base - 1 - offset``), ``relative`` (``base + u32``),
    ``place-relative`` (7.0+: ``&offsets[i] + s32``) or ``absolute``
    (``kallsyms_addresses``).  *big_name* adds a 200-character symbol, whose length needs
    the two-byte form of 6.1+.
    """
    syms = dict(k.syms)
    types = dict(k.types)
    for name, (addr, typ) in (extra or {}).items():
        syms[name], types[name] = addr, typ
    if big_name:
        name = "x_big_" + "q" * 194
        syms[name], types[name] = k.syms["_stext"] + 0x800, "t"
    table = sorted(syms.items(), key=lambda kv: (kv[1], kv[0]))
    tokens = _token_table()
    names = bytearray()
    markers = []
    for i, (name, _addr) in enumerate(table):
        if i % 256 == 0:
            markers.append(len(names))
        comp = _compress(types[name] + name, tokens)
        n = len(comp)
        names += bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])
        names += comp
    tt = bytearray()
    index = []
    for t in tokens:
        index.append(len(tt))
        tt += t + b"\0"
    n = len(table)
    at = {}
    at["kallsyms_num_syms"] = k._alloc(4, 8)
    at["kallsyms_names"] = k._alloc(len(names), 8)
    at["kallsyms_markers"] = k._alloc(4 * len(markers), 8)
    at["kallsyms_token_table"] = k._alloc(len(tt), 8)
    at["kallsyms_token_index"] = k._alloc(512, 8)
    if form == "absolute":
        at["kallsyms_addresses"] = k._alloc(8 * n, 8)
    else:
        at["kallsyms_offsets"] = k._alloc(4 * n, 8)
        if form != "place-relative":
            at["kallsyms_relative_base"] = k._alloc(8, 8)
    va = {name: k.text + off for name, off in at.items()}
    put = k._raw_put
    put(va["kallsyms_num_syms"], struct.pack("<I", n))
    put(va["kallsyms_names"], bytes(names))
    put(va["kallsyms_markers"], struct.pack(f"<{len(markers)}I", *markers))
    put(va["kallsyms_token_table"], bytes(tt))
    put(va["kallsyms_token_index"], struct.pack("<256H", *index))
    addrs = [a for _n, a in table]
    if form == "absolute":
        put(va["kallsyms_addresses"], struct.pack(f"<{n}Q", *addrs))
    elif form == "place-relative":
        base = va["kallsyms_offsets"]
        put(base, struct.pack(f"<{n}i", *[(a - (base + 4 * i)) for i, a in enumerate(addrs)]))
    else:
        image = [a for a in addrs if a >= START_KERNEL_MAP]
        rel = min(image)
        put(va["kallsyms_relative_base"], struct.pack("<Q", rel))
        if form == "relative":
            put(va["kallsyms_offsets"], struct.pack(f"<{n}I", *[(a - rel) & 0xFFFFFFFF
                                                               for a in addrs]))
        else:
            put(va["kallsyms_offsets"], struct.pack(
                f"<{n}i", *[a if a < START_KERNEL_MAP else rel - 1 - a for a in addrs]))
    for name, v in va.items():                    # in the symbol files too, as in real ones
        k.syms[name], k.types[name] = v, "D"
    keys = ("kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table",
            "kallsyms_token_index", "kallsyms_offsets", "kallsyms_relative_base",
            "kallsyms_addresses")
    return "".join(f"SYMBOL({key})={va[key]:x}\n" for key in keys if key in va)


def prstatus(regs: dict[str, int], pid: int = 0) -> bytes:
    """An x86-64 ``struct elf_prstatus`` (336 bytes)."""
    desc = bytearray(336)
    struct.pack_into("<i", desc, 32, pid)
    struct.pack_into(f"<{len(REGISTER_NAMES)}Q", desc, 112,
                     *[regs.get(n, 0) & MASK64 for n in REGISTER_NAMES])
    return bytes(desc)


def _pages(k: SynthKernel) -> dict[int, bytes]:
    """Every physical page of the synthetic machine: image and RAM."""
    pages: dict[int, bytes] = {}
    img_pa = k.pa_symbol(k.text)
    for off in range(0, len(k.image), PAGE):
        pages[img_pa + off] = bytes(k.image[off:off + PAGE])
    for pa, pg in k.phys.items():
        pages[pa] = bytes(pg)
    return pages


def write_elf_vmcore(k: SynthKernel, path: str, vmcoreinfo: str,
                     registers: list[dict[str, int]] = (), drop: set[int] = frozenset(),
                     qemu_notes: bool = False) -> None:
    """An ELF vmcore of physical memory; pages in *drop* left out (filtered).

    Like /proc/vmcore, the kernel image's ``PT_LOAD``s carry their virtual addresses
    and RAM its direct-map ones (kexec-tools' elfcorehdr); with *qemu_notes* every
    ``p_vaddr`` is 0, as in QEMU's dump without paging."""
    pages = _pages(k)
    img_pa = k.pa_symbol(k.text)

    def vaddr(pa: int) -> int:
        if qemu_notes:
            return 0
        if img_pa <= pa < img_pa + len(k.image):
            return k.text + (pa - img_pa)
        return (k.pob + pa) & MASK64
    segs: list[LoadSegment] = []
    run: list[bytes] = []
    start = prev = None
    for pa in sorted(pages):
        if pa in drop:
            continue
        if prev is not None and (pa != prev + PAGE or vaddr(pa) != vaddr(prev) + PAGE):
            segs.append(LoadSegment(vaddr(start), b"".join(run), start))
            run, start = [], None
        if start is None:
            start = pa
        run.append(pages[pa])
        prev = pa
    if run:
        segs.append(LoadSegment(vaddr(start), b"".join(run), start))
    notes = [NoteEntry("CORE", 1, prstatus(r, i + 1)) for i, r in enumerate(registers)]
    if qemu_notes:
        notes += [NoteEntry("QEMU", 0, bytes(464)) for _ in registers]
    if vmcoreinfo:
        notes.append(NoteEntry("VMCOREINFO", 0, vmcoreinfo.encode()))
    write_core(path, segs, notes)


def _note(name: str, ntype: int, desc: bytes) -> bytes:
    nm = name.encode() + b"\0"
    return (struct.pack("<III", len(nm), len(desc), ntype) + nm + bytes(-len(nm) % 4)
            + desc + bytes(-len(desc) % 4))


def write_diskdump(k: SynthKernel, path: str, vmcoreinfo: str,
                   registers: list[dict[str, int]] = (), drop: set[int] = frozenset(),
                   compress: str = "zlib", flattened: bool = False,
                   utsname: bool = True) -> None:
    """A kdump-compressed dump (header version 6); *drop*: filtered page addresses."""
    pages = _pages(k)
    max_mapnr = max(pages) // PAGE + 1
    bitmap_bytes = (max_mapnr + 7) // 8
    half_blocks = (bitmap_bytes + PAGE - 1) // PAGE
    bm1 = bytearray(half_blocks * PAGE)
    bm2 = bytearray(half_blocks * PAGE)
    for pa in pages:
        pfn = pa // PAGE
        bm1[pfn // 8] |= 1 << (pfn % 8)
        if pa not in drop:
            bm2[pfn // 8] |= 1 << (pfn % 8)
    notes = b"".join(_note("CORE", 1, prstatus(r, i + 1)) for i, r in enumerate(registers))
    vmci = vmcoreinfo.encode()
    if vmci:
        notes += _note("VMCOREINFO", 0, vmci)
    sub = 14 * 8                                     # struct kdump_sub_header (64-bit)
    vmci_off_in = sub
    note_off_in = vmci_off_in + len(vmci)
    sub_blocks = (note_off_in + len(notes) + PAGE - 1) // PAGE
    sub_at = PAGE
    bitmap_at = PAGE * (1 + sub_blocks)
    pd_at = bitmap_at + 2 * half_blocks * PAGE
    kept = sorted(pa for pa in pages if pa not in drop)
    data_at = pd_at + 24 * len(kept)
    descs = bytearray()
    data = bytearray()
    flag = {"zlib": 1, "none": 0}[compress]
    for pa in kept:
        raw = pages[pa]
        body = zlib.compress(raw) if flag else raw
        fl = flag
        if flag and len(body) >= PAGE:
            body, fl = raw, 0
        descs += struct.pack("<QIIQ", data_at + len(data), len(body), fl, 0)
        data += body
    uts = bytearray(6 * 65)
    if utsname:
        for i, v in enumerate(("Linux", "synth", k.spec.osrelease, "#1 SMP", "x86_64", "")):
            uts[i * 65:i * 65 + len(v)] = v.encode()
    else:
        uts[4 * 65:4 * 65 + 6] = b"x86_64"               # what QEMU fills in
    header = bytearray(PAGE)
    struct.pack_into("<8si", header, 0, b"KDUMP   ", 6)
    header[12:12 + len(uts)] = uts
    # struct disk_dump_header_64: _pad1[6] after utsname (12 + 390 = 402 -> 408)
    struct.pack_into("<qq", header, 408, 1_700_000_000, 0)
    struct.pack_into("<IiiIIIIIIi", header, 424, flag, PAGE, sub_blocks, 2 * half_blocks,
                     max_mapnr & 0xFFFFFFFF, len(kept), 0, len(kept), 0, len(registers))
    subhdr = bytearray(sub_blocks * PAGE)
    phys_base = k.spec.phys_base & MASK64
    struct.pack_into("<QiiQQQQQQQQQQQ", subhdr, 0, phys_base, 31, 0, 0, max_mapnr,
                     sub_at + vmci_off_in, len(vmci), sub_at + note_off_in, len(notes),
                     0, 0, 0, max_mapnr, max_mapnr)
    subhdr[vmci_off_in:vmci_off_in + len(vmci)] = vmci
    subhdr[note_off_in:note_off_in + len(notes)] = notes
    records = [(0, bytes(header)), (sub_at, bytes(subhdr)), (bitmap_at, bytes(bm1)),
               (bitmap_at + len(bm1), bytes(bm2)), (pd_at, bytes(descs)),
               (data_at, bytes(data))]
    with open(path, "wb") as f:
        if not flattened:
            for off, blob in records:
                f.seek(off)
                f.write(blob)
            return
        f.write(b"makedumpfile\0\0\0\0" + struct.pack(">qq", 1, 1) + bytes(PAGE - 32))
        for off, blob in records:
            for i in range(0, len(blob), 1 << 16):        # several records, as makedumpfile
                chunk = blob[i:i + (1 << 16)]
                f.write(struct.pack(">qq", off + i, len(chunk)) + chunk)
        f.write(struct.pack(">qq", -1, 0))
