"""VMCOREINFO: the kernel's ``KEY=VALUE`` note, parsed once and checked where it is parsed.

The kernel writes it in ``kernel/vmcore_info.c`` (``OSRELEASE=%s``, ``PAGESIZE=%ld``,
``SYMBOL(name)=%lx``, ``NUMBER(name)=%ld``) and, for x86-64, in
``arch/x86/kernel/machine_kexec_64.c`` ``arch_crash_save_vmcoreinfo()``
(``NUMBER(phys_base)``, ``SYMBOL(init_top_pgt)``, ``NUMBER(pgtable_l5_enabled)=%d``,
``KERNELOFFSET=%lx``) and ``NUMBER(sme_mask)``.  The note may come from a hostile file:
every value the inspector uses is checked for type and range here, and a bad one ends in
one line naming the file, the key and the value (:class:`~inspector.errors.InspectError`).

Values that are well-formed but inconsistent (a KASLR offset or ``phys_base`` that is not
a multiple of ``CONFIG_PHYSICAL_ALIGN``) are kept: the audit reports them as findings.

>>> info = VmcoreInfo.parse(b"OSRELEASE=6.1.0-56-amd64\\nKERNELOFFSET=24600000\\n", "core")
>>> info.osrelease, hex(info.kernel_offset)
('6.1.0-56-amd64', '0x24600000')
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import InspectError
from .x86 import KERNEL_IMAGE_SIZE, PAGE_SHIFT, PAGE_SIZE, PHYSICAL_MASK_SHIFT

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import NoReturn

__all__ = ["VmcoreInfo"]

#: ``__NEW_UTS_LEN`` (include/uapi/linux/utsname.h).
UTS_LEN = 64

_HEX = re.compile(r"(?:0x)?[0-9a-fA-F]{1,16}\Z")
_DEC = re.compile(r"-?[0-9]{1,20}\Z")
_FIX = "the core's VMCOREINFO note is damaged: capture the core again"


class VmcoreInfo(Mapping):       # of str to str
    """The raw ``KEY -> VALUE`` strings (a read-only mapping) plus the checked values
    the inspector uses as attributes (None when the key is absent)."""

    def __init__(self, raw: dict[str, str], source: str) -> None:
        self._raw = raw
        self.source = source
        self.osrelease: str | None = self._osrelease()
        self.kernel_offset: int | None = self._hex("KERNELOFFSET", KERNEL_IMAGE_SIZE)
        phys_limit = 1 << PHYSICAL_MASK_SHIFT
        self.phys_base: int | None = self._number("NUMBER(phys_base)", -phys_limit, phys_limit)
        self.pgtable_l5_enabled: int | None = self._number("NUMBER(pgtable_l5_enabled)", 0, 2)
        self.sme_mask: int | None = self._sme_mask()
        self.page_offset: int | None = self._hex_any("NUMBER(page_offset_base)")
        pagesize = self._number("PAGESIZE", 1, 1 << 31)
        if pagesize is not None and pagesize != PAGE_SIZE:
            self._bad("PAGESIZE", "x86-64 pages are 4096 bytes")
        self.symbols: dict[str, int] = self._symbols()

    @classmethod
    def parse(cls, desc: bytes, source: str) -> VmcoreInfo:
        """Parse the note's bytes (latin-1, so any byte is a character)."""
        raw: dict[str, str] = {}
        for line in desc.rstrip(b"\0").decode("latin-1").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                raw[key.strip()] = value.strip()
        return cls(raw, source)

    # -- Mapping ---------------------------------------------------------------
    def __getitem__(self, key: str) -> str:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    # -- checks ----------------------------------------------------------------
    def _bad(self, key: str, why: str) -> NoReturn:
        shown = self._raw.get(key, "")
        raise InspectError(f"{self.source}: VMCOREINFO {key}={shown[:40]!r} is not valid "
                           f"({why})", _FIX)

    def _osrelease(self) -> str | None:
        v = self._raw.get("OSRELEASE")
        if v is None:
            return None
        if not v or len(v) > UTS_LEN or not v.isprintable():
            self._bad("OSRELEASE", f"a kernel release is 1..{UTS_LEN} printable characters")
        return v

    def _hex(self, key: str, limit: int) -> int | None:
        v = self._hex_any(key)
        if v is not None and v >= limit:
            self._bad(key, f"must be below {limit:#x}")
        return v

    def _hex_any(self, key: str) -> int | None:
        v = self._raw.get(key)
        if v is None:
            return None
        if not _HEX.match(v):
            self._bad(key, "expected a hexadecimal number")
        return int(v, 16)

    def _number(self, key: str, lo: int, hi: int) -> int | None:
        """``NUMBER()`` values are ``%ld`` (decimal, signed); hex is accepted too."""
        v = self._raw.get(key)
        if v is None:
            return None
        if _DEC.match(v):
            n = int(v, 10)
        elif v.startswith("0x") and _HEX.match(v):
            n = int(v, 16)
        else:
            self._bad(key, "expected a decimal number")
        if not lo <= n < hi:
            self._bad(key, f"must be in {lo}..{hi - 1}")
        return n

    def _sme_mask(self) -> int | None:
        """0, or the one SME/SEV C-bit: a single bit of the physical address width
        (CPUID 0x8000001F reports its position, 47 or 51 on real parts)."""
        n = self._number("NUMBER(sme_mask)", 0, 1 << 64)
        if n and (n & (n - 1) or not (1 << PAGE_SHIFT) <= n < (1 << PHYSICAL_MASK_SHIFT)):
            self._bad("NUMBER(sme_mask)", "the SME mask is 0 or one bit 12..51")
        return n

    def _symbols(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in self._raw:
            if key.startswith("SYMBOL(") and key.endswith(")"):
                out[key[7:-1]] = self._hex_any(key)       # type: ignore[assignment]
        return out
