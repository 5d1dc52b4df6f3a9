"""The fast paths of issue 13 give what the plain ones give.

Speed itself is measured in bench/ (never asserted here); these tests hold each
shortcut to the straightforward code it replaces: the targeted kallsyms scan to the
full symbol table, the struct reader of core headers to pyelftools.
"""

from __future__ import annotations

import os

import pytest

from inspector import symbols, target
from inspector.cli import main
from inspector.errors import InspectError
from inspector.symbols import SymbolKind, parse_symbol_text, scan_symbol_text
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
    full = parse_symbol_text(text, "/proc/kallsyms", SymbolKind.KALLSYMS)
    names = sorted(full.addresses) + ["absent_symbol", "espfix", "_tex"]
    table = scan_symbol_text(text.encode(), "/proc/kallsyms", SymbolKind.KALLSYMS, names)
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
        parse_symbol_text(text, "/proc/kallsyms", SymbolKind.KALLSYMS)
    with pytest.raises(InspectError) as scan:
        scan_symbol_text(text.encode(), "/proc/kallsyms", SymbolKind.KALLSYMS,
                         target.LIVE_SYMBOLS)
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


# -- JSON: the same text, written column by column -------------------------------------

def test_jsonfmt_writes_what_json_dumps_writes():
    import json

    from inspector.jsonfmt import Columns, dumps
    n = 9000
    cols = {"cpu": list(range(n)), "ok": [i % 3 > 0 for i in range(n)],
            "hex": [hex(i) if i % 4 else None for i in range(n)],
            "node": [i % 2 if i % 5 else None for i in range(n)],
            "frame": [{"rax": hex(i), "ss": "0x7"} if i % 7 == 0 else None for i in range(n)],
            "odd%s\u00e9": ["caf\u00e9 \"%d\"\n" for i in range(n)],
            "mixed": [[1.5, float("nan"), {}] if i % 2 else {"k": []} for i in range(n)]}
    table = Columns(tuple(cols), list(cols.values()))
    doc = {"ok": True, 1: None, 2.5: -float("inf"), None: (1, 2), "empty": Columns((), []),
           "cpus": table, "nested": [Columns(("a",), [[{}, None]]), {}, []]}
    plain = {"ok": True, 1: None, 2.5: -float("inf"), None: (1, 2), "empty": [],
             "cpus": table.rows(), "nested": [[{"a": {}}, {"a": None}], {}, []]}
    assert dumps(doc) == json.dumps(plain, indent=2)


HOSTS = {"none": lambda k: None, "numa": lambda k: k.host_facts()}
SPECS = {"l5-frames": dict(frames={0: (1, 2, 0x33, 0x246, 0x1234FFE0, 7), 3: (3, 4, 0x23, 2, 8, 0xF)}),
         "l4-pti-partial": dict(levels=4, pti=True, nr_cpus=200, online=list(range(0, 200, 3)),
                                brought_up=list(range(0, 200, 2)), nodes=2),
         "relative-2groups": dict(percpu="relative", nr_cpus=1100, nodes=3)}


@pytest.mark.parametrize("fault", ["clean", "bad-stack", "walk", "null-pages", "statics"])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("host", list(HOSTS))
def test_report_writers_print_what_dumps_prints(inspect, spec, fault, host):
    import io

    from inspector import report
    from tests.helpers.faults import BY_NAME
    k = kernel(**SPECS[spec])
    if fault != "clean":
        BY_NAME[fault](k)
    state, result = inspect(k, host=HOSTS[host](k))
    out = io.StringIO()
    report.write_validate_json(out, state, result)
    assert out.getvalue() == report.dumps(report.validate_json(state, result)) + "\n"
    for cpus in (list(state.cpus), list(state.cpus)[::-7]):
        assert _text_or_error(lambda out, cpus=cpus: report.write_stacks_json(out, state, cpus)) == \
            _text_or_error(lambda out, cpus=cpus: out.write(report.dumps(report.stacks_json(state, cpus))
                                                            + "\n"))


def _text_or_error(write) -> str:
    """What *write* writes to a StringIO, or the error it raises (the "walk" fault
    points a PTE at a page the core lacks: stacks stops there, one way or the other)."""
    import io
    out = io.StringIO()
    try:
        write(out)
    except InspectError as e:
        return f"error: {e.line()}"
    return out.getvalue()


@pytest.mark.parametrize("cpus", [[0], list(range(4)), list(range(5000)), [3, 64, 1023, 1024, 131071]])
@pytest.mark.parametrize("levels", [4, 5])
def test_layout_writer_prints_what_dumps_prints(cpus, levels):
    import io

    from inspector import model, report
    rnd = model.Randomness.from_rand(0x5EED1234ABCD)
    out = io.StringIO()
    report.write_layout_json(out, cpus, rnd, levels)
    plain = report.layout_json([model.cpu_layout(c, rnd, levels) for c in cpus],
                               model.group_layouts(cpus, rnd), model.memory_cost(cpus), rnd,
                               levels)
    assert out.getvalue() == report.dumps(plain) + "\n"


@pytest.mark.parametrize("rnd", [(0, 0), (2047, 63), (687, 13)])
def test_vectorised_layout_is_the_formula(rnd):
    from inspector import model
    r = model.Randomness(*rnd)
    cpus = list(range(model.ESPFIX_MAX_CPUS))
    assert model.espfix_base_addrs(cpus, *rnd) == [model.espfix_base_addr(c, *rnd) for c in cpus]
    for levels in (4, 5):
        cols = model.layout_columns(cpus, r, levels)
        for cpu in cpus[::997] + [cpus[-1]]:
            want = model.cpu_layout(cpu, r, levels).as_dict()
            got = {k: v[cpu] for k, v in cols.items()}
            assert {**got, "espfix_stack": hex(got["espfix_stack"])} == want
    with pytest.raises(ValueError):
        model.layout_columns([model.ESPFIX_MAX_CPUS], r)


