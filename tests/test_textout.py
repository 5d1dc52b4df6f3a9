"""Text output people can read (issue 10 item 6): findings name their CPUs (clipped
to the possible CPUs), a hidden per-CPU table leaves a count of the bad CPUs, every
table fits 120 columns, one notation for a missing value, and progress on stderr
only when stderr is a terminal.  Also: load_state reads no sysfs (item 4)."""

from __future__ import annotations

import glob
import io
import os
import random
import re
import types

import pytest
from tabulate import tabulate

from inspector import cli, hostfacts, progress, report
from inspector.audit import audit
from inspector.exercise import RoundTrip, Verdict
from inspector.hostfacts import HostFacts, target_host_facts
from inspector.model import (Randomness, cpu_layout, group_layouts, memory_cost)
from inspector.state import load_state
from inspector.target import open_target
from tests.conftest import ROOT, kernel
from tests.helpers.faults import f_bad_stack, f_missing_pud, f_nx_pte

SAMPLES = sorted(glob.glob(os.path.join(ROOT, "samples", "*.core")))
WIDTH = 120


def widest(text: str) -> int:
    """The widest line, leaving out the ``source:`` line (a path, not a table)."""
    return max(len(ln) for ln in text.split("\n") if not ln.startswith("source: "))


# -- the renderers ----------------------------------------------------------------------

def test_simple_table_draws_what_tabulate_draws():
    rng = random.Random(10)
    for _ in range(50):
        ncol = rng.randint(1, 8)
        heads = [rng.choice(["CPU", "X", "ESPFIX_STACK", "PG/SLOT", "P"]) for _ in range(ncol)]
        rows = [[rng.choice(["", "0", "ok", "0xffffff0000000000", "131071", "-"])
                 for _ in range(ncol)] for _ in range(rng.randint(0, 6))]
        assert report.simple_table(rows, heads) == tabulate(
            rows, headers=heads, tablefmt="simple", disable_numparse=True)


def test_table_cuts_wide_tables_into_panels_that_repeat_the_key():
    rows = [[cpu, *[f"{cpu * 7919 + i:#018x}" for i in range(9)]] for cpu in range(3)]
    heads = ["CPU", *[f"COL{i}" for i in range(9)]]
    text = report.table(rows, heads)
    assert widest(text) <= WIDTH
    panels = text.split("\n\n")
    assert len(panels) == 2 and all(p.startswith("CPU") for p in panels)
    # every column is there once, every row in every panel
    assert sorted(h for p in panels for h in p.split("\n")[0].split()[1:]) == sorted(heads[1:])
    assert all(len(p.split("\n")) == 2 + len(rows) for p in panels)
    assert report.table([[1, None, ""]], ["A", "B", "C"]).split("\n")[2].split() == ["1", "-", "-"]


def test_abbrev_cpus():
    assert report.abbrev_cpus([0, 1, 2, 3, 8]) == "0-3,8"
    cut = report.abbrev_cpus(range(0, 2048, 2))
    assert len(cut) <= report.CPU_CELL and cut.startswith("0,2,4") \
        and cut.endswith(",... (1024 CPUs)")


# -- validate ---------------------------------------------------------------------------

def findings_rows(text: str) -> list[list[str]]:
    lines = text.split("\n")
    at = next(i for i, ln in enumerate(lines) if ln.startswith("SEVERITY"))
    head = lines[at]
    cols = [m.start() for m in re.finditer(r"\S+", head)]
    rows = []
    for ln in lines[at + 2:]:
        if not ln:
            break
        rows.append([ln[a:b].strip() for a, b in zip(cols, cols[1:] + [None])])
    return rows


@pytest.mark.parametrize("fault, check, cpus", [
    (f_missing_pud, "pud_clones", "0-3"),          # a whole group: only the 4 possible CPUs
    (f_nx_pte, "pte_prot", "0-3"),                  # a stack page of 64: the 4 possible
    (f_bad_stack, "espfix_stack", "1"),
])
def test_findings_name_their_cpus_clipped_to_the_possible(inspect, fault, check, cpus):
    k = kernel(nr_cpus=4)
    fault(k)
    state, result = inspect(k)
    rows = [r for r in findings_rows(report.validate_text(state, result)) if r[1] == check]
    assert rows and {r[2] for r in rows} == {cpus}


