"""Kernel symbols from the kernel's own compressed kallsyms tables in memory.

A crash dump has no /proc/kallsyms, and a Debian vmlinux with symbols is an
850 MB -dbg package.  Since Linux 6.0 VMCOREINFO points at the tables
``/proc/kallsyms`` is made from: commit 5fd8fea935a1 ("vmcoreinfo: include
kallsyms symbols") added ``SYMBOL(kallsyms_names)``, ``kallsyms_token_table``,
``kallsyms_token_index`` and ``kallsyms_offsets``/``kallsyms_relative_base``
(or ``kallsyms_addresses``), and f09bddbd8661 ("vmcoreinfo: add
kallsyms_num_syms symbol") the count, both merged for v6.0.  drgn reads the
same tables (``libdrgn/kallsyms.c``); this is our own decoder of the format
``scripts/kallsyms.c`` writes and ``kernel/kallsyms.c`` reads:

- ``kallsyms_names``: per symbol a length in tokens, then that many token
  bytes.  Since 73bbb94466fd ("kallsyms: support "big" kernel symbols", v6.1)
  a length with bit 7 set takes a second byte: ``(b0 & 0x7f) | b1 << 7``.
- ``kallsyms_token_table``/``kallsyms_token_index``: 256 NUL-terminated
  tokens, each byte of a name expands to one.  The first character of the
  expansion is the symbol's type (``kallsyms_get_symbol_type()``); since the
  6.2 series that added ``kallsyms_seqs_of_names`` (a name-sorted index we do
  not need) scripts/kallsyms.c keeps the type a token of its own ("don't
  compress symbol types"), which changes nothing for a reader.
- addresses, in one of four forms, told apart by checking each candidate
  against every image address VMCOREINFO itself exports (``_stext``,
  ``init_uts_ns``, the kallsyms tables...):

  * ``kallsyms_addresses[]``: absolute (``!CONFIG_KALLSYMS_BASE_RELATIVE``,
    gone since v6.11);
  * ``kallsyms_relative_base + (u32)kallsyms_offsets[i]``;
  * with ``CONFIG_KALLSYMS_ABSOLUTE_PERCPU`` (x86-64 SMP before v6.15, when
    per-CPU symbols were zero-based offsets such as ``espfix_stack`` = 0x19008):
    non-negative offsets are absolute values, negative ones
    ``relative_base - 1 - offset``;
  * since a081b5789255 ("kallsyms: Get rid of kallsyms relative base", v7.0)
    place-relative: ``&kallsyms_offsets[i] + (s32)kallsyms_offsets[i]``
    (``offset_to_ptr()``), and VMCOREINFO no longer exports
    ``kallsyms_relative_base``.  Seen on Debian's 7.2.13.

Only kernel-image addresses are read (the tables live in ``.rodata``), through
a caller-supplied ``read(vaddr, size)``: this module needs no page tables.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Callable

from .errors import InspectError
from .symbols import SymbolKind, SymbolTable
from .x86 import MASK64, START_KERNEL_MAP

__all__ = ["KALLSYMS_KEYS", "has_kallsyms_tables", "decode_kallsyms", "KallsymsTables"]

#: The VMCOREINFO keys a decode needs (plus one of offsets/addresses).
KALLSYMS_KEYS = ("kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table",
                 "kallsyms_token_index")
MAX_SYMS = 4_000_000          # Debian's 6.1 has about 190,000 with KALLSYMS_ALL
MAX_NAMES_BYTES = 64 << 20
CHUNK = 1 << 16
#: The fix when the dump's own kallsyms tables cannot be used ({symbols}: the CLI's words).
PASS_SYMBOLS = "pass the kernel's System.map or vmlinux as {symbols}"
#: Symbol types /proc/kallsyms shows (nm's letters).
VALID_TYPES = frozenset("ABbCDdGgiNnpRrSsTtUuVvWw?")

Reader = Callable[[int, int], bytes]


def _sym(info: Mapping[str, str], name: str) -> int | None:
    v = info.get(f"SYMBOL({name})")
    if v is None:
        return None
    try:
        return int(v, 16)
    except ValueError:
        return None


def _need(info: Mapping[str, str], name: str) -> int:
    """A ``SYMBOL(name)`` that :func:`has_kallsyms_tables` has already required."""
    addr = _sym(info, name)
    if addr is None:
        raise InspectError(f"VMCOREINFO has no usable SYMBOL({name})",
                           "the dump is damaged; " + PASS_SYMBOLS)
    return addr


def has_kallsyms_tables(info: Mapping[str, str]) -> bool:
    return all(_sym(info, k) is not None for k in KALLSYMS_KEYS) and (
        _sym(info, "kallsyms_offsets") is not None or _sym(info, "kallsyms_addresses") is not None)


class KallsymsTables:
    """The raw tables, read once."""

    def __init__(self, info: Mapping[str, str], read: Reader, source: str) -> None:
        self.source = source
        self.read = read
        self.info = info
        self.num_syms = struct.unpack("<I", read(_need(info, "kallsyms_num_syms"), 4))[0]
        if not 0 < self.num_syms <= MAX_SYMS:
            raise InspectError(f"{source}: kallsyms_num_syms reads as {self.num_syms}",
                               "the dump is damaged; " + PASS_SYMBOLS)
        self.token_index = struct.unpack("<256H", read(_need(info, "kallsyms_token_index"), 512))
        self.tokens = self._tokens(_need(info, "kallsyms_token_table"))

    def _tokens(self, table: int) -> list[bytes]:
        size = max(self.token_index) + 1024
        if size > 1 << 20:
            raise InspectError(f"{self.source}: kallsyms_token_index points {size:#x} bytes "
                               "into the token table", "the dump is damaged; " + PASS_SYMBOLS)
        blob = self.read(table, size)
        out = []
        for i in self.token_index:
            end = blob.find(b"\0", i)
            if end < 0:
                raise InspectError(f"{self.source}: a kallsyms token is not NUL-terminated",
                                   "the dump is damaged; " + PASS_SYMBOLS)
            out.append(blob[i:end])
        return out

    def names(self, big: bool) -> list[tuple[str, str]] | None:
        """(type, name) per symbol, or None when the stream does not decode
        cleanly under this reading of the length byte."""
        base = _need(self.info, "kallsyms_names")
        buf = b""
        tokens = self.tokens
        out: list[tuple[str, str]] = []
        off = 0
        for _ in range(self.num_syms):
            if off + 2 + 0x7FFF > len(buf):              # enough for any one name
                if len(buf) >= MAX_NAMES_BYTES:
                    return None
                buf += self.read(base + len(buf), CHUNK)
                if off + 2 > len(buf):
                    return None
            n = buf[off]
            if n & 0x80 and big:
                n = (n & 0x7F) | (buf[off + 1] << 7)
                off += 1
            off += 1
            while off + n > len(buf):
                buf += self.read(base + len(buf), CHUNK)
            if n == 0:
                return None
            text = b"".join([tokens[b] for b in buf[off:off + n]])
            off += n
            if len(text) < 2:
                return None
            try:
                s = text.decode("ascii")
            except UnicodeDecodeError:
                return None
            if s[0] not in VALID_TYPES or not s[1:].isprintable() or " " in s:
                return None
            out.append((s[0], s[1:]))
        self.names_end = base + off
        return out

    def addresses(self) -> dict[str, list[int]]:
        """Every candidate reading of the address table."""
        n = self.num_syms
        cands: dict[str, list[int]] = {}
        addrs = _sym(self.info, "kallsyms_addresses")
        if addrs is not None:
            cands["absolute"] = list(struct.unpack(f"<{n}Q", self.read(addrs, 8 * n)))
        offs_at = _sym(self.info, "kallsyms_offsets")
        if offs_at is None:
            return cands
        raw = self.read(offs_at, 4 * n)
        unsigned = struct.unpack(f"<{n}I", raw)
        signed = struct.unpack(f"<{n}i", raw)
        base_at = _sym(self.info, "kallsyms_relative_base")
        if base_at is not None:
            base = struct.unpack("<Q", self.read(base_at, 8))[0]
            cands["relative"] = [(base + u) & MASK64 for u in unsigned]
            cands["absolute-percpu"] = [s if s >= 0 else (base - 1 - s) & MASK64
                                        for s in signed]
        cands["place-relative"] = [(offs_at + 4 * i + s) & MASK64 for i, s in enumerate(signed)]
        return cands


def decode_kallsyms(info: Mapping[str, str], read: Reader, source: str) -> SymbolTable:
    """The kernel's symbol table, decoded from its kallsyms tables through *read*
    (kernel-image virtual address, size -> bytes).

    Raises InspectError when VMCOREINFO lacks the tables (kernels before 6.0)
    or nothing decodes consistently.
    """
    release = info.get("OSRELEASE", "?")
    if not has_kallsyms_tables(info):
        raise InspectError(
            f"{source}: VMCOREINFO has no kallsyms tables (SYMBOL(kallsyms_names) and the "
            f"rest are exported since Linux 6.0, commits 5fd8fea935a1 and f09bddbd8661): "
            f"kernel {release} is older, or built without CONFIG_KALLSYMS",
            f"pass this kernel's System.map or vmlinux as {{symbols}} (Debian: "
            f"linux-image-{release}-dbg), or its /proc/kallsyms saved on the same build")
    tables = KallsymsTables(info, read, source)
    decoded = tables.names(big=True)
    if decoded is None:
        decoded = tables.names(big=False)         # a 6.0 kernel: one length byte
    if decoded is None:
        raise InspectError(f"{source}: the kallsyms name table of {release} does not decode",
                           "the dump is damaged or the format is new: " + PASS_SYMBOLS)
    exported = {k[7:-1]: int(v, 16) for k, v in info.items()
                if k.startswith("SYMBOL(") and k.endswith(")") and _is_hex(v)}
    first: dict[str, int] = {}
    for i, (_t, name) in enumerate(decoded):
        first.setdefault(name, i)
    checks = {n: a for n, a in exported.items() if n in first and a >= START_KERNEL_MAP}
    if "_stext" not in checks:
        raise InspectError(f"{source}: _stext is not both in VMCOREINFO and kallsyms, so the "
                           "kallsyms addresses cannot be checked", PASS_SYMBOLS)
    chosen = None
    for form, addrs in tables.addresses().items():
        if all(addrs[first[n]] == a for n, a in checks.items()):
            chosen = (form, addrs)
            break
    if chosen is None:
        raise InspectError(f"{source}: no reading of kallsyms_offsets agrees with the "
                           f"symbols VMCOREINFO exports ({', '.join(sorted(checks))})",
                           "the dump is damaged or the format is new: " + PASS_SYMBOLS)
    form, addrs = chosen
    addresses: dict[str, int] = {}
    types: dict[str, str] = {}
    for (t, name), a in zip(decoded, addrs):
        if name not in addresses:
            addresses[name] = a
            types[name] = t
    table = SymbolTable(f"{source} (kallsyms tables in memory)", SymbolKind.KALLSYMS,
                        addresses, types)
    table.kallsyms_form = form                      # type: ignore[attr-defined]
    table.kallsyms_count = len(decoded)             # type: ignore[attr-defined]
    return table


def _is_hex(v: str) -> bool:
    try:
        int(v, 16)
    except ValueError:
        return False
    return True