def test_frames_read_each_stack_page_once(inspect):
    k = kernel(nr_cpus=300, frames={c: (c + 1, 2, 0x33, 0x246, 0xFFF0, 7) for c in (0, 63, 64, 299)})
    state, _ = inspect(k)
    fetches = dict(state.reader.mem.stats.page_fetches)
    frames = state.frames(list(state.cpus))
    assert frames == [state.frame(c) for c in state.cpus]
    assert [c for c, f in zip(state.cpus, frames) if f] == [0, 63, 64, 299]
    new = state.reader.mem.stats.page_fetches
    assert sum(new.values()) - sum(fetches.values()) == 5          # 300 CPUs: 5 stack pages
    assert state.reader.mem.stats.max_fetches_per_page() == 1


# -- per-CPU words: one batch of positioned reads --------------------------------------

@pytest.mark.parametrize("path", ["samples/bookworm-6.1-l5.core", "samples/sid-7.x-l4-pti.core",
                                  "synthetic"])
def test_batched_virtual_reads_are_single_reads(path, write_kernel):
    from inspector.elfcore import ElfCore
    if path == "synthetic":
        path, _ = write_kernel(kernel(nr_cpus=100, percpu="relative"))
    else:
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), path)
    core = ElfCore(path)
    addrs = []
    for s in core.segments:                 # starts, ends, the file/memory boundary, gaps
        for a in (s.vaddr, s.vaddr + 8, s.vaddr + s.filesz - 16, s.vaddr + s.filesz - 4,
                  s.vaddr + s.memsz - 16, s.vaddr + s.memsz, s.vaddr - 16):
            addrs.append(a & ((1 << 64) - 1))
    before = core.reads
    one_by_one = [core.read_vaddr(a, 16) for a in addrs]
    singles = core.reads - before
    assert core.read_vaddrs(addrs, 16) == one_by_one
    assert core.reads - before == 2 * singles
    core.close()


def test_load_state_reads_each_cpu_once(inspect):
    k = kernel(nr_cpus=3000, online=list(range(0, 3000, 2)))
    state, result = inspect(k)
    stats = state.reader.mem.stats
    # the per-CPU pair of every possible CPU, and a handful of image words
    assert len(state.cpus) <= stats.small_reads <= len(state.cpus) + 20
    assert [c for c, st in state.cpus.items() if st.espfix_stack] == list(range(0, 3000, 2))
    assert stats.max_fetches_per_page() == 1
    assert result.ok


# -- imports: the JSON paths leave the heavy modules alone ------------------------------

@pytest.mark.parametrize("argv", [["validate", "--json"], ["stacks", "--json"],
                                  ["layout", "--cpus", "8", "--json"]])
def test_json_commands_import_no_heavy_module(write_kernel, argv):
    """pyelftools (a core or a vmlinux that needs it), tabulate (tables), ctypes (the
    exerciser) and BCC (trace) cost seconds under TCG, dataclasses (with inspect) and
    typing tenths of one; --json needs none of them.  Run without site (-S), whose .pth
    files may import typing themselves."""
    import json
    import subprocess
    import sys
    core, syms = write_kernel(kernel())
    if argv[0] != "layout":
        argv = [*argv, "--core", core, "--symbols", syms]
    code = ("import io, json, sys, contextlib\n"
            "from inspector.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = main({argv!r})\n"
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('elftools', 'tabulate', 'ctypes', 'bcc', 'dataclasses', 'inspect', "
            "'typing'))]))\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rc, heavy = json.loads(out.stdout)
    assert rc == 0 and heavy == [], out.stderr


def test_live_read_stops_at_the_first_module_line(tmp_path):
    import io
    text = kernel().symbol_text()
    modules = "".join(f"ffffffffc0{i:06x} t mod_sym_{i}\t[mod]\n" for i in range(2000))
    data = (text + modules).encode()
    got = symbols.read_own_lines(io.BytesIO(data), "kallsyms", chunk=len(text) + 100)
    assert got == data[:len(text) + 100]                 # one chunk, then the modules
    assert symbols.read_own_lines(io.BytesIO(text.encode()), "kallsyms", chunk=999) == text.encode()
    path = tmp_path / "kallsyms"
    path.write_bytes(data)
    names = ["_text", "init_top_pgt", "espfix_stack", "mod_sym_5"]
    table = symbols.load_symbols(str(path), names)
    full = symbols.load_symbols(str(path))
    assert {n: table.addresses.get(n) for n in names} == {n: full.addresses.get(n) for n in names}
    assert table.addresses["espfix_stack"] and "mod_sym_5" not in table.addresses


def test_numbered_entries_are_what_glob_finds(tmp_path):
    import glob

    from inspector.hostfacts import _numbered
    for name in ("node0", "node12", "node", "nodeX", ".node1", "xnode3", "memory7", "node3a"):
        (tmp_path / name).mkdir()
    for prefix in ("node", "memory", "absent"):
        assert sorted(_numbered(str(tmp_path), prefix)) == \
            sorted(glob.glob(f"{tmp_path}/{prefix}[0-9]*"))
    assert _numbered(str(tmp_path / "missing"), "node") == []