def test_finding_cpus_names_the_listed_cpus_or_the_missing_mark():
    from inspector.audit import Finding
    assert report.finding_cpus(Finding("numa", "info", "m", None, {"cpus": "4-7"}),
                               set(range(8))) == "4-7"
    assert report.finding_cpus(Finding("top_entry", "error", "m"), {0}) == report.MISSING
    assert report.finding_cpus(Finding("pud_clones", "error", "m", 0, affects=range(1024)),
                               {0, 1, 5}) == "0-1,5"


def test_hidden_table_counts_the_bad_cpus(inspect):
    k = kernel(nr_cpus=100)
    f_bad_stack(k)                                  # CPU 1
    state, result = inspect(k)
    text = report.validate_text(state, result)
    assert "bad CPUs: 1 of 100 (1)" in text.split("\n")
    assert "per-CPU table of 100 CPUs omitted" in text
    clean_state, clean = inspect(kernel(nr_cpus=100))
    assert "bad CPUs: 0 of 100" in report.validate_text(clean_state, clean).split("\n")
    assert "bad CPUs" not in report.validate_text(state, result, verbose=True)


def test_long_messages_wrap_inside_the_table_and_keep_the_journal_prefix(inspect):
    k = kernel(nr_cpus=4)
    f_missing_pud(k)
    state, result = inspect(k)
    long = result.findings[0]
    long.message = "word " * 60
    text = report.validate_text(state, result, journal=True)
    assert widest(text) <= WIDTH + 3                # + the <3> priority prefix
    table = [ln for ln in text.split("\n") if ln.startswith("<3>")]
    assert len(table) >= 3                          # the wrapped lines are prefixed too


# -- every table fits 120 columns ----------------------------------------------------------

@pytest.mark.parametrize("core", SAMPLES, ids=os.path.basename)
def test_sample_tables_fit(core):
    target = open_target(core, None)
    try:
        state = load_state(target, target_host_facts(target))
        result = audit(state)
        for text in (report.validate_text(state, result),
                     report.validate_text(state, result, verbose=True),
                     report.stacks_text(state, list(state.cpus))):
            lines = [ln for ln in text.split("\n") if not ln.startswith("source: ")]
            assert max(map(len, lines)) <= WIDTH, text
            assert "(none)" not in text
    finally:
        target.close()


@pytest.mark.parametrize("spec", [dict(nr_cpus=4096, levels=4), dict(nr_cpus=2000, pti=True)])
def test_many_cpu_tables_fit(inspect, spec):
    k = kernel(**spec)
    f_nx_pte(k)
    f_bad_stack(k)
    state, result = inspect(k)
    for text in (report.validate_text(state, result, verbose=True),
                 report.stacks_text(state, list(state.cpus))):
        assert widest(text) <= WIDTH


def test_stacks_marks_missing_cells_alike(inspect):
    state, _ = inspect(kernel(nr_cpus=8, online=[0, 1]))
    text = report.stacks_text(state, list(state.cpus))
    rows = [ln.split() for ln in text.split("\n") if ln.startswith("5 ")]
    assert rows and all(set(r[1:]) == {"-"} for r in rows)     # offline CPU 5, both panels


def test_layout_tables_fit():
    rnd = Randomness(1197, 48)
    for cpus in (list(range(131072))[:5000], list(range(0, 40000, 3)), [0, 131071]):
        text = report.layout_text([cpu_layout(c, rnd, 5) for c in cpus],
                                  group_layouts(cpus, rnd), memory_cost(cpus), rnd, 5)
        assert widest(text) <= WIDTH


