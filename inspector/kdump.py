"""Crash dumps as a memory source: kdump-compressed files and ELF vmcores.

The formats kdump really writes, read through libkdumpfile (Debian's
``python3-libkdumpfile``, module ``kdumpfile``, imported only when a dump is
opened):

- kdump-compressed ("diskdump", signature ``KDUMP   ``): ``makedumpfile -c``
  (zlib, Debian's kdump-tools default with ``-d 31``), ``-l`` (lzo), ``-p``
  (snappy), ``-z`` (zstd), and QEMU's ``dump-guest-memory -z/-l/-s``;
- the *flattened* form of it (makedumpfile ``-F``, and every kdump-compressed
  dump QEMU wrote before 8.2): a stream of ``(offset, size, data)`` records
  behind a ``makedumpfile`` header.  Newer libkdumpfile reads it natively
  (``src/kdumpfile/flatmap.c``, 2024; sid's does: drgn opened QEMU's flattened
  dump with it in the guest); Debian bookworm's 0.5.1 answers "Unknown file
  format", so the records are then put back in place in an unlinked temporary
  file first (what ``makedumpfile -R`` does), sparse, so that holes cost nothing;
- ELF vmcores: ``/proc/vmcore`` copied raw, ``makedumpfile -E``, QEMU's ELF
  ``dump-guest-memory``.  They are told apart from /proc/kcore-shaped cores
  (and espfix-inspect snapshots) by :func:`is_vmcore`.

Why libkdumpfile and not a reader of our own: the diskdump format has four
compressions (lzo and snappy have no binding in Python's standard library, zstd
only since 3.14),
split and flattened variants, header versions 1 to 6 with fields added over
time, and filtered-page bitmaps; libkdumpfile is the reader drgn's and crash's
ecosystem already trusts (drgn opens every non-ELF dump with it), it is
packaged by Debian, and it keeps this module to the espfix-specific questions.

These dumps hold *physical* memory only.  :class:`DumpCore` therefore serves
no virtual address (``read_vaddr`` is always None): the kernel reader of
:mod:`inspector.state` translates kernel-image addresses through
``phys_base``/``KERNELOFFSET`` and everything else through the dump's own
page tables, exactly as for a snapshot.

Filtered pages: makedumpfile ``-d`` drops zero (1), cache (2, 4), user (8) and
free (16) pages.  A page the dump says is RAM but did not save raises
:class:`~inspector.errors.PageFiltered` from :class:`DumpMemory`; the checks
turn that into an info finding, ``stacks`` into "all zero, filtered".
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field

from .elfcore import Note, is_vmcore, parse_notes, parse_vmcoreinfo
from .errors import InspectError, PageFiltered
from .fileio import open_regular
from .memory import CoreMemory
from .x86 import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DumpCore", "DumpMemory", "CpuRegisters", "sniff", "is_vmcore",
           "import_kdumpfile", "DISKDUMP_SIGNATURE", "FLAT_SIGNATURE", "REGISTER_NAMES"]

#: ``struct disk_dump_header.signature`` (makedumpfile diskdump_mod.h, QEMU dump.h).
DISKDUMP_SIGNATURE = b"KDUMP   "
#: ``struct makedumpfile_header.signature``: the flattened stream format.
FLAT_SIGNATURE = b"makedumpfile\0\0\0\0"
FLAT_HEADER_SIZE = 4096
#: ``struct new_utsname``: six 65-byte fields after the 8-byte signature and the
#: 4-byte header_version.
UTS_FIELD = 65
UTS_OFFSET = 12

#: ``struct user_regs_struct`` (arch/x86/include/asm/user_64.h): the order of
#: ``elf_prstatus.pr_reg`` in an NT_PRSTATUS note.
REGISTER_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
                  "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags",
                  "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")

#: Dump files are parsed by a C library: refuse absurd flattened streams early.
MAX_FLAT_RECORD = 1 << 40
#: An NT_PRSTATUS is 336 bytes plus headers; 8192 CPUs fit in 4 MiB.
MAX_NOTES = 16 << 20


def import_kdumpfile(path: str):
    """The ``kdumpfile`` module, or one clear error naming the Debian package."""
    try:
        import kdumpfile                       # Debian: python3-libkdumpfile
        import kdumpfile.exceptions
    except ImportError:
        raise InspectError(
            f"{path} is a crash dump, and reading it needs libkdumpfile's Python module "
            f"kdumpfile, which {sys.executable} (Python {sys.version.split()[0]}) cannot import",
            "apt-get install python3-libkdumpfile, and run espfix-inspect with Debian's "
            "/usr/bin/python3 (or a venv created from it with --system-site-packages)") from None
    return kdumpfile


def sniff(path: str) -> str | None:
    """``"diskdump"``, ``"flattened"`` or ``"elf"`` from the first bytes of *path*,
    None for anything else, or for anything that is not a readable regular file
    (the ELF reader then says what is wrong with it)."""
    try:
        with open_regular(path, "core", "check the path given as {core}") as f:
            head = f.read(16)
    except (InspectError, OSError):
        return None
    return _kind_of(head)


def _kind_of(head: bytes) -> str | None:
    if head.startswith(b"\x7fELF"):
        return "elf"
    if head.startswith(DISKDUMP_SIGNATURE):
        return "diskdump"
    if head == FLAT_SIGNATURE:
        return "flattened"
    return None


def raw_elf_layout(fd: int, size: int) -> tuple[int, list[tuple[int, int, int]], list[Note]]:
    """``(e_type, [(p_type, p_paddr, p_filesz)], notes)`` of an x86-64 ELF file from its
    raw headers, bounded by the file size, for vmcores whose writer filled an
    informational header field wrongly (QEMU 7.2's ELF dumps carry ``e_ehsize`` 8,
    the size of a pointer, which :func:`~inspector.elfcore.check_elf_header`
    refuses).  Only what locating the program headers and notes needs is checked;
    the rest is libkdumpfile's."""
    head = os.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    e_phoff, = struct.unpack_from("<Q", head, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
    if e_machine != 62 or e_phentsize != 56 or not 0 < e_phnum <= 0xFFFE \
            or e_phoff < 64 or e_phoff + 56 * e_phnum > size:
        raise ValueError("program headers outside the file or of the wrong size")
    raw = os.pread(fd, 56 * e_phnum, e_phoff)
    loads: list[tuple[int, int, int]] = []
    notes: list[Note] = []
    budget = MAX_NOTES
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, _memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", raw, 56 * i)
        if p_type == 1:
            loads.append((p_type, p_paddr, p_filesz))
        elif p_type == 4 and p_offset + p_filesz <= size and p_filesz <= budget:
            budget -= p_filesz
            notes += parse_notes(os.pread(fd, p_filesz, p_offset))
    return e_type, loads, notes


@dataclass(frozen=True)
class CpuRegisters:
    """One CPU's registers at crash (or dump) time, from an NT_PRSTATUS note."""
    index: int                       # position of the note in the dump
    pid: int | None                  # pr_pid: the task running there (QEMU: vCPU + 1)
    regs: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> int | None:
        return self.regs.get(name)


def parse_prstatus(desc: bytes, index: int) -> CpuRegisters | None:
    """An x86-64 ``struct elf_prstatus`` (include/linux/elfcore.h): pr_pid at
    offset 32, ``pr_reg`` (27 words, :data:`REGISTER_NAMES`) at offset 112."""
    if len(desc) < 112 + 8 * len(REGISTER_NAMES):
        return None
    pid = struct.unpack_from("<i", desc, 32)[0]
    words = struct.unpack_from(f"<{len(REGISTER_NAMES)}Q", desc, 112)
    return CpuRegisters(index, pid, dict(zip(REGISTER_NAMES, words)))


class DumpCore:
    """A crash dump opened through libkdumpfile, shaped like
    :class:`~inspector.elfcore.ElfCore` for :mod:`inspector.target`.

    >>> dump = DumpCore("/var/crash/202612011500/dump.202612011500")   # doctest: +SKIP
    >>> dump.format, dump.vmcoreinfo["OSRELEASE"]                      # doctest: +SKIP
    ('diskdump', '6.1.0-56-amd64')
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.reads = 0
        self.bytes_read = 0
        self.segments: list = []          # no virtual segments: physical memory only
        self.notes: list[Note] = []
        self.reassembled = False          # a flattened stream put back in place
        self.dump_level: int | None = None   # makedumpfile -d, kdump-compressed only
        self._tmp: Any = None            # the reassembled flattened dump (a temporary file)
        self._fh, self.kind = _open_dump(path)
        try:
            kdumpfile = import_kdumpfile(path)
        except BaseException:
            self._fh.close()
            raise
        self._exc = kdumpfile.exceptions
        # machine-physical reads go straight to the file; KDUMP_KPHYSADDR would first
        # make libkdumpfile set up its own address translation, which this module
        # does not use (and which fails on layouts it does not recognise).  Outside
        # Xen, machine-physical and physical addresses are the same.
        self._PHYS = kdumpfile.KDUMP_MACHPHYSADDR
        self._k: Any = None              # a kdumpfile.kdumpfile (no type information)
        self._file_map = self._mem_map = None
        try:
            self._open(kdumpfile)
            self._load_meta()
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------
    def _open(self, kdumpfile) -> None:
        path = self.path
        try:
            # the descriptor checked to be a regular file, not the name again
            self._k = kdumpfile.kdumpfile(f"/proc/self/fd/{self._fh.fileno()}")
            return
        except self._exc.NotImplementedException as e:
            if self.kind != "flattened":
                raise InspectError(f"{path}: libkdumpfile cannot read this dump ({e})",
                                   "pass a kdump-compressed dump, an ELF vmcore, "
                                   "/proc/kcore or a snapshot") from None
        except self._exc.KDumpBaseException as e:
            raise InspectError(f"{path}: libkdumpfile cannot read this dump ({e})",
                               "the file is damaged or truncated; capture it again") from None
        # A library older than 0.5.5 does not know the flattened stream: put the
        # records back where they belong (makedumpfile -R), in an unlinked file.
        self._tmp = _reassemble_flattened(self._fh, path)
        self.reassembled = True
        try:
            self._k = kdumpfile.kdumpfile(f"/proc/self/fd/{self._tmp.fileno()}")
        except self._exc.KDumpBaseException as e:
            raise InspectError(f"{path}: the flattened dump, put back in place, is not a "
                               f"dump libkdumpfile can read ({e})",
                               "the file is damaged or truncated; capture it again") from None

    def _attr(self, key: str, default=None):
        try:
            return self._k.attr[key]
        except (KeyError, self._exc.KDumpBaseException):
            return default

    def _load_meta(self) -> None:
        self.format = self._attr("file.format", "?")
        self.description = self._attr("file.description", "")
        if self.kind == "elf":
            try:
                _t, _l, file_notes = raw_elf_layout(self._fh.fileno(), self._file_end())
            except (ValueError, OSError, struct.error):
                file_notes = []
        else:
            file_notes = self._diskdump_notes()
        raw = self._attr("linux.vmcoreinfo.raw")
        raw_bytes = bytes(raw) if raw is not None else b""
        if not raw_bytes:
            note = next((n for n in file_notes if n.name == "VMCOREINFO"), None)
            raw_bytes = note.desc if note is not None else b""
        self.vmcoreinfo = parse_vmcoreinfo(raw_bytes, self.path)
        if raw_bytes:
            self.notes.append(Note("VMCOREINFO", 0, raw_bytes))
        self.notes.extend(n for n in file_notes if n.name != "VMCOREINFO")
        self.max_pfn = int(self._attr("max_pfn", 0) or 0)
        self.file_size = os.fstat(self._fh.fileno()).st_size
        self._file_map = self._attr("file.pagemap")
        self._mem_map = self._attr("memory.pagemap")

    def _pread(self, size: int, offset: int) -> bytes:
        fh = self._tmp if self._tmp is not None else self._fh
        return os.pread(fh.fileno(), size, offset)

    def _diskdump_notes(self) -> list[Note]:
        """The ELF notes a kdump-compressed header carries (header version 4 and
        later: ``kdump_sub_header.offset_note/size_note``, makedumpfile's
        diskdump_mod.h).  libkdumpfile 0.5.1 turns them into ``cpu.N.reg.*`` only
        when it knows the architecture from the header's utsname, which QEMU leaves
        empty but for ``machine``; so they are read here, bounded, and parsed like
        any ELF note section."""
        try:
            head = self._pread(432, 0)
            version, = struct.unpack_from("<i", head, 8)
            block, = struct.unpack_from("<i", head, 428)
            if version < 4 or not 512 <= block <= 1 << 20:
                return []
            sub = self._pread(64, block)
            self.dump_level, = struct.unpack_from("<i", sub, 8)
            off, size = struct.unpack_from("<QQ", sub, 48)
            if not 0 < size <= MAX_NOTES or off < block or off + size > self._file_end():
                return []
            return parse_notes(self._pread(size, off))
        except (OSError, struct.error):
            return []

    def _file_end(self) -> int:
        fh = self._tmp if self._tmp is not None else self._fh
        return os.fstat(fh.fileno()).st_size

    # -- the ElfCore surface ---------------------------------------------------
    def note(self, name: str) -> Note | None:
        for n in self.notes:
            if n.name == name:
                return n
        return None

    def read_vaddr(self, addr: int, size: int) -> bytes | None:
        return None                       # physical memory only

    def read_vaddrs(self, addrs, size: int) -> list[bytes | None]:
        """As :meth:`ElfCore.read_vaddrs`: a dump holds physical memory only."""
        return [None] * len(addrs)

    def read_paddr(self, paddr: int, size: int) -> bytes | None:
        """Bytes at a physical address, or None when the dump lacks any of them."""
        out = bytearray()
        addr = paddr
        end = paddr + size
        while addr < end:
            n = min(end, (addr & PAGE_MASK) + PAGE_SIZE) - addr
            if self._file_map is not None and not _bit(self._file_map, addr >> PAGE_SHIFT):
                # not saved in the file (libkdumpfile 0.5.1 reads a hole between two
                # ELF PT_LOADs as zeros; its file page map says the truth)
                return None
            try:
                data = self._k.read(self._PHYS, addr, n)
            except (self._exc.KDumpBaseException, OverflowError):
                return None
            self.reads += 1
            self.bytes_read += n
            out += data
            addr += n
        return bytes(out)

    def page_state(self, paddr: int) -> str:
        """``"present"``, ``"filtered"`` (RAM the dump did not save) or
        ``"absent"`` (not RAM as far as the dump knows)."""
        pfn = paddr >> PAGE_SHIFT
        if _bit(self._file_map, pfn):
            return "present"
        if self.kind == "elf":
            # An ELF vmcore has no RAM bitmap: makedumpfile -E ends a PT_LOAD's file
            # data early (p_memsz > p_filesz) or starts a new PT_LOAD after 256 or
            # more excluded pages.  The pages asked for here are the ones the kernel
            # itself points at (page tables, espfix_pages[]), so they are RAM: missing
            # means filtered.
            return "filtered"
        if self.max_pfn and pfn >= self.max_pfn:
            return "absent"
        if self._mem_map is None or _bit(self._mem_map, pfn):
            return "filtered"
        return "absent"

    def uts(self) -> dict[str, str]:
        """The diskdump header's utsname: makedumpfile fills it from the kernel,
        QEMU's dump-guest-memory leaves all but ``machine`` empty."""
        if self.kind not in ("diskdump", "flattened"):
            return {}
        try:
            head = self._pread(UTS_OFFSET + 6 * UTS_FIELD, 0)
        except OSError:
            return {}
        names = ("sysname", "nodename", "release", "version", "machine", "domainname")
        return {n: head[UTS_OFFSET + i * UTS_FIELD:UTS_OFFSET + (i + 1) * UTS_FIELD]
                .split(b"\0", 1)[0].decode("latin-1") for i, n in enumerate(names)}

    def written_by_qemu(self) -> bool:
        """QEMU's dump-guest-memory: "QEMU" notes in an ELF dump; in a
        kdump-compressed one, a utsname with nothing but ``machine``."""
        if any(n.name == "QEMU" for n in self.notes):
            return True
        uts = self.uts()
        return bool(uts) and not uts.get("sysname") and not uts.get("release") \
            and bool(uts.get("machine"))

    def registers(self) -> list[CpuRegisters]:
        """Every CPU's saved registers, in the dump's note order: the NT_PRSTATUS
        notes of an ELF dump or of a kdump-compressed header's note section, else
        libkdumpfile's ``cpu.N.reg.*`` attributes."""
        out: list[CpuRegisters] = []
        prstatus = [n for n in self.notes if n.name == "CORE" and n.type == 1]
        for i, n in enumerate(prstatus):
            r = parse_prstatus(n.desc, i)
            if r is not None:
                out.append(r)
        if out:
            return out
        count = int(self._attr("cpu.number", 0) or 0)
        for i in range(min(count, 8192)):
            regs: dict[str, int] = {}
            for name in REGISTER_NAMES:
                v = self._attr(f"cpu.{i}.reg.{name}")
                if v is not None:
                    regs[name] = int(v)
            pid = self._attr(f"cpu.{i}.pid")
            out.append(CpuRegisters(i, None if pid is None else int(pid), regs))
        return out

    def close(self) -> None:
        if getattr(self, "_k", None) is not None:
            # Debian's 0.5.1 binding never closes the descriptor it opened for the
            # dump (kdumpfile_dealloc frees the context only): close it here, when it
            # still is that file once the object is gone.
            fd = self._attr("file.set.0.fd")
            mine = self._tmp if self._tmp is not None else self._fh
            self._k = self._file_map = self._mem_map = None
            if fd is not None and mine is not None and fd != mine.fileno():
                try:
                    if os.path.samestat(os.fstat(fd), os.fstat(mine.fileno())):
                        os.close(fd)
                except OSError:
                    pass
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> DumpCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bit(bmp, pfn: int) -> bool:
    if bmp is None:
        return False
    try:
        return bool(bmp.get_bits(pfn, pfn)[0] & 1)
    except Exception:                     # out of the bitmap's range
        return False


def _open_dump(path: str):
    """(the dump opened as a regular file, its kind): one non-blocking open
    (:func:`~inspector.fileio.open_regular`), nothing read through the name again."""
    fix = "check the path given as {core}"
    try:
        fh = open_regular(path, "core", fix)
    except PermissionError:
        raise InspectError(f"permission denied reading {path}",
                           "make the dump readable (kdump-tools saves it root-only), "
                           "or run as root") from None
    try:
        kind = _kind_of(os.pread(fh.fileno(), 16, 0))
    except OSError as e:
        fh.close()
        raise InspectError(f"cannot read {path}: {e.strerror}", fix) from None
    if kind is None:
        fh.close()
        raise InspectError(f"{path} is not a crash dump or core (no ELF, KDUMP or "
                           "makedumpfile signature)",
                           "pass a kdump vmcore, /proc/kcore or an espfix-inspect snapshot")
    return fh, kind


def _reassemble_flattened(fh, path: str):
    """makedumpfile -R in-process: the flattened records of the open dump *fh*
    (named *path*) written at their offsets into an unlinked temporary file
    (returned open)."""
    src = os.fdopen(os.dup(fh.fileno()), "rb")
    src.seek(0)
    out = tempfile.TemporaryFile(prefix="espfix-inspect-flat-")
    try:
        size = os.fstat(src.fileno()).st_size
        head = src.read(FLAT_HEADER_SIZE)
        if len(head) < 32 or head[:16] != FLAT_SIGNATURE:
            raise InspectError(f"{path} is not a flattened dump", "capture it again")
        ftype, version = struct.unpack_from(">qq", head, 16)
        if ftype != 1 or version != 1:
            raise InspectError(f"{path}: flattened dump of type {ftype} version {version}, "
                               "not the makedumpfile 1/1 stream",
                               "reassemble it with makedumpfile -R, then pass the result")
        pos = FLAT_HEADER_SIZE
        while True:
            rec = src.read(16)
            if len(rec) < 16:
                raise InspectError(f"{path} is truncated: the flattened stream ends at byte "
                                   f"{pos:#x} without its end record",
                                   "copy or capture the whole dump again")
            off, n = struct.unpack(">qq", rec)
            pos += 16
            if off == -1:
                break
            if off < 0 or n <= 0 or n > MAX_FLAT_RECORD or pos + n > size:
                raise InspectError(f"{path}: damaged flattened record at byte {pos - 16:#x} "
                                   f"(offset {off}, size {n})", "capture the dump again")
            out.seek(off)
            left = n
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:
                    raise InspectError(f"{path} is truncated inside a flattened record",
                                       "copy or capture the whole dump again")
                out.write(chunk)
                left -= len(chunk)
            pos += n
        out.flush()
        return out
    except OSError as e:
        out.close()
        raise InspectError(f"cannot put the flattened dump {path} back in place: "
                           f"{e.strerror or e}",
                           "free space in $TMPDIR, or run makedumpfile -R yourself") from None
    except BaseException:
        out.close()
        raise
    finally:
        src.close()


class DumpMemory(CoreMemory):
    """:class:`~inspector.memory.CoreMemory` over a :class:`DumpCore`: a page the
    dump filtered out raises :class:`~inspector.errors.PageFiltered`."""

    def __init__(self, core: DumpCore) -> None:
        super().__init__(core)          # type: ignore[arg-type]
        self.dump = core

    def _missing(self, paddr: int) -> InspectError:
        base = paddr & PAGE_MASK
        state = self.dump.page_state(base)
        if state == "filtered":
            return PageFiltered(f"physical page {base:#x} was filtered out of "
                                f"{self.dump.path} (makedumpfile -d drops zero, cache, user "
                                "and free pages)",
                                "take the dump with makedumpfile -d 0 to keep every page",
                                paddr=base)
        return InspectError(f"physical page {base:#x} is not in {self.dump.path} (not RAM "
                            "in this dump)", "the dump lacks that memory; capture a complete "
                            "dump")

    def phys_page(self, paddr: int) -> bytes:
        base = paddr & PAGE_MASK
        page = self._pages.get(base)
        if page is None:
            data = self.dump.read_paddr(base, PAGE_SIZE)
            if data is None:
                raise self._missing(base)
            self._pages[base] = page = data
            self.stats.pages_read += 1
            self.stats.page_fetches[base >> PAGE_SHIFT] += 1
        return page

    def read_phys(self, paddr: int, size: int) -> bytes:
        off = paddr & (PAGE_SIZE - 1)
        if off + size <= PAGE_SIZE and (paddr & PAGE_MASK) in self._pages:
            return self._pages[paddr & PAGE_MASK][off:off + size]
        self.stats.small_reads += 1
        data = self.dump.read_paddr(paddr, size)
        if data is None:
            raise self._missing(paddr)
        return data
