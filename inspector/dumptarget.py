"""A crash dump as a :class:`~inspector.target.Target`, with nothing but the dump.

Memory comes from :mod:`inspector.kdump`.  Symbols, in order:

1. ``--symbols FILE`` bound as for any core; a kallsyms (or System.map-format
   file) saved on the same build during *another boot* is relocated by the KASLR
   difference instead of refused, when that is exact: every image address
   VMCOREINFO exports must be off by one and the same KASLR-aligned delta (KASLR
   moves the whole image, and nothing else: zero-based per-CPU offsets of
   kernels before 6.15 stay put, see ``SymbolTable.shifted``), and the
   relocated ``linux_banner`` must name the dump's release.  The relocation is
   reported as a note.
2. otherwise the kernel's own kallsyms tables, decoded from the dump
   (:mod:`inspector.kallsyms_mem`, Linux 6.0 and later).
"""

from __future__ import annotations

import os

from .errors import InspectError
from .kallsyms_mem import decode_kallsyms
from .kdump import DumpCore, DumpMemory
from .memory import MemorySource
from .symbols import SymbolKind, SymbolTable, load_symbols
from .target import KASLR_ALIGN, Target, _vmcoreinfo_symbols, bind_symbols
from .vmcoreinfo import VmcoreInfo
from .x86 import MASK64, is_image_address, pa_symbol, signed64

__all__ = ["DumpTarget", "open_dump_target", "MIN_RELOCATION_WITNESSES"]

#: Image addresses VMCOREINFO exports that must agree on one KASLR delta before a
#: kallsyms from another boot is relocated (6.1 exports 12, 7.2 11).
MIN_RELOCATION_WITNESSES = 4


class DumpTarget(Target):
    """A target read from a crash dump (never live), with what opening it noted."""

    def __init__(self, core: DumpCore, mem: MemorySource, symbols: SymbolTable,
                 vmcoreinfo: VmcoreInfo, notes: list[str] | None = None) -> None:
        super().__init__(core, mem, symbols, vmcoreinfo, False, {})   # type: ignore[arg-type]
        self.notes: list[str] = list(notes or [])

    @property
    def dump(self) -> DumpCore:
        return self.core            # type: ignore[return-value]


#: makedumpfile -d bits (makedumpfile.h DL_EXCLUDE_*)
DUMP_LEVEL_BITS = ((1, "zero"), (2, "cache"), (4, "cache private"), (8, "user"), (16, "free"))


def _describe(core: DumpCore) -> str:
    what = f"dump: {core.description or core.format}"
    if core.written_by_qemu():
        what += ", written by QEMU's dump-guest-memory"
    if core.dump_level is not None and core.dump_level and not core.written_by_qemu():
        kinds = [n for b, n in DUMP_LEVEL_BITS if core.dump_level & b]
        what += f", makedumpfile dump level {core.dump_level} ({', '.join(kinds)} pages left out)"
    return what


def _no_vmcoreinfo(core: DumpCore) -> InspectError:
    if core.written_by_qemu():
        return InspectError(
            f"{core.path} has no VMCOREINFO: it was written by QEMU's dump-guest-memory "
            "(virsh dump --memory-only), which saves the kernel's VMCOREINFO note only when "
            "the guest runs with -device vmcoreinfo and has loaded the qemu_fw_cfg driver "
            "(the driver tells QEMU where the note is); without it nothing says where the "
            "kernel is (phys_base, KASLR offset, paging mode)",
            "dump again after adding -device vmcoreinfo to QEMU (libvirt: <vmcoreinfo "
            "state='on'/> in <features>) and running modprobe qemu_fw_cfg in the guest")
    return InspectError(
        f"{core.path} has no VMCOREINFO note, so nothing says where the kernel is "
        "(phys_base, KASLR offset, paging mode): the kernel was built without "
        "CONFIG_VMCORE_INFO/CRASH_CORE, or the tool that wrote the dump dropped it",
        "capture the dump with kdump (makedumpfile keeps VMCOREINFO)")


def _image_reader(core: DumpCore, mem: MemorySource, info: VmcoreInfo):
    """read(vaddr, size) for kernel-image addresses: ``__pa_symbol()``."""
    phys_base = info.phys_base
    if phys_base is None:
        raise InspectError(f"{core.path}: VMCOREINFO lacks NUMBER(phys_base)",
                           "this dump is not from an x86-64 kernel with kexec support")

    def read(vaddr: int, size: int) -> bytes:
        if not is_image_address(vaddr):
            raise InspectError(f"{core.path}: kallsyms table at {vaddr:#x} is outside the "
                               "kernel image", "pass the kernel's symbols as {symbols}",
                               role="symbols", address=vaddr)
        return mem.read_phys(pa_symbol(vaddr, phys_base), size)
    return read