def test_exercise_table_fits():
    frame = {"rax": 0, "rip": 0x402C5104, "cs": 0x23, "rflags": 0x246,
             "rsp": 0xFFFFFF143F217FF0, "ss": 0xF}
    rounds = [RoundTrip(cpu, "compat", 0x23, 0xF, 0x3F217FF0, rsp_back=0xFFFFFF143F217FF0,
                        interruptions=123456, timer_irqs=99999, frame=frame,
                        frame_checked=True, verdict=Verdict.CONTROL_FAILED)
              for cpu in (0, 131071)]
    rounds.append(RoundTrip(5, "64-bit", 0x33, 0xF, 0x7A5EC0DE1230, verdict=Verdict.OK))
    text = report.exercise_text(rounds, None)
    assert widest(text) <= WIDTH
    assert "131071" in text and "CONTROL-FAILED" in text
    row5 = [ln.split() for ln in text.split("\n") if ln.split()[:1] == ["5"]]
    assert row5 and row5[0][4] == "-"                # no RSP read back: "-", not blank


# -- progress -------------------------------------------------------------------------------

class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal():
    quiet = io.StringIO()
    with progress.Progress("cpu", 3, quiet) as p:
        for n in (1, 2, 3):
            p.update(n)
    assert quiet.getvalue() == ""
    tty = Tty()
    with progress.Progress("cpu", 3, tty, interval=0) as p:
        for n in (1, 2, 3):
            p.update(n)
    out = tty.getvalue()
    assert out.startswith("\rcpu 1/3") and "\rcpu 3/3" in out
    assert out.endswith("\r" + " " * len("cpu 3/3") + "\r")       # erased at the end


def test_progress_is_rate_limited():
    tty = Tty()
    with progress.Progress("cpu", 100000, tty, interval=60) as p:
        for n in range(1, 100001):
            p.update(n)
    assert tty.getvalue().count("\r") <= 4         # the first, the last, the erase


def test_layout_progress_on_a_pty_and_not_on_a_pipe(monkeypatch, capsys):
    assert cli.main(["layout", "--cpus", "20000"]) == 0
    assert capsys.readouterr().err == ""            # pytest's stderr is no terminal
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            monkeypatch.setattr("sys.stderr", tty)
            monkeypatch.setattr(progress, "INTERVAL", 0)
            assert cli.main(["layout", "--cpus", "20000"]) == 0
        seen = os.read(master, 1 << 16).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "layout: cpu 20000/20000" in seen and "\r" in seen
    assert "espfix layout: 20000 CPU(s)" in capsys.readouterr().out


def test_exercise_reports_each_cpu(monkeypatch):
    from inspector import exercise as ex
    calls = []
    monkeypatch.setattr(ex, "refuse_if_fred", lambda: None)
    monkeypatch.setattr(ex, "SharedPage", lambda: types.SimpleNamespace(
        write=lambda *a: None, close=lambda: None))
    monkeypatch.setattr(ex, "tsc_threshold", lambda: 1000)

    class Stop(Exception):
        pass

    def child(page, cpu):
        raise Stop(cpu)
    monkeypatch.setattr(ex, "traced_child", child)
    with pytest.raises(Stop):
        ex.exercise([4, 9], progress=calls.append)
    assert calls == [1]


# -- item 4: the state layer reads kernel memory only ---------------------------------------

def test_load_state_reads_no_sysfs():
    src = open(os.path.join(ROOT, "inspector", "state.py")).read()
    assert "read_host_facts" not in src and "/sys" not in src


def test_target_host_facts(monkeypatch):
    live = types.SimpleNamespace(live=True, meta={}, core=types.SimpleNamespace(path="/proc/kcore"))
    mark = HostFacts(meltdown="Mitigation: PTI")
    monkeypatch.setattr(hostfacts, "read_host_facts", lambda: mark)
    assert target_host_facts(live) is mark
    snap = types.SimpleNamespace(live=False, meta={"host": {"fred": True, "online": [0, 1]}},
                                 core=types.SimpleNamespace(path="x.core"))
    facts = target_host_facts(snap)
    assert facts.fred is True and facts.online == [0, 1]
    dump = types.SimpleNamespace(live=False, meta={}, core=types.SimpleNamespace(path="vmcore"))
    assert target_host_facts(dump) == HostFacts()
