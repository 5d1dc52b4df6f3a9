"""Kernel symbols: /proc/kallsyms, System.map, or a vmlinux ELF.

kallsyms and System.map share one text format (``ADDRESS TYPE NAME
[MODULE]``); a vmlinux is read with pyelftools (its ``.symtab``).  Files from a
build (System.map, vmlinux) hold link-time addresses; a running KASLR kernel
moves its image by ``KERNELOFFSET`` (VMCOREINFO).  Only addresses in the
kernel image (at or above ``__START_KERNEL_map``) move: the zero-based per-CPU
symbols of kernels before 6.15 (type ``A``, e.g. ``espfix_stack`` at 0x19008)
are offsets into each CPU's area and never move.  From 6.15 per-CPU symbols
are ordinary image addresses (``include/asm-generic/percpu.h``,
``arch/x86/kernel/vmlinux.lds.S``) and move like the rest.

Matching a symbol file to a core is done one level up (:mod:`inspector.target`);
this module only reads files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator

from .errors import InspectError
from .fileio import MiB, open_regular, read_bounded
from .records import dataclass, field
from .vocab import StrEnum
from .x86 import MASK64, START_KERNEL_MAP

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

__all__ = ["SymbolKind", "SymbolTable", "load_symbols", "parse_symbol_text",
           "scan_symbol_text", "read_own_lines"]

#: A kallsyms or System.map text is a few MiB (about 120,000 lines on Debian 6.1 with
#: modules); a vmlinux with DWARF is under 1 GiB, and its .symtab a few MiB.
MAX_SYMBOL_TEXT = 256 * MiB
MAX_VMLINUX_SYMBOLS = 4_000_000
_ADDR = re.compile(r"[0-9a-fA-F]{1,16}\Z")


class SymbolKind(StrEnum):
    """Where a :class:`SymbolTable` came from, which decides how its addresses move
    with KASLR (:mod:`inspector.target`)."""

    KALLSYMS = "kallsyms"        # /proc/kallsyms: run-time addresses
    SYSTEM_MAP = "system.map"    # a build's System.map: link-time addresses
    VMLINUX = "vmlinux"          # a build's vmlinux .symtab: link-time addresses
    SNAPSHOT = "snapshot"        # kallsyms lines embedded in a snapshot core


@dataclass
class SymbolTable:
    """Name -> address for the kernel image (module symbols are dropped)."""

    source: str
    kind: SymbolKind
    addresses: dict[str, int]
    types: dict[str, str] = field(default_factory=dict)
    banner: bytes | None = None     # linux_banner bytes, from a vmlinux
    shift: int = 0                  # KASLR shift applied (0 for live kallsyms)
    used: set[str] = field(default_factory=set)     # names looked up (for snapshots)
    #: For a table resolved from a few names (:func:`scan_symbol_text`): finds any
    #: other name on demand, so that the table answers as a full one would.
    resolve: Callable[[str], tuple[int, str] | None] | None = None
    late: list[str] = field(default_factory=list)   # names resolve() had to search for
    _tried: set[str] = field(default_factory=set, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.addresses or self._resolve(name)

    def get(self, name: str) -> int | None:
        self.used.add(name)
        if name not in self.addresses:
            self._resolve(name)
        return self.addresses.get(name)

    def __getitem__(self, name: str) -> int:
        self.used.add(name)
        if name not in self.addresses:
            self._resolve(name)
        try:
            return self.addresses[name]
        except KeyError:
            raise InspectError(f"symbol {name} is not in {self.source}",
                               "use the symbol file of the inspected kernel "
                               "(a vmlinux with debug symbols has every static)") from None

    def _resolve(self, name: str) -> bool:
        if self.resolve is None or name in self._tried:
            return False
        self._tried.add(name)
        found = self.resolve(name)
        if found is not None:
            self.addresses[name], self.types[name] = found
        return found is not None

    def shifted(self, offset: int) -> SymbolTable:
        """The table as seen in a kernel whose image moved by *offset* bytes."""
        if not offset:
            return self
        moved = {n: ((a + offset) & MASK64 if a >= START_KERNEL_MAP else a)
                 for n, a in self.addresses.items()}
        return SymbolTable(self.source, self.kind, moved, self.types, self.banner,
                           (self.shift + offset) & MASK64, self.used)

    def is_percpu_zero_based(self) -> bool:
        """True for the pre-6.15 convention: per-CPU symbols are small offsets."""
        start = self.addresses.get("__per_cpu_start")
        if start is not None:
            return start < START_KERNEL_MAP
        stack = self.addresses.get("espfix_stack")
        return stack is not None and stack < START_KERNEL_MAP


#: Debian's linux-image packages ship /boot/System.map-KVER as this one line (seen in
#: 6.1.0-56-amd64): "ffffffffffffffff B The real System.map is in the
#: linux-image-<version>-dbg package".
DEBIAN_PLACEHOLDER = "The real System.map is in the linux-image"


def parse_symbol_text(text: str, source: str, kind: SymbolKind) -> SymbolTable:
    """Parse kallsyms/System.map text.  Raises InspectError on unusable input."""
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    parsed = 0
    nonzero = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        if not _ADDR.match(parts[0]):
            continue
        addr = int(parts[0], 16)
        if len(parts[1]) != 1:
            continue
        parsed += 1
        if len(parts) > 3 and parts[3].startswith("["):
            continue                          # a module's symbol
        if addr:
            nonzero += 1
        name = parts[2]
        if name not in addresses:
            addresses[name] = addr
            types[name] = parts[1]
    if DEBIAN_PLACEHOLDER in text[:4096]:
        raise InspectError(f"{source} is Debian's placeholder System.map (one line: "
                           f"\"{DEBIAN_PLACEHOLDER} ...\"), not a symbol table",
                           "use /proc/kallsyms, or the vmlinux from the kernel's "
                           "linux-image-<version>-dbg package (/usr/lib/debug/boot/)")
    if not parsed:
        raise InspectError(f"{source} holds no symbols",
                           "pass /proc/kallsyms, the kernel's System.map or its vmlinux")
    if not nonzero:
        if source == "/proc/kallsyms":
            raise InspectError("/proc/kallsyms shows every address as 0: kptr_restrict hides "
                               "kernel addresses (or the reader lacks CAP_SYSLOG)",
                               "run as root with kernel.kptr_restrict=0 or 1, or pass "
                               "this kernel's System.map or vmlinux as {symbols}",
                               path=source, role="symbols")
        raise InspectError(f"{source} shows every address as 0 (saved from a kallsyms "
                           "hidden by kptr_restrict)",
                           "save it again as root with kernel.kptr_restrict <= 1")
    if "_text" not in addresses and "_stext" not in addresses:
        raise InspectError(f"{source} has no _text or _stext: not a kernel symbol file",
                           "pass /proc/kallsyms, the kernel's System.map or its vmlinux")
    return SymbolTable(source, kind, addresses, types)


def _alternation(names: list[bytes]) -> bytes:
    """A regular-expression alternation of *names* as a prefix tree
    (``(?:_(?:_per_cpu_offset|text)|e(?:spfix_...))``): ``re`` tries the branches of an
    alternation one after another, and shared prefixes let a line that names none of
    them fail after a few byte comparisons instead of one per name."""
    if len(names) == 1:
        return re.escape(names[0])
    groups: dict[bytes, list[bytes]] = {}
    for n in names:
        if n:
            groups.setdefault(n[:1], []).append(n[1:])
    body = b"(?:" + b"|".join(re.escape(k) + _alternation(v)
                              for k, v in sorted(groups.items())) + b")"
    return body + b"?" if b"" in names else body


def _kallsyms_lines(text: bytes, names: Iterable[str]) -> Iterator[tuple[str, int, str]]:
    """``(name, address, type)`` of the lines of *text* that define one of *names*, in
    order, in the kernel's format: ``kernel/kallsyms.c`` ``s_show()`` prints
    ``"%px %c %s\\n"`` for a vmlinux symbol and adds ``"\\t[module]"`` for a module's,
    which the ``\\n`` right after the name leaves out."""
    pattern = re.compile(rb" (\S) (" + _alternation(sorted(n.encode("latin-1") for n in set(names)))
                         + rb")\n")
    if not text.endswith(b"\n"):
        text += b"\n"
    for m in pattern.finditer(text):
        start = text.rfind(b"\n", 0, m.start()) + 1
        try:
            addr = int(text[start:m.start()], 16)
        except ValueError:
            continue                        # not "ADDRESS TYPE NAME"
        yield m.group(2).decode("latin-1"), addr, m.group(1).decode("latin-1")


def scan_symbol_text(data: bytes, source: str, kind: SymbolKind, names: Iterable[str],
                     reread: Callable[[], bytes] | None = None) -> SymbolTable:
    """Resolve only *names* (plus ``_text``/``_stext``) in kallsyms text, in one
    regular-expression pass over the bytes.

    A live /proc/kallsyms has 100,000-210,000 lines and the inspector needs a few
    dozen of them: building the table of every line (:func:`parse_symbol_text`) was the
    largest cost of a live ``validate``, 2-4.5 s of 5-7 s in the QEMU/TCG guests
    (docs/performance.md).  The result is what :func:`parse_symbol_text` gives for those names
    (the first non-module line of each), for text in the kernel's own format.  Whenever
    that function would refuse the text (Debian's placeholder, no symbols, every
    address 0, no ``_text``), it is called instead, so the error is the same.  Any other
    name asked of the table later is found by one more pass over ``reread()`` (the
    table's ``late`` list names them; tests keep it empty for the inspector's own runs).
    """
    want = set(names) | {"_text", "_stext"}
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    if DEBIAN_PLACEHOLDER.encode() not in data[:4096]:
        for name, addr, typ in _kallsyms_lines(data, want):
            if name not in addresses:
                addresses[name] = addr
                types[name] = typ
    if not any(addresses.values()) or ("_text" not in addresses and "_stext" not in addresses):
        return parse_symbol_text(data.decode("latin-1"), source, kind)

    table = SymbolTable(source, kind, addresses, types)

    def resolve(name: str) -> tuple[int, str] | None:
        if reread is None or name in want:
            return None                     # scanned for already: not in the text
        table.late.append(name)
        for _name, addr, typ in _kallsyms_lines(reread(), [name]):
            return addr, typ
        return None

    table.resolve = resolve
    return table


def _load_vmlinux(path: str, fh) -> SymbolTable:
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    from .elfcore import check_elf_header
    try:
        size = os.fstat(fh.fileno()).st_size
    except OSError:
        size = None
    e_type, _ = check_elf_header(fh.read(64), path, size, "a vmlinux")
    fh.seek(0)
    if e_type not in (2, 3):
        raise InspectError(f"{path} is an ELF file of type {e_type}, not a vmlinux "
                           "(ET_EXEC)", "pass the inspected kernel's vmlinux, System.map "
                           "or /proc/kallsyms")
    try:
        elf = ELFFile(fh)
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise InspectError(f"{path} has no symbol table (stripped)",
                               "use the unstripped vmlinux (Debian: linux-image-*-dbg) "
                               "or the System.map")
        if symtab.num_symbols() > MAX_VMLINUX_SYMBOLS:
            raise InspectError(f"{path}: .symtab claims {symtab.num_symbols()} symbols",
                               "pass an uncorrupted vmlinux of the inspected kernel")
        addresses: dict[str, int] = {}
        types: dict[str, str] = {}
        for sym in symtab.iter_symbols():
            name = sym.name
            if not name or sym["st_info"]["type"] in ("STT_FILE", "STT_SECTION"):
                continue
            if name not in addresses:
                addresses[name] = sym["st_value"]
                types[name] = "A" if sym["st_shndx"] == "SHN_ABS" else "D"
        banner = _vmlinux_banner(elf, addresses.get("linux_banner"))
    except InspectError:
        raise
    except Exception as e:      # pyelftools' own errors for any malformed field
        raise InspectError(f"{path}: unreadable vmlinux ({type(e).__name__}: {e})",
                           "pass an uncorrupted vmlinux of the inspected kernel") from None
    if "_text" not in addresses and "_stext" not in addresses:
        raise InspectError(f"{path} has no _text or _stext: not a Linux vmlinux",
                           "pass the vmlinux of the inspected kernel")
    return SymbolTable(path, SymbolKind.VMLINUX, addresses, types, banner)


def _vmlinux_banner(elf: ELFFile, addr: int | None) -> bytes | None:
    """The NUL-terminated ``linux_banner`` string as stored in the vmlinux."""
    if addr is None:
        return None
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= addr < start + seg["p_filesz"]:
            stream = elf.stream
            stream.seek(seg["p_offset"] + addr - start)
            return stream.read(512).split(b"\0", 1)[0]
    return None


def load_symbols(path: str, names: Iterable[str] | None = None) -> SymbolTable:
    """Load a kallsyms/System.map text file or a vmlinux ELF.  With *names*, a text
    file is only scanned for those (:func:`scan_symbol_text`): for the kernel's own
    /proc/kallsyms."""
    fix = "pass /proc/kallsyms, the kernel's System.map or its vmlinux"
    try:
        fh = open_regular(path, "symbol file", fix)
    except PermissionError:
        raise InspectError(f"permission denied reading {path}",
                           "run as root, or make the symbol file readable") from None
    with fh:
        head = fh.read(4)
        fh.seek(0)
        if head == b"\x7fELF":
            return _load_vmlinux(path, fh)
        try:
            data = read_bounded(fh, path, "symbol file", MAX_SYMBOL_TEXT) if names is None \
                else read_own_lines(fh, path)
        except OSError as e:
            raise InspectError(f"cannot read {path}: {e.strerror}", fix) from None
    if b"\0" in data[:4096]:
        raise InspectError(f"{path} is neither a vmlinux nor kallsyms/System.map text", fix)
    kind = SymbolKind.KALLSYMS if os.path.basename(path) == "kallsyms" else SymbolKind.SYSTEM_MAP
    if names is not None:
        return scan_symbol_text(data, path, kind, names, lambda: _reread(path))
    return parse_symbol_text(data.decode("latin-1"), path, kind)


def read_own_lines(fh, path: str, chunk: int = 1 << 20) -> bytes:
    """A kallsyms text up to (and with) the chunk holding its first module line, at
    most MAX_SYMBOL_TEXT bytes.

    ``kernel/kallsyms.c`` lists vmlinux's own symbols first and then, each with
    ``"\\t[module]"``, those of modules, BPF and ftrace (``update_iter()``), which the
    inspector never uses: 5-8% of a live /proc/kallsyms in the Debian guests."""
    return read_bounded(fh, path, "symbol file", MAX_SYMBOL_TEXT, chunk=chunk, stop=b"\t[")


def _reread(path: str) -> bytes:
    try:
        with open_regular(path, "symbol file", "") as f:
            return read_bounded(f, path, "symbol file", MAX_SYMBOL_TEXT)
    except (OSError, InspectError):
        return b""
