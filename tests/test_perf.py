"""The fast paths of issue 13 give what the plain ones give.

Speed itself is measured in bench/ (never asserted here); these tests hold each
shortcut to the straightforward code it replaces: the targeted kallsyms scan to the
full symbol table, the struct reader of core headers to pyelftools.
"""

from __future__ import annotations

import pytest

from inspector import symbols, target
from inspector.cli import main
from inspector.errors import InspectError
from inspector.symbols import parse_symbol_text, scan_symbol_text
from tests.conftest import kernel

# -- kallsyms: the targeted scan --------------------------------------------------------

EXTRA = """\
ffffffffc0a00000 t espfix_stack\t[evil]
ffffffffc0a00010 T init_top_pgt\t[evil]
ffffffff81000000 T _text_end
ffffffff81000008 t x_text
ffffffff81000010 d linux_banner_copy
garbage line
ffffffffzz000000 T page_random
ffffffff81000020 DD slot_random
"""


def text_with_traps() -> str:
    """A synthetic kallsyms with module lines, near-miss names, bad lines and a
    duplicate, before the real lines."""
    return EXTRA + kernel().symbol_text() + "ffffffff81999999 D init_top_pgt\n"


def test_scan_matches_the_full_table():
    text = text_with_traps()
    full = parse_symbol_text(text, "/proc/kallsyms", "kallsyms")
    names = sorted(full.addresses) + ["absent_symbol", "espfix", "_tex"]
    table = scan_symbol_text(text.encode(), "/proc/kallsyms", "kallsyms", names)
    for name in names:
        assert table.addresses.get(name) == full.addresses.get(name), name
        assert table.types.get(name) == full.types.get(name), name
    assert table.late == []


@pytest.mark.parametrize("text", [
    "",
    "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n",
    "".join("0000000000000000 " + ln.split(" ", 1)[1] + "\n"
            for ln in kernel().symbol_text().splitlines()),
    "ffffffff81000000 T startup_64\nffffffff82000000 D init_top_pgt\n",
], ids=["empty", "debian-placeholder", "kptr-restrict", "no-text"])
def test_scan_refuses_what_the_parser_refuses(text):
    with pytest.raises(InspectError) as full:
        parse_symbol_text(text, "/proc/kallsyms", "kallsyms")
    with pytest.raises(InspectError) as scan:
        scan_symbol_text(text.encode(), "/proc/kallsyms", "kallsyms", target.LIVE_SYMBOLS)
    assert scan.value.line() == full.value.line()


def test_late_names_are_found_by_rereading(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(kernel().symbol_text())
    table = symbols.load_symbols(str(path), ["_text", "init_top_pgt"])
    assert set(table.addresses) <= {"_text", "_stext", "init_top_pgt"}
    full = symbols.load_symbols(str(path))
    assert table["nr_cpu_ids"] == full["nr_cpu_ids"]
    assert "no_such_symbol" not in table and table.get("no_such_symbol") is None
    assert table.late == ["nr_cpu_ids", "no_such_symbol"]


def _as_live(monkeypatch, core: str, syms: str, scan: bool = True) -> list:
    """Make open_target treat *core*/*syms* as /proc/kcore + /proc/kallsyms; return
    the tables the targeted scan builds."""
    monkeypatch.setattr(target, "KCORE_PATH", core)
    monkeypatch.setattr(target, "KALLSYMS_PATH", syms)
    if not scan:
        monkeypatch.setattr(target, "live_symbol_names", lambda info: None)
    tables: list = []
    real = symbols.scan_symbol_text

    def spy(*args, **kwargs):
        tables.append(real(*args, **kwargs))
        return tables[-1]
    monkeypatch.setattr(symbols, "scan_symbol_text", spy)
    return tables


@pytest.mark.parametrize("spec", [dict(), dict(levels=4, pti=True, percpu="relative"),
                                  dict(statics=False, nr_cpus=70)],
                         ids=["l5", "l4-pti-relative", "no-statics"])
def test_live_scan_serves_every_lookup_and_changes_no_output(monkeypatch, write_kernel,
                                                              capsys, tmp_path, spec):
    """validate, stacks, snapshot and a watch round on a 'live' target never ask the
    scanned table for a name outside LIVE_SYMBOLS/VMCOREINFO, and print exactly what
    the full table gives."""
    core, syms = write_kernel(kernel(**spec))
    outputs = {}
    for scan in (True, False):
        with monkeypatch.context() as m:
            tables = _as_live(m, core, syms, scan)
            runs = [["validate", "--json", "--core", core], ["validate", "--core", core],
                    ["stacks", "--json", "--core", core],
                    ["snapshot", "-o", str(tmp_path / f"snap{scan}"), "--core", core],
                    ["watch", "--json", "--core", core, "0.1", "1"]]
            for argv in runs:
                assert main(argv) in (0, 1), capsys.readouterr().err
                outputs[scan, argv[0], argv[1]] = capsys.readouterr().out
            if scan:
                assert len(tables) == len(runs)
                assert all(t.late == [] for t in tables), [t.late for t in tables]
            else:
                assert tables == []
    for key in [k for k in outputs if k[0] and k[1] in ("validate", "stacks")]:
        assert outputs[key] == outputs[(False, *key[1:])], key
