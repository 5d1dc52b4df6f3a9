"""inspector/elfcore.py on its own: the ELF header check, program headers, segment
lookup and reads by virtual and physical address (holes, overlaps, bounds), and the
note parser.  Every core here is written byte by byte by :func:`write_core` after
``Elf64_Ehdr``/``Elf64_Phdr``/``Elf64_Nhdr`` (include/uapi/linux/elf.h), not by the
project's own writer."""

from __future__ import annotations

import struct

import pytest

from inspector.elfcore import (EHDR, NO_PADDR, ElfCore, Note, check_elf_header,
                               parse_notes)
from inspector.errors import InspectError

PHDR = struct.Struct("<IIQQQQQQ")


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)             # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def ehdr(e_type: int = 4, phnum: int = 0, machine: int = 62, ident_class: int = 2,
         phoff: int = EHDR.size, phentsize: int = PHDR.size, ehsize: int = EHDR.size) -> bytes:
    ident = b"\x7fELF" + bytes([ident_class, 1, 1]) + bytes(9)
    return EHDR.pack(ident, e_type, machine, 1, 0, phoff, 0, 0, ehsize, phentsize, phnum,
                     64, 0, 0)


def write_core(path, loads: list[tuple[int, int, bytes, int]], notes: bytes = b"") -> str:
    """loads: (vaddr, paddr, file bytes, memsz); one PT_NOTE first when *notes*."""
    phnum = len(loads) + (1 if notes else 0)
    off = EHDR.size + phnum * PHDR.size
    phdrs, body = [], b""
    if notes:
        phdrs.append(PHDR.pack(4, 0, off, 0, 0, len(notes), 0, 4))
        body += notes
        off += len(notes)
    for vaddr, paddr, data, memsz in loads:
        phdrs.append(PHDR.pack(1, 7, off, vaddr, paddr, len(data), memsz, 4096))
        body += data
        off += len(data)
    path.write_bytes(ehdr(phnum=phnum) + b"".join(phdrs) + body)
    return str(path)


RAM = bytes(range(256)) * 32                    # 8 KiB, byte i at offset i holds i % 256
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nKERNELOFFSET=1e000000\n"


@pytest.fixture
def core(tmp_path):
    path = write_core(tmp_path / "core", [
        (0xFFFF888000100000, 0x100000, RAM, 0x3000),        # 4 KiB of it not in the file
        (0xFFFFFFFF81000000, 0x1000000, b"\xaa" * 0x1000, 0x1000),
        (0xFFFFC90000000000, NO_PADDR, b"\xbb" * 0x1000, 0x1000),   # vmalloc: no paddr
    ], notes=note(b"CORE", 1, b"\x01" * 8) + note(b"VMCOREINFO", 0, VMCOREINFO))
    with ElfCore(path) as c:
        yield c


def test_segments_and_notes(core) -> None:
    assert [(s.vaddr, s.paddr, s.filesz, s.memsz) for s in core.segments] == [
        (0xFFFF888000100000, 0x100000, 0x2000, 0x3000),
        (0xFFFFFFFF81000000, 0x1000000, 0x1000, 0x1000),
        (0xFFFFC90000000000, NO_PADDR, 0x1000, 0x1000)]
    assert not core.segments[2].has_paddr and core.segments[0].has_paddr
    assert [n.name for n in core.notes] == ["CORE", "VMCOREINFO"]
    assert core.note("CORE") == Note("CORE", 1, b"\x01" * 8) and core.note("nope") is None
    assert core.vmcoreinfo.osrelease == "6.1.0-test"
    assert core.vmcoreinfo.kernel_offset == 0x1E000000


def test_reads_by_virtual_and_physical_address(core) -> None:
    assert core.read_vaddr(0xFFFF888000100010, 4) == bytes([16, 17, 18, 19])
    assert core.read_paddr(0x101FFE, 2) == bytes([254, 255])
    assert core.read_vaddr(0xFFFFFFFF81000FFF, 1) == b"\xaa"
    assert core.read_vaddr(0xFFFFC90000000800, 2) == b"\xbb\xbb"
    # memsz beyond filesz reads as zeros; the end of a segment bounds every read
    assert core.read_paddr(0x102000, 8) == bytes(8)
    assert core.read_paddr(0x101FFC, 8) == bytes([252, 253, 254, 255, 0, 0, 0, 0])
    assert core.read_paddr(0x102FFC, 8) is None
    assert core.read_vaddr(0xFFFFFFFF81000FFF, 2) is None
    assert core.read_vaddr(0x1000, 1) is None and core.read_paddr(0xFFFFF000, 1) is None
    # a virtual-only segment is not found by physical address
    assert core.segment_for_paddr(NO_PADDR - 0x1000) is None


