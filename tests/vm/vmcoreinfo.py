"""Print the VMCOREINFO note of /proc/kcore (stdlib only; runs in the guest as root).

Reads the ELF program headers, finds PT_NOTE and walks its notes by hand
(pyelftools mis-decodes some kcore core notes)."""
from __future__ import annotations

import os
import struct
import sys

PT_NOTE = 4


def vmcoreinfo(path: str = "/proc/kcore") -> str:
    with open(path, "rb", buffering=0) as f:
        ehdr = f.read(64)
        if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
            raise ValueError(f"{path} is not an ELF64 file")
        e_phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 0x36)
        for i in range(e_phnum):
            ph = os.pread(f.fileno(), e_phentsize, e_phoff + i * e_phentsize)
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", ph)
            if p_type != PT_NOTE:
                continue
            notes = os.pread(f.fileno(), p_filesz, p_offset)
            off = 0
            while off + 12 <= len(notes):
                namesz, descsz, _ntype = struct.unpack_from("<III", notes, off)
                off += 12
                name = notes[off:off + namesz].rstrip(b"\0")
                off += (namesz + 3) & ~3
                desc = notes[off:off + descsz]
                off += (descsz + 3) & ~3
                if name == b"VMCOREINFO":
                    return desc.rstrip(b"\0").decode(errors="replace")
    raise LookupError(f"no VMCOREINFO note in {path}")


if __name__ == "__main__":
    try:
        sys.stdout.write(vmcoreinfo(*sys.argv[1:]))
    except (OSError, ValueError, LookupError) as e:
        print(f"vmcoreinfo: {e}", file=sys.stderr)
        sys.exit(1)
