"""inspector/symbols.py on its own: kallsyms/System.map parsing (module lines, types,
duplicates, refusals), the targeted scan of a live kallsyms (same answers as the full
parse, names found late), SymbolTable (lookups, shifting by a KASLR offset, the per-CPU
convention) and load_symbols on files."""

from __future__ import annotations

import pytest

from inspector.errors import InspectError
from inspector.symbols import (DEBIAN_PLACEHOLDER, SymbolKind, SymbolTable, load_symbols,
                               parse_symbol_text, read_own_lines, scan_symbol_text)

KALLSYMS = """\
0000000000000000 A fixed_percpu_data
000000000001a000 A espfix_waddr
000000000001a008 A espfix_stack
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff8102a3c0 T init_espfix_ap
ffffffff8102a3c0 t init_espfix_ap
ffffffff82a00100 D linux_banner
ffffffff83010000 b espfix_pages
ffffffffc0a01000 t espfix_pages\t[some_module]
ffffffffc0a02000 t only_in_module\t[some_module]
"""
NAMES = ["espfix_stack", "espfix_waddr", "init_espfix_ap", "linux_banner", "espfix_pages"]


def test_parse_kallsyms() -> None:
    t = parse_symbol_text(KALLSYMS, "/proc/kallsyms", SymbolKind.KALLSYMS)
    assert t["_text"] == 0xFFFFFFFF81000000 and t["espfix_stack"] == 0x1A008
    assert t.types["init_espfix_ap"] == "T"               # the first of two lines
    assert t["espfix_pages"] == 0xFFFFFFFF83010000        # the module's is dropped
    assert "only_in_module" not in t and t.get("only_in_module") is None
    assert t.used == {"_text", "espfix_stack", "espfix_pages", "only_in_module"}
    with pytest.raises(InspectError) as e:
        t["nope"]
    assert "symbol nope is not in /proc/kallsyms" in e.value.cause


def test_parse_skips_malformed_lines() -> None:
    text = ("junk\nffffffff81000000 T _text\nzzzz T bad_addr\n"
            "ffffffff81000010 TT two_letters\n11112222333344445 T seventeen_digits\n")
    t = parse_symbol_text(text, "map", SymbolKind.SYSTEM_MAP)
    assert t.addresses == {"_text": 0xFFFFFFFF81000000}


@pytest.mark.parametrize("text, source, words", [
    ("", "map", "holds no symbols"),
    ("ffffffffffffffff B " + DEBIAN_PLACEHOLDER + "-<version>-dbg package\n", "map",
     "Debian's placeholder"),
    ("0000000000000000 T _text\n0000000000000000 T foo\n", "/proc/kallsyms",
     "kptr_restrict hides"),
    ("0000000000000000 T _text\n", "saved.txt", "shows every address as 0"),
    ("ffffffff81000000 T foo\n", "map", "no _text or _stext"),
])
def test_parse_refuses(text: str, source: str, words: str) -> None:
    with pytest.raises(InspectError) as e:
        parse_symbol_text(text, source, SymbolKind.SYSTEM_MAP)
    assert words in e.value.cause


def test_scan_gives_what_the_parse_gives_for_the_names() -> None:
    full = parse_symbol_text(KALLSYMS, "k", SymbolKind.KALLSYMS)
    scanned = scan_symbol_text(KALLSYMS.encode(), "k", SymbolKind.KALLSYMS, NAMES)
    assert scanned.addresses == {n: full.addresses[n] for n in [*NAMES, "_text", "_stext"]}
    assert scanned.types == {n: full.types[n] for n in scanned.addresses}
    # a prefix of a wanted name is not that name
    t = scan_symbol_text(KALLSYMS.encode(), "k", SymbolKind.KALLSYMS, ["espfix"])
    assert "espfix" not in t.addresses