def test_read_vaddrs_is_read_vaddr_many_times(core) -> None:
    addrs = [0xFFFF888000100000 + 8 * i for i in range(0, 0x600, 7)] + [
        0x1000, 0xFFFF888000101FFC, 0xFFFFFFFF81000008, 0xFFFF888000102FFC]
    assert core.read_vaddrs(addrs, 8) == [core.read_vaddr(a, 8) for a in addrs]


def test_overlapping_segments_find_the_one_holding_the_range(tmp_path) -> None:
    path = write_core(tmp_path / "core", [
        (0x10000, 0x10000, b"\x01" * 0x4000, 0x4000),
        (0x11000, 0x51000, b"\x02" * 0x100, 0x100)])       # a small range inside
    with ElfCore(path) as c:
        assert c.read_vaddr(0x11000, 4) == b"\x02" * 4
        assert c.read_vaddr(0x110FE, 4) == b"\x01" * 4    # crosses the small one's end
        assert c.read_paddr(0x13000, 1) == b"\x01"


@pytest.mark.parametrize("head, words", [
    (ehdr()[:40], "truncated"),
    (ehdr(machine=3), "not an x86-64 ELF"),
    (ehdr(ident_class=1), "not an x86-64 ELF"),
    (ehdr(ehsize=52), "ELF header size is 52"),
    (ehdr(phnum=1, phentsize=32), "entries are 32 bytes"),
    (ehdr(phnum=0xFFFF), "extended numbering"),
    (ehdr(phnum=2, phoff=10), "lie outside the file"),
    (ehdr(phnum=100), "lie outside the file"),
])
def test_check_elf_header_refuses(head: bytes, words: str) -> None:
    with pytest.raises(InspectError) as e:
        check_elf_header(head, "f", 4096, "a core")
    assert words in e.value.cause


def test_check_elf_header_accepts() -> None:
    assert check_elf_header(ehdr(phnum=3), "f", 4096, "a core") == (4, 3)
    # no size known (/proc/kcore): only the 64-bit address space bounds the headers
    assert check_elf_header(ehdr(phnum=1000), "f", None, "a core") == (4, 1000)


@pytest.mark.parametrize("data, words", [
    (b"MZ" + bytes(100), "no ELF magic"),
    (ehdr(e_type=2), "type ET_EXEC, not a core"),
])
def test_not_a_core(tmp_path, data: bytes, words: str) -> None:
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(InspectError) as e:
        ElfCore(str(tmp_path / "f"))
    assert words in e.value.cause


def test_truncated_and_impossible_segments(tmp_path) -> None:
    path = write_core(tmp_path / "core", [(0x10000, 0x10000, b"\x01" * 0x1000, 0x1000)])
    data = (tmp_path / "core").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(InspectError) as e:
        ElfCore(str(tmp_path / "short"))
    assert "truncated" in e.value.cause
    # filesz > memsz
    bad = bytearray(data)
    PHDR.pack_into(bad, EHDR.size, 1, 7, EHDR.size + PHDR.size, 0x10000, 0x10000,
                   0x1000, 0x800, 4096)
    (tmp_path / "bad").write_bytes(bytes(bad))
    with pytest.raises(InspectError) as e:
        ElfCore(str(tmp_path / "bad"))
    assert "impossible sizes" in e.value.cause
    ElfCore(path).close()


def test_parse_notes_padding_and_bounds() -> None:
    a, b = note(b"AB", 7, b"xyz"), note(b"LONGNAME", 1, b"12345678")
    assert len(a) == 12 + 4 + 4          # name "AB\0" and desc "xyz" padded to 4
    assert parse_notes(a + b) == [Note("AB", 7, b"xyz"), Note("LONGNAME", 1, b"12345678")]
    # a desc running past the end drops that note and what follows, never reads beyond
    assert parse_notes(a + b[:-1]) == [Note("AB", 7, b"xyz")]
    assert parse_notes(a + struct.pack("<III", 0, 0, 0) + b) == [Note("AB", 7, b"xyz"),
                                                                  Note("", 0, b"")]
    assert parse_notes(b"\x01\x00") == []
    huge = struct.pack("<III", 4, 0xFFFFFFFF, 1) + b"NAME"
    assert parse_notes(huge + a) == []
