"""A target: one kernel's memory (an ELF core) bound to its symbols, verified.

Live and offline are the same code: ``/proc/kcore`` + ``/proc/kallsyms`` is one
target, a vmcore + System.map/vmlinux another, a snapshot (which carries its
own symbols in a note) a third.

The symbol file is matched to the core through VMCOREINFO
(``kernel/vmcore_info.c``, ``arch/x86/kernel/machine_kexec_64.c``): every
``SYMBOL(name)`` it exports must agree with the file once the file is
shifted by ``KERNELOFFSET`` (System.map, vmlinux) or not at all (a live or
saved kallsyms), and ``linux_banner`` in memory must name the core's
``OSRELEASE`` (for a vmlinux: be its banner byte for byte).  Anything else is
a symbol file from another build and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

from .elfcore import ElfCore, is_vmcore
from .errors import InspectError
from .fileio import open_regular
from .memory import CoreMemory, MemorySource
from .records import dataclass, field
from .symbols import SymbolKind, SymbolTable, load_symbols, parse_symbol_text
from .vmcoreinfo import VmcoreInfo
from .x86 import MASK64, is_image_address, pa_symbol, signed64

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from .kdump import DumpCore

__all__ = ["Target", "open_target", "SNAPSHOT_NOTE", "NT_SYMBOLS", "NT_META",
           "KCORE_PATH", "KALLSYMS_PATH", "LIVE_SYMBOLS", "live_symbol_names", "is_live"]

KCORE_PATH = "/proc/kcore"
KALLSYMS_PATH = "/proc/kallsyms"


def is_live(core_path: str) -> bool:
    """Whether *core_path* is the running kernel's own memory: the one place this is
    decided (:attr:`Target.live` holds the answer for an open target)."""
    return core_path == KCORE_PATH

#: Name of the notes an espfix-inspect snapshot adds to its core.
SNAPSHOT_NOTE = "ESPFIX-INSPECT"
NT_SYMBOLS = 1     # kallsyms-format text of the symbols the inspector used
NT_META = 2        # JSON: capture time, host facts (sysfs), tool version


@dataclass
class Target:
    core: ElfCore
    mem: MemorySource
    symbols: SymbolTable
    vmcoreinfo: VmcoreInfo
    live: bool
    meta: dict = field(default_factory=dict)      # snapshot metadata, {} otherwise

    @property
    def osrelease(self) -> str:
        return self.vmcoreinfo.osrelease or "unknown"

    @property
    def kaslr_offset(self) -> int:
        return self.vmcoreinfo.kernel_offset or 0

    @property
    def phys_base(self) -> int:
        """``phys_base`` as a signed delta (it is "negative" under some KASLR)."""
        v = self.vmcoreinfo.phys_base
        if v is None:
            raise InspectError(f"{self.core.path}: VMCOREINFO lacks NUMBER(phys_base)",
                               "this core is not from an x86-64 kernel with kexec support")
        return v

    @property
    def sme_mask(self) -> int:
        return self.vmcoreinfo.sme_mask or 0

    def pa_symbol(self, vaddr: int) -> int:
        """``__pa_symbol()``: physical address of a kernel-image address."""
        return pa_symbol(vaddr, self.phys_base)

    def fresh_memory(self) -> None:
        """Start a new page cache on the open core, so that nothing read before is
        served again (a live kernel's tables and ministacks change); the symbols,
        the costly part of opening a live target, are kept."""
        self.mem = CoreMemory(self.core)

    def close(self) -> None:
        self.core.close()


def _embedded_symbols(core: ElfCore) -> SymbolTable | None:
    for note in core.notes:
        if note.name == SNAPSHOT_NOTE and note.type == NT_SYMBOLS:
            table = parse_symbol_text(note.desc.decode("latin-1"),
                                      f"{core.path} (embedded symbols)", SymbolKind.SNAPSHOT)
            return table
    return None


#: The metadata note is a small JSON object (capture time, tool, host facts).
MAX_META = 16 << 20


def _meta(core: ElfCore) -> dict:
    """The snapshot's metadata note, checked: a JSON object whose ``host`` is an object
    (HostFacts.from_dict checks its fields when a state is loaded)."""
    for note in core.notes:
        if note.name == SNAPSHOT_NOTE and note.type == NT_META:
            try:
                if len(note.desc) > MAX_META:
                    raise ValueError("too large")
                import json     # snapshots only: a live run imports no json decoder
                meta = json.loads(note.desc.rstrip(b"\0").decode("utf-8"))
            except (ValueError, RecursionError):
                meta = None
            if not isinstance(meta, dict) or not isinstance(meta.get("host", {}), dict):
                raise InspectError(f"{core.path}: damaged snapshot metadata note",
                                   "capture the snapshot again")
            return meta
    return {}


#: VMCOREINFO ``SYMBOL()`` keys that carry a pointer's value, not the
#: symbol's address (``VMCOREINFO_SYMBOL_ARRAY(mem_section)`` with
#: SPARSEMEM_EXTREME: seen as 0xff16e4633f81f000 on Debian 6.1).
POINTER_VALUED = frozenset({"mem_section", "vmemmap", "mem_map"})


#: KASLR moves the image in CONFIG_PHYSICAL_ALIGN steps (0x200000 on x86-64 Debian).
KASLR_ALIGN = 0x200000


def _vmcoreinfo_symbols(info: VmcoreInfo) -> dict[str, int]:
    """The image addresses VMCOREINFO exports, for matching a symbol file."""
    return {name: addr for name, addr in info.symbols.items()
            if name not in POINTER_VALUED and is_image_address(addr)}


def bind_symbols(syms: SymbolTable, core: ElfCore | DumpCore, mem: MemorySource) -> SymbolTable:
    """Shift *syms* to the running image and prove it belongs to *core*."""
    info = core.vmcoreinfo
    release = info.osrelease or "?"
    exported = _vmcoreinfo_symbols(info)
    offset = info.kernel_offset or 0
    shifts = [0] if syms.kind in (SymbolKind.KALLSYMS, SymbolKind.SNAPSHOT) else [offset, 0]
    fix = (f"use /proc/kallsyms of the running kernel, or the System.map/vmlinux "
           f"built with the inspected kernel ({release})")
    chosen: SymbolTable | None = None
    mismatch = ""
    # Every compared symbol off by one KASLR-aligned delta: the same build, another boot.
    deltas = {(syms[n] - exported[n]) & MASK64 for n in exported if n in syms}
    if len(deltas) == 1 and (delta := deltas.pop()) and delta % KASLR_ALIGN == 0 \
            and syms.kind != SymbolKind.VMLINUX:
        signed = signed64(delta)
        boot_hint = (f"every symbol VMCOREINFO exports is off by {signed:+#x}, a KASLR "
                     f"slide: it is this build's kallsyms saved during another boot")
    else:
        boot_hint = ""
    for shift in dict.fromkeys(shifts):
        cand = syms.shifted(shift)
        bad = [n for n in exported if n in cand and cand[n] != exported[n]]
        if not bad:        # all agree (or none to compare: the banner decides)
            chosen = cand
            break
        if not mismatch:
            n = bad[0]
            mismatch = f"{n} is {cand[n]:#x} there but {exported[n]:#x} in the core"
    if chosen is None:
        if boot_hint:
            raise InspectError(f"{syms.source} does not fit this boot: {boot_hint}",
                               "use /proc/kallsyms of the running kernel, or this "
                               f"kernel's System.map/vmlinux ({release})")
        raise InspectError(f"{syms.source} is from another kernel build: {mismatch}", fix)
    banner_addr = chosen.get("linux_banner")
    if banner_addr is not None:
        data = mem.read_virt(banner_addr, 256)
        if data is None:
            data = _read_image(core, banner_addr, chosen, info)
        text = (data or b"").split(b"\0", 1)[0]
        expect = b"Linux version " + release.encode()
        if not text.startswith(expect + b" "):
            shown = text[:60].decode("latin-1", "replace") or "nothing readable"
            raise InspectError(f"{syms.source} is from another kernel build: its linux_banner "
                               f"address shows {shown!r}, not Linux version {release}", fix)
        if chosen.banner is not None and chosen.banner != text:
            raise InspectError(f"{syms.source} is from another build of {release}: "
                               "its linux_banner differs from the running kernel's", fix)
    return chosen


def _read_image(core: ElfCore | DumpCore, vaddr: int, syms: SymbolTable, info: VmcoreInfo) -> bytes | None:
    """Read a kernel-image address through its physical alias (vmcores
    without a kernel-text segment)."""
    if not is_image_address(vaddr) or info.phys_base is None:
        return None
    return core.read_paddr(pa_symbol(vaddr, info.phys_base), 256)


#: The symbols the inspector reads (state.py, snapshot.py ALWAYS, the CONFIG_KALLSYMS_ALL
#: and espfix checks of state._need): a live /proc/kallsyms is scanned for these
#: and for VMCOREINFO's SYMBOL() names only.  tests/test_perf.py fails when the tool
#: asks a live table for a name not listed here.
LIVE_SYMBOLS = (
    "_text", "_stext", "linux_banner", "init_top_pgt", "nr_cpu_ids", "__cpu_possible_mask",
    "__cpu_online_mask", "__per_cpu_offset", "__per_cpu_start", "espfix_stack",
    "espfix_waddr", "espfix_pages", "espfix_pud_page", "init_espfix_ap", "page_offset_base",
    "__supported_pte_mask", "__pgtable_l5_enabled", "page_random", "slot_random",
)


def live_symbol_names(info: Mapping[str, str]) -> list[str]:
    """:data:`LIVE_SYMBOLS` and every name VMCOREINFO exports as ``SYMBOL(name)``
    (:func:`bind_symbols` compares them all, and snapshots embed them)."""
    exported = [k[7:-1] for k in info if k.startswith("SYMBOL(") and k.endswith(")")]
    return list(dict.fromkeys((*LIVE_SYMBOLS, *exported)))


def _has_elf_magic(path: str) -> bool:
    """True when *path* starts with the ELF magic; False for anything else, including
    what cannot be read (the readers then say why)."""
    try:
        with open_regular(path, "core", "check the path given as {core}") as f:
            return f.read(4) == b"\x7fELF"
    except (InspectError, OSError):
        return False


def open_target(core_path: str = KCORE_PATH, symbols_path: str | None = None,
                wrap=None) -> Target:
    """Open a core and its symbols.  *wrap* may wrap the memory source
    (e.g. :class:`~inspector.memory.RecordingMemory` for snapshots).  Crash dumps
    (kdump-compressed, ELF vmcores) go to :mod:`inspector.dumptarget`."""
    live = is_live(core_path)
    # Crash dumps go to libkdumpfile; an ELF core that is /proc/kcore-shaped or a
    # snapshot stays here without importing the dump modules (docs/performance.md).
    if not live and not _has_elf_magic(core_path):
        from .dumptarget import is_dump, open_dump_target
        if is_dump(core_path):
            return open_dump_target(core_path, symbols_path, wrap)
    try:
        core = ElfCore(core_path)
    except InspectError:
        if live:
            raise
        from .dumptarget import is_dump, open_dump_target
        if is_dump(core_path):          # e.g. QEMU 7.2's ELF dumps (e_ehsize 8)
            return open_dump_target(core_path, symbols_path, wrap)
        raise
    if not live and is_vmcore(core, SNAPSHOT_NOTE):
        core.close()
        from .dumptarget import open_dump_target
        return open_dump_target(core_path, symbols_path, wrap)
    try:
        if not core.vmcoreinfo:
            raise InspectError(f"{core_path} has no VMCOREINFO note (kernel before 4.19, "
                               "or CONFIG_VMCORE_INFO/CRASH_CORE off)",
                               "inspect a kernel that exports VMCOREINFO, or a snapshot")
        mem: MemorySource = CoreMemory(core)
        if wrap is not None:
            mem = wrap(mem)
        if symbols_path is not None:
            syms = load_symbols(symbols_path)
        else:
            embedded = _embedded_symbols(core)
            if embedded is not None:
                syms = embedded
            elif live:
                syms = load_symbols(KALLSYMS_PATH, live_symbol_names(core.vmcoreinfo))
            else:
                raise InspectError(f"{core_path} carries no symbols",
                                   "pass the kernel's System.map or vmlinux as {symbols}",
                                   path=core_path, role="symbols")
        syms = bind_symbols(syms, core, mem)
        return Target(core, mem, syms, core.vmcoreinfo, live, _meta(core))
    except BaseException:
        core.close()
        raise
