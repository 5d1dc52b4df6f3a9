"""Writing small ELF core files (snapshots; synthetic cores in the tests).

pyelftools only reads ELF, so the writer is here: an ELF64 little-endian
``ET_CORE`` for ``EM_X86_64`` with one ``PT_NOTE`` and ``PT_LOAD`` segments,
laid out like /proc/kcore (``fs/proc/kcore.c``): notes first, then segment data
page-aligned.  Output is written atomically (:func:`inspector.fileio.atomic_output`), so
a reader never sees half a core, and with mode 0600: a core holds kernel memory, the
KASLR offset and the espfix randomisation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from collections.abc import Sequence

from .elfcore import NO_PADDR
from .fileio import atomic_output
from .x86 import PAGE_MASK, PAGE_SIZE

__all__ = ["LoadSegment", "NoteEntry", "build_notes", "write_core"]

PT_LOAD = 1
PT_NOTE = 4
ET_CORE = 4
EM_X86_64 = 62
EHDR_SIZE = 64
PHDR_SIZE = 56


@dataclass(frozen=True)
class LoadSegment:
    vaddr: int
    data: bytes
    paddr: int = NO_PADDR
    memsz: int | None = None        # > len(data): the rest reads as zeros


@dataclass(frozen=True)
class NoteEntry:
    name: str
    type: int
    desc: bytes


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def build_notes(notes: Sequence[NoteEntry]) -> bytes:
    out = bytearray()
    for n in notes:
        name = n.name.encode() + b"\0"
        out += struct.pack("<III", len(name), len(n.desc), n.type)
        out += _pad4(name) + _pad4(n.desc)
    return bytes(out)


def write_core(path: str, segments: Sequence[LoadSegment], notes: Sequence[NoteEntry],
               mode: int = 0o600) -> int:
    """Write an ELF core; returns its size in bytes."""
    note_blob = build_notes(notes)
    phnum = 1 + len(segments)
    offset = EHDR_SIZE + PHDR_SIZE * phnum
    note_off = offset
    offset += len(note_blob)
    placed = []
    for seg in segments:
        offset = (offset + PAGE_SIZE - 1) & PAGE_MASK if len(seg.data) >= PAGE_SIZE \
            else (offset + 7) & ~7
        placed.append(offset)
        offset += len(seg.data)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, 1, 0, EHDR_SIZE, 0, 0,
                               EHDR_SIZE, PHDR_SIZE, phnum, 0, 0, 0)
    phdrs = [struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_off, 0, 0, len(note_blob), 0, 4)]
    for seg, off in zip(segments, placed):
        memsz = max(seg.memsz or 0, len(seg.data))
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 7, off, seg.vaddr, seg.paddr,
                                 len(seg.data), memsz, PAGE_SIZE))
    with atomic_output(path, mode) as fh:
        fh.write(ehdr)
        fh.write(b"".join(phdrs))
        fh.write(note_blob)
        pos = note_off + len(note_blob)
        for seg, off in zip(segments, placed):
            fh.write(b"\0" * (off - pos))
            fh.write(seg.data)
            pos = off + len(seg.data)
    return offset
