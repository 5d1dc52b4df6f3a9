"""ELF core files: /proc/kcore, kdump vmcores and espfix-inspect snapshots.

The program headers of the usual core (ELF64, little-endian, x86-64, ``ET_CORE``)
are two ``struct`` reads here: the ELF header, then the whole program-header table.
Anything else (another class, type or machine, a short or odd header, ``PN_XNUM``)
goes to pyelftools, which names what is wrong.  Why not pyelftools every time:
importing ``elftools.elf.elffile`` (it pulls in the DWARF readers and the construct
library) took 0.83 s of a 6.9 s live ``validate`` under cProfile in a QEMU/TCG
guest, far more than parsing the few headers of /proc/kcore (docs/performance.md); the
fields read are those of ``Elf64_Ehdr``/``Elf64_Phdr`` in ``include/uapi/linux/elf.h``.
The notes are read from their raw bytes here, because pyelftools mis-decodes some core
note types and the VMCOREINFO note is plain ``KEY=VALUE`` text.  Nothing else of a
multi-terabyte /proc/kcore is touched: data is read with positioned reads
(``os.pread``), never by loading a segment.

Segment facts from ``fs/proc/kcore.c``: RAM ranges appear at their direct-map
address with ``p_paddr`` = physical address (since 4.11), the kernel image
(``KCORE_TEXT``, ``_text``..``_end``) with ``p_paddr = __pa_symbol()``, and
vmalloc/vmemmap/module ranges with ``p_paddr = -1``.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import struct
from collections.abc import Sequence

from .errors import InspectError
from .fileio import MiB, open_regular
from .records import dataclass
from .vmcoreinfo import VmcoreInfo
from .x86 import MASK64

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import BinaryIO

__all__ = ["Segment", "Note", "ElfCore", "parse_notes", "parse_vmcoreinfo",
           "check_elf_header", "NO_PADDR", "x86_64_core_headers", "is_vmcore"]

#: ``p_paddr`` of a segment with no physical address: -1 (fs/proc/kcore.c, since 4.11).
NO_PADDR = MASK64
PT_LOAD = "PT_LOAD"
PT_NOTE = "PT_NOTE"
#: Bounds no real core comes near: /proc/kcore has a few hundred program headers
#: (one per RAM range, fs/proc/kcore.c), a kdump ELF vmcore one per memory range plus
#: one note per CPU (8192 CPUs x ~0.5 KiB of NT_PRSTATUS/VMCOREINFO).
MAX_PHNUM = 0xFFFE          # 0xffff is PN_XNUM (extended numbering), not produced for cores
MAX_NOTES_SIZE = 64 * MiB
#: ``Elf64_Ehdr`` and ``Elf64_Phdr``, little-endian (include/uapi/linux/elf.h).
EHDR = ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
PHDR_SIZE = ELF64_PHDR.size
ET_CORE, EM_X86_64, PN_XNUM = 4, 62, 0xFFFF
P_TYPES = {1: PT_LOAD, 4: PT_NOTE}


@dataclass(frozen=True)
class Segment:
    vaddr: int
    paddr: int          # NO_PADDR for virtual-only segments
    offset: int
    filesz: int
    memsz: int

    @property
    def has_paddr(self) -> bool:
        return self.paddr != NO_PADDR


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


def _align4(n: int) -> int:
    return (n + 3) & ~3


def parse_notes(data: bytes) -> list[Note]:
    """Split a PT_NOTE segment into notes (Elf64_Nhdr: namesz, descsz, type;
    name and desc each padded to 4 bytes, as the kernel writes them)."""
    notes = []
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name_end = off + namesz
        desc_off = off + _align4(namesz)
        desc_end = desc_off + descsz
        if desc_end > len(data):
            break
        name = data[off:name_end].rstrip(b"\0").decode("latin-1")
        notes.append(Note(name, ntype, bytes(data[desc_off:desc_end])))
        off = desc_off + _align4(descsz)
        if namesz == 0 and descsz == 0 and ntype == 0:
            break
    return notes


def parse_vmcoreinfo(desc: bytes, source: str = "VMCOREINFO") -> VmcoreInfo:
    """``KEY=VALUE`` lines of the VMCOREINFO note (kernel/vmcore_info.c), checked."""
    return VmcoreInfo.parse(desc, source)


def check_elf_header(head: bytes, path: str, size: int | None, what: str) -> tuple[int, int]:
    """Check an x86-64 ELF header from its raw bytes before any parser trusts it;
    returns ``(e_type, e_phnum)``.  *size* is the file size when it is meaningful
    (regular files; /proc/kcore reports its logical size).  Raises InspectError."""
    fix = f"the file is damaged or is not {what}; copy or capture it again"
    if len(head) < EHDR.size:
        raise InspectError(f"{path} is truncated: {len(head)} bytes, shorter than an ELF header",
                           fix)
    (ident, e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags, e_ehsize,
     e_phentsize, e_phnum, e_shentsize, e_shnum, _shstrndx) = EHDR.unpack_from(head)
    if ident[4] != 2 or ident[5] != 1 or e_machine != 62:
        raise InspectError(f"{path} is not an x86-64 ELF file (class {ident[4]}, data "
                           f"{ident[5]}, machine {e_machine})",
                           "espfix64 exists only on x86-64 kernels")
    if e_ehsize != EHDR.size:
        raise InspectError(f"{path}: ELF header size is {e_ehsize}, not {EHDR.size}", fix)
    for name, off, count, entsize, want in (("program", e_phoff, e_phnum, e_phentsize,
                                             PHDR_SIZE),
                                            ("section", e_shoff, e_shnum, e_shentsize, 64)):
        if count == 0:
            continue
        if entsize != want:
            raise InspectError(f"{path}: ELF {name} header entries are {entsize} bytes, "
                               f"not {want}", fix)
        if count > MAX_PHNUM:
            raise InspectError(f"{path}: {count} ELF {name} headers (extended numbering "
                               "is not used by Linux cores)", fix)
        end = off + count * entsize
        if off < EHDR.size or end > (size if size else MASK64):
            raise InspectError(f"{path}: ELF {name} headers at offset {off:#x} lie outside "
                               f"the file" + (f" ({size:#x} bytes)" if size else ""), fix)
    return e_type, e_phnum


class ElfCore:
    """An ELF core file opened for positioned reads.

    >>> core = ElfCore("/proc/kcore")           # doctest: +SKIP
    >>> core.vmcoreinfo["OSRELEASE"]            # doctest: +SKIP
    '6.1.0-41-amd64'
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0
        self.bytes_read = 0
        self._fh: BinaryIO = _open_core(path)
        try:
            self._load_headers()
        except BaseException:
            self._fh.close()
            raise

    def _load_headers(self) -> None:
        path = self.path
        fh = self._fh
        head = fh.read(EHDR.size)
        fh.seek(0)
        if head[:4] != b"\x7fELF":
            raise InspectError(f"{path} is not an ELF core (no ELF magic)",
                               "pass a /proc/kcore, a kdump vmcore or an espfix-inspect snapshot")
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError:
            size = 0
        # /proc/kcore reports its logical size; a regular file must hold all
        # of every segment it declares.
        self.file_size = size
        e_type, _ = check_elf_header(head, path, size, "a core")
        if e_type != 4:
            kind = {1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN"}.get(e_type, f"type {e_type}")
            raise InspectError(f"{path} is an ELF file of type {kind}, not a core",
                               "pass a core (a vmlinux goes to {symbols})", path=path,
                               role="core")
        raw = x86_64_core_headers(fh.fileno())       # checked above: bounded reads
        if raw is None:
            raw = self._elftools_headers()
        self.segments: list[Segment] = []
        notes_raw = b""
        for ptype, vaddr, paddr, off, filesz, memsz in raw:
            if ptype not in (PT_LOAD, PT_NOTE):
                continue
            if size and off + filesz > size:
                raise InspectError(
                    f"{path} is truncated: a segment ends at byte {off + filesz:#x} "
                    f"but the file has {size:#x} bytes",
                    "copy or capture the whole core again")
            if ptype == PT_LOAD:
                if filesz > memsz or vaddr + memsz > 1 << 64 or \
                        (paddr != NO_PADDR and paddr + memsz > 1 << 64):
                    raise InspectError(f"{path}: a PT_LOAD segment at {vaddr:#x} has "
                                       f"impossible sizes (filesz {filesz:#x}, memsz "
                                       f"{memsz:#x}, paddr {paddr:#x})",
                                       "the file is damaged; capture it again")
                self.segments.append(Segment(vaddr, paddr, off, filesz, memsz))
            else:
                if len(notes_raw) + filesz > MAX_NOTES_SIZE:
                    raise InspectError(f"{path}: ELF notes larger than "
                                       f"{MAX_NOTES_SIZE // MiB} MiB",
                                       "the file is damaged; capture it again")
                notes_raw += self._pread(off, filesz)
        self.notes = parse_notes(notes_raw)
        self.vmcoreinfo = VmcoreInfo({}, path)
        for note in self.notes:
            if note.name == "VMCOREINFO":
                self.vmcoreinfo = parse_vmcoreinfo(note.desc, path)
                break
        self._by_vaddr = sorted(self.segments, key=lambda s: s.vaddr)
        self._vstarts = [s.vaddr for s in self._by_vaddr]
        self._by_paddr = sorted((s for s in self.segments if s.has_paddr),
                                key=lambda s: s.paddr)
        self._pstarts = [s.paddr for s in self._by_paddr]

    def _elftools_headers(self) -> list[tuple]:
        """The program headers through pyelftools, for whatever the struct reader
        (:func:`x86_64_core_headers`) does not take; refuses what is not an x86-64 core."""
        from elftools.elf.elffile import ELFFile
        path, fh = self.path, self._fh
        fh.seek(0)
        try:
            elf = ELFFile(fh)
            if elf.header["e_type"] != "ET_CORE":
                raise InspectError(f"{path} is an ELF file of type {elf.header['e_type']}, not a core",
                                   "pass a core (a vmlinux goes to {symbols})", path=path,
                                   role="core")
            if elf.elfclass != 64 or elf.header["e_machine"] != "EM_X86_64":
                raise InspectError(f"{path} is not an x86-64 core "
                                   f"({elf.elfclass}-bit, {elf.header['e_machine']})",
                                   "espfix64 exists only on x86-64 kernels")
            return [(s["p_type"], s["p_vaddr"], s["p_paddr"], s["p_offset"],
                    s["p_filesz"], s["p_memsz"]) for s in elf.iter_segments()]
        except InspectError:
            raise
        except Exception as e:      # pyelftools' own errors for any malformed field
            raise InspectError(f"{path}: unreadable ELF headers ({type(e).__name__}: {e})",
                               "the file is damaged or truncated; capture it again") from None

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ElfCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, name: str) -> Note | None:
        for n in self.notes:
            if n.name == name:
                return n
        return None

    def _pread(self, offset: int, size: int) -> bytes:
        try:
            data = os.pread(self._fh.fileno(), size, offset)
        except OSError as e:
            raise InspectError(f"reading {self.path} at offset {offset:#x} failed: "
                               f"{e.strerror}", _read_fix(e)) from None
        self.reads += 1
        self.bytes_read += len(data)
        if len(data) < size:
            raise InspectError(f"{self.path} is truncated: short read at offset {offset:#x}",
                               "copy or capture the whole core again")
        return data

    @staticmethod
    def _find(starts: list[int], segs: list[Segment], addr: int, size: int,
              key: str) -> Segment | None:
        i = bisect.bisect_right(starts, addr) - 1
        # Segments may overlap (the kernel image also lies inside a RAM
        # range; snapshots hold small ranges): look back for one that holds
        # all of [addr, addr + size).
        for j in range(i, max(i - 16, -1), -1):
            s = segs[j]
            start = getattr(s, key)
            if start <= addr and addr + size <= start + s.memsz:
                return s
        return None

    def segment_for_vaddr(self, addr: int, size: int = 1) -> Segment | None:
        return self._find(self._vstarts, self._by_vaddr, addr, size, "vaddr")

    def segment_for_paddr(self, paddr: int, size: int = 1) -> Segment | None:
        return self._find(self._pstarts, self._by_paddr, paddr, size, "paddr")

    def _read_in(self, seg: Segment, rel: int, size: int) -> bytes:
        if rel + size > seg.memsz:
            return b""
        if rel >= seg.filesz:
            return bytes(size)
        n = min(size, seg.filesz - rel)
        data = self._pread(seg.offset + rel, n)
        return data + bytes(size - n)

    def read_vaddr(self, addr: int, size: int) -> bytes | None:
        """Bytes at a virtual address, or None when no segment covers them all."""
        seg = self.segment_for_vaddr(addr, size)
        if seg is None:
            return None
        data = self._read_in(seg, addr - seg.vaddr, size)
        return data if len(data) == size else None

    def read_vaddrs(self, addrs: Sequence[int], size: int) -> list[bytes | None]:
        """``[read_vaddr(a, size) for a in addrs]``, with the common case done inline:
        the range lies in the file part of the segment that starts last at or below
        it (the one :meth:`read_vaddr` would use).  That segment's bounds are kept
        between addresses, so the per-CPU words of 131,072 CPUs cost little more than
        their 131,072 positioned reads."""
        out: list[bytes | None] = []
        append = out.append
        starts, segs = self._vstarts, self._by_vaddr
        fd = self._fh.fileno()
        pread = os.pread
        lo = nxt = end = delta = 0          # segment start, next segment's start, data end
        reads = nbytes = 0
        try:
            for addr in addrs:
                if not (lo <= addr < nxt and addr + size <= end):
                    i = bisect.bisect_right(starts, addr) - 1
                    if i < 0:
                        lo = nxt = end = 0
                        append(self.read_vaddr(addr, size))
                        continue
                    seg = segs[i]
                    lo, end = seg.vaddr, seg.vaddr + min(seg.filesz, seg.memsz)
                    nxt = starts[i + 1] if i + 1 < len(starts) else 1 << 64
                    delta = seg.offset - seg.vaddr
                    if addr + size > end:
                        append(self.read_vaddr(addr, size))
                        continue
                data = pread(fd, size, addr + delta)
                reads += 1
                nbytes += len(data)
                if len(data) < size:
                    raise InspectError(f"{self.path} is truncated: short read at offset "
                                       f"{addr + delta:#x}", "copy or capture the whole core again")
                append(data)
        except OSError as e:
            raise InspectError(f"reading {self.path} at offset {addr + delta:#x} failed: "
                               f"{e.strerror}", _read_fix(e)) from None
        finally:
            self.reads += reads
            self.bytes_read += nbytes
        return out

    def read_paddr(self, paddr: int, size: int) -> bytes | None:
        """Bytes at a physical address, or None when no segment covers them all."""
        seg = self.segment_for_paddr(paddr, size)
        if seg is None:
            return None
        data = self._read_in(seg, paddr - seg.paddr, size)
        return data if len(data) == size else None