def test_scan_finds_other_names_late_by_rereading() -> None:
    rereads = []

    def reread() -> bytes:
        rereads.append(1)
        return KALLSYMS.encode()
    t = scan_symbol_text(KALLSYMS.encode(), "k", SymbolKind.KALLSYMS, ["espfix_stack"], reread)
    assert "linux_banner" not in t.addresses
    assert t["linux_banner"] == 0xFFFFFFFF82A00100 and t.late == ["linux_banner"]
    assert t.get("missing") is None and t.get("missing") is None     # searched once
    assert t.late == ["linux_banner", "missing"] and len(rereads) == 2
    assert t.get("espfix_waddr") == 0x1A000                            # one more search
    # a name scanned for is never searched again, nor one of a module
    assert t.get("only_in_module") is None and "espfix_stack" in t


def test_scan_falls_back_to_the_parse_for_its_errors() -> None:
    with pytest.raises(InspectError) as e:
        scan_symbol_text(b"0000000000000000 T _text\n", "/proc/kallsyms",
                         SymbolKind.KALLSYMS, NAMES)
    assert "kptr_restrict" in e.value.cause
    # no final newline: the last line still counts
    t = scan_symbol_text(b"ffffffff81000000 T _text", "k", SymbolKind.KALLSYMS, [])
    assert t["_text"] == 0xFFFFFFFF81000000


def test_shifted_moves_image_symbols_only() -> None:
    t = parse_symbol_text(KALLSYMS, "map", SymbolKind.SYSTEM_MAP)
    s = t.shifted(0x1E000000)
    assert s["_text"] == 0xFFFFFFFF9F000000 and s["espfix_stack"] == 0x1A008
    assert s.shift == 0x1E000000 and s.kind == SymbolKind.SYSTEM_MAP
    assert s.shifted(-0x1E000000 & (1 << 64) - 1)["_text"] == 0xFFFFFFFF81000000
    assert t.shifted(0) is t


def test_percpu_convention() -> None:
    def table(**addrs: int) -> SymbolTable:
        return SymbolTable("t", SymbolKind.KALLSYMS, dict(addrs))
    assert table(__per_cpu_start=0).is_percpu_zero_based()
    assert not table(__per_cpu_start=0xFFFFFFFF83000000).is_percpu_zero_based()
    assert table(espfix_stack=0x1A008).is_percpu_zero_based()
    assert not table(espfix_stack=0xFFFFFFFF8301A008).is_percpu_zero_based()
    assert not table().is_percpu_zero_based()


def test_load_symbols_from_files(tmp_path) -> None:
    m = tmp_path / "System.map"
    m.write_text(KALLSYMS)
    t = load_symbols(str(m))
    assert t.kind == SymbolKind.SYSTEM_MAP and t["linux_banner"] == 0xFFFFFFFF82A00100
    k = tmp_path / "kallsyms"
    k.write_text(KALLSYMS)
    scanned = load_symbols(str(k), ["espfix_stack"])
    assert scanned.kind == SymbolKind.KALLSYMS and set(scanned.addresses) == {
        "espfix_stack", "_text", "_stext"}
    assert scanned["linux_banner"] == 0xFFFFFFFF82A00100        # reread from the file
    (tmp_path / "bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(InspectError) as e:
        load_symbols(str(tmp_path / "bin"))
    assert "neither a vmlinux nor kallsyms/System.map text" in e.value.cause
    with pytest.raises(InspectError):
        load_symbols(str(tmp_path))                            # a directory


def test_read_own_lines_stops_at_the_chunk_with_the_first_module_line(tmp_path) -> None:
    own = "".join(f"ffffffff81{i:06x} T sym{i}\n" for i in range(200))
    text = (own + "ffffffffc0000000 t m\t[mod]\n" + own).encode()
    p = tmp_path / "kallsyms"
    p.write_bytes(text)
    with open(p, "rb") as fh:
        data = read_own_lines(fh, str(p), chunk=1024)
    first_module = text.index(b"\t[")
    assert first_module < len(data) <= first_module + 1024 and text.startswith(data)