def _relocate_other_boot(syms: SymbolTable, core: DumpCore,
                         mem: MemorySource) -> tuple[SymbolTable, str] | None:
    """*syms* moved by the one KASLR delta every exported symbol agrees on, or
    None when that is not exact."""
    if syms.kind not in (SymbolKind.KALLSYMS, SymbolKind.SYSTEM_MAP):
        return None
    exported = _vmcoreinfo_symbols(core.vmcoreinfo)
    witnesses = [n for n in exported if n in syms and is_image_address(syms[n])]
    deltas = {(exported[n] - syms[n]) & MASK64 for n in witnesses}
    if len(witnesses) < MIN_RELOCATION_WITNESSES or len(deltas) != 1:
        return None
    delta = deltas.pop()
    if not delta or delta % KASLR_ALIGN:
        return None
    moved = bind_symbols(syms.shifted(delta), core, mem)      # banner check included
    signed = signed64(delta)
    return moved, (f"symbols: {syms.source} is this build's symbol table from another "
                   f"boot; relocated by the KASLR difference {signed:+#x} (all "
                   f"{len(witnesses)} image symbols VMCOREINFO exports agree, linux_banner "
                   f"checked)")


def open_dump_target(path: str, symbols_path: str | None = None, wrap=None) -> DumpTarget:
    """Open a crash dump (kdump-compressed, flattened or ELF vmcore)."""
    core = DumpCore(path)
    try:
        if not core.vmcoreinfo:
            raise _no_vmcoreinfo(core)
        base = DumpMemory(core)
        mem: MemorySource = wrap(base) if wrap is not None else base
        notes: list[str] = [_describe(core)]
        if core.reassembled:
            notes.append("dump: flattened (makedumpfile -F / QEMU before 8.2) stream put "
                         "back in place in a temporary file (this libkdumpfile predates "
                         "native support)")
        if symbols_path is not None:
            syms = load_symbols(symbols_path)
            try:
                syms = bind_symbols(syms, core, base)
            except InspectError:
                moved = _relocate_other_boot(syms, core, base)
                if moved is None:
                    raise
                syms, note = moved
                notes.append(note)
        else:
            decoded = decode_kallsyms(core.vmcoreinfo, _image_reader(core, base,
                                                                    core.vmcoreinfo), path)
            syms = bind_symbols(decoded, core, base)
            notes.append(f"symbols: {getattr(decoded, 'kallsyms_count', len(decoded.addresses))}"
                         f" decoded from the kernel's kallsyms tables in the dump "
                         f"({getattr(decoded, 'kallsyms_form', '?')} addresses)")
        return DumpTarget(core, mem, syms, core.vmcoreinfo, notes)
    except BaseException:
        core.close()
        raise


def is_dump(path: str) -> bool:
    """True for a kdump-compressed or flattened dump, and for an ELF vmcore
    (:func:`~inspector.kdump.is_vmcore`); False for /proc/kcore-shaped cores and
    snapshots, and for anything else (left to the ELF reader's own errors)."""
    from .elfcore import NO_PADDR, ElfCore
    from .kdump import is_vmcore, sniff
    from .target import SNAPSHOT_NOTE
    kind = sniff(path)
    if kind in ("diskdump", "flattened"):
        return True
    if kind != "elf":
        return False
    try:
        with ElfCore(path) as core:
            return is_vmcore(core, SNAPSHOT_NOTE)
    except InspectError as strict:
        # A header the strict reader refuses may still be a vmcore whose writer got
        # an informational field wrong (QEMU 7.2: e_ehsize 8): an ELF core whose
        # PT_LOADs are all physical, without a snapshot note, goes to libkdumpfile.
        from .fileio import open_regular
        from .kdump import raw_elf_layout
        try:
            with open_regular(path, "core", "check the path given as {core}") as f:
                e_type, loads, notes = raw_elf_layout(f.fileno(), os.fstat(f.fileno()).st_size)
        except (InspectError, OSError, ValueError):
            raise strict from None
        if e_type == 4 and loads and all(pa != NO_PADDR for _t, pa, _n in loads) and \
                not any(n.name == SNAPSHOT_NOTE for n in notes):
            return True
        raise strict from None