def x86_64_core_headers(fd: int) -> list[tuple] | None:
    """``(p_type, p_vaddr, p_paddr, p_offset, p_filesz, p_memsz)`` of every program
    header of an ELF64 little-endian x86-64 ``ET_CORE`` file, as pyelftools gives them
    (``p_type`` named for PT_LOAD and PT_NOTE); None when the file is anything else or
    its headers are short or unusual, so that pyelftools parses it and names the fault.
    """
    ehdr = os.pread(fd, ELF64_EHDR.size, 0)
    if len(ehdr) < ELF64_EHDR.size:
        return None
    (ident, e_type, e_machine, _version, _entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = ELF64_EHDR.unpack(ehdr)
    if ident[:6] != b"\x7fELF\x02\x01" or e_type != ET_CORE or e_machine != EM_X86_64 \
            or e_phentsize != ELF64_PHDR.size or e_phnum == PN_XNUM:
        return None
    table = os.pread(fd, e_phnum * ELF64_PHDR.size, e_phoff) if e_phnum else b""
    if len(table) < e_phnum * ELF64_PHDR.size:
        return None
    return [(P_TYPES.get(p_type, p_type), vaddr, paddr, offset, filesz, memsz)
            for p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align
            in ELF64_PHDR.iter_unpack(table)]


def is_vmcore(core: ElfCore, snapshot_note: str) -> bool:
    """An ELF *crash dump*, as opposed to /proc/kcore or a snapshot.

    /proc/kcore (and the synthetic cores shaped like it) always has
    virtual-only segments (vmalloc, vmemmap: ``p_paddr = -1``,
    ``fs/proc/kcore.c``); a snapshot carries its own note.  A vmcore
    (``/proc/vmcore``, ``makedumpfile -E``, QEMU's ELF dump) has neither: every
    ``PT_LOAD`` is physical memory.
    """
    if any(n.name == snapshot_note for n in core.notes):
        return False
    if any(s.paddr == NO_PADDR for s in core.segments):
        return False
    return bool(core.segments)


def _read_fix(e: OSError) -> str:
    if e.errno in (errno.EPERM, errno.EACCES):
        return "run as root with CAP_SYS_RAWIO; kernel lockdown also refuses /proc/kcore"
    if e.errno == errno.EIO:
        return "the kernel refused the read; check dmesg"
    return "check the file"


def _open_core(path: str) -> BinaryIO:
    try:
        return open_regular(path, "core", "pass a core file as {core}")
    except InspectError as e:
        if path == "/proc/kcore" and "does not exist" in e.cause:
            raise InspectError("/proc/kcore does not exist on this kernel "
                               "(CONFIG_PROC_KCORE is off, or /proc is not mounted)",
                               "inspect a saved core or snapshot as {core}", path=path,
                               role="core") from None
        if "does not exist" in e.cause:
            raise InspectError(f"{path} does not exist", "check the path given as {core}",
                               path=path, role="core") from None
        e.path, e.role = path, "core"
        raise
    except PermissionError:
        if path.startswith("/proc/"):
            if os.geteuid() != 0:
                raise InspectError(f"permission denied opening {path}: not root",
                                   "run espfix-inspect as root (sudo)") from None
            mode, how = lockdown_state()
            if mode == "confidentiality":
                raise InspectError(f"permission denied opening {path} as root: kernel "
                                   f"lockdown=confidentiality ({how}) refuses it",
                                   "boot without lockdown=confidentiality (integrity mode "
                                   "allows /proc/kcore), or inspect a kdump vmcore "
                                   "offline") from None
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            if st is not None and stat.S_IMODE(st.st_mode) == 0:
                # the kernel's kcore is 0400; 0000 is a node mounted over it
                raise InspectError(f"permission denied opening {path} as root: an "
                                   "inaccessible node is mounted over it (mode 0000; "
                                   "systemd's ProtectKernelTunables=yes or InaccessiblePaths= "
                                   "do that)", "run without that sandboxing option") from None
            if _has_effective_cap(CAP_SYS_RAWIO) is False:
                raise InspectError(f"permission denied opening {path} as root: CAP_SYS_RAWIO "
                                   "is not in this process's effective capabilities (dropped "
                                   "by a bounding set: systemd's PrivateDevices=yes or "
                                   "CapabilityBoundingSet=, a container, capsh)",
                                   "run with CAP_SYS_RAWIO in the initial namespace") from None
            if mode is not None:
                raise InspectError(f"permission denied opening {path} as root with lockdown="
                                   f"{mode} ({how}): CAP_SYS_RAWIO is missing (a container "
                                   "or a capability-bounded shell?)",
                                   "run in the initial namespace with CAP_SYS_RAWIO") from None
            raise InspectError(f"permission denied opening {path} as root: kernel lockdown "
                               f"or a missing CAP_SYS_RAWIO ({how})",
                               "boot without lockdown, or inspect a kdump vmcore offline") from None
        raise InspectError(f"permission denied opening {path}",
                           "make the core readable, or run as root") from None


#: include/uapi/linux/capability.h; open_kcore() in fs/proc/kcore.c checks it
CAP_SYS_RAWIO = 17


def _has_effective_cap(cap: int, status: str = "/proc/self/status") -> bool | None:
    """Whether *cap* is in this process's CapEff (proc(5)); None when unknown."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def lockdown_state() -> tuple[str | None, str]:
    """(lockdown mode or None, where it was read), from securityfs, else the kernel
    command line (security/lockdown/lockdown.c: "none integrity [confidentiality]")."""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            for word in f.read().split():
                if word.startswith("["):
                    return word.strip("[]"), "/sys/kernel/security/lockdown"
    except OSError:
        pass
    try:
        with open("/proc/cmdline") as f:
            for word in f.read().split():
                if word.startswith("lockdown="):
                    return word.split("=", 1)[1], "lockdown= on the kernel command line"
    except OSError:
        pass
    return None, "lockdown state unknown: securityfs not mounted, no lockdown= on the cmdline"
