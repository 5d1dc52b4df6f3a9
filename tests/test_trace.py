"""`trace` without a kernel: decoding of the BPF events, the plan against what a kernel
offers (a stand-in for bcc's BPF class), the generated program, and the CLI's refusals.
The probes themselves run in the VM guests (tests/guest/test_trace_live.py)."""

from __future__ import annotations

import pytest

from inspector.cli import main
from probes import trace as tr
from tests.synthcore import SynthKernel, SynthSpec


def ev(before=(0, 0, 0, 0), after=(0xFFFFFF0000001000, 0xFF11000001000000, 0x8000000001234063,
                                    0x8000000004321063), target=2):
    e = tr.InitEvent()
    e.target_cpu, e.cpu, e.pid, e.latency_ns, e.comm = target, 0, 42, 153_400, b"sh"
    for st, vals in ((e.before, before), (e.after, after)):
        st.stack, st.page, st.pud, st.pmd = vals
    return e


def test_first_cpu_of_a_group_allocates_all_three_pages():
    s = tr.init_summary(ev())
    assert s["outcome"] == "set up" and s["latency_us"] == 153.4
    assert s["allocated"] == ["stack page", "PMD page", "PTE page"]


def test_cpu_sharing_a_page_allocates_nothing():
    shared = (0, 0xFF11000001000000, 0x8000000001234063, 0x8000000004321063)
    s = tr.init_summary(ev(before=shared))
    assert s["outcome"] == "set up" and s["allocated"] == []


def test_second_online_is_an_early_return():
    done = (0xFFFFFF0000001000, 0xFF11000001000000, 0x8000000001234063, 0x8000000004321063)
    s = tr.init_summary(ev(before=done, after=done))
    assert s["outcome"].startswith("early return") and s["allocated"] == []


def ldt(flags, base=0, limit=0xFFFF, entry=1):
    e = tr.LdtEvent()
    e.pid, e.tid, e.func, e.ret, e.comm = 7, 7, 1, 0, b"wine"
    e.entry_number, e.base_addr, e.limit, e.flags, e.have_desc = entry, base, limit, flags, 1
    return tr.ldt_summary(e)


@pytest.mark.parametrize(("flags", "sixteen", "kind"), [
    (0x00, True, "data"),            # seg_32bit=0: the espfix case
    (0x01, False, "data"),           # 32-bit data
    (0x04, True, "code"),            # contents=2: 16-bit code
    (0x80, False, "data"),           # lm: 64-bit
    (0x21, False, "data"),           # not present
])
def test_user_desc_decoding(flags, sixteen, kind):
    d = ldt(flags)
    assert d["sixteen_bit"] is sixteen and d["kind"] == kind and d["selector"] == "0xf"


def test_clearing_an_entry_is_not_16bit():
    assert ldt(0x28, base=0, limit=0)["sixteen_bit"] is False


class FakeBPF:
    """What bcc's BPF class answers, for a kernel with a given set of probe points."""
    def __init__(self, kprobes=(b"init_espfix_ap",), tracepoints=None):
        self.kprobes, self.tps = set(kprobes), tracepoints

    def get_kprobe_functions(self, pattern):
        return {k for k in self.kprobes if k in pattern}

    def tracepoint_exists(self, cat, ev):
        return self.tps is None or f"{cat}:{ev}" in self.tps


@pytest.fixture
def syms():
    from inspector.symbols import parse_symbol_text
    return parse_symbol_text(SynthKernel(SynthSpec()).symbol_text() +
                             "ffffffff81a00000 D init_task\n0000000000031000 A __irq_regs\n",
                             "kallsyms", "kallsyms")


def test_full_plan(syms, monkeypatch):
    monkeypatch.setattr(tr, "_fred_active", lambda: False)
    plan = tr.make_plan(FakeBPF(), syms, {"init", "ldt", "returns", "holders"})
    assert plan.init and plan.ldt and plan.holders and plan.irq_regs
    assert len(plan.returns) == len(tr.RETURN_SOURCES) and plan.missing == []


def test_missing_points_degrade(syms, monkeypatch):
    monkeypatch.setattr(tr, "_fred_active", lambda: False)
    plan = tr.make_plan(FakeBPF(kprobes=(), tracepoints={"irq_vectors:local_timer_exit"}),
                        syms, {"init", "ldt", "returns"})
    assert not plan.init and not plan.ldt and plan.returns == [0]
    assert any("init_espfix_ap: not in available_filter_functions" in m for m in plan.missing)
    assert any("modify_ldt: no syscalls:sys_enter_modify_ldt" in m for m in plan.missing)


def test_fred_means_no_espfix_probes(syms, monkeypatch):
    monkeypatch.setattr(tr, "_fred_active", lambda: True)
    plan = tr.make_plan(FakeBPF(), syms, {"init", "returns"})
    assert not plan.init and not plan.returns
    assert all("FRED" in m for m in plan.missing)


def test_program_has_one_function_per_available_return_source(syms):
    plan = tr.Plan(returns=[0, 11], irq_regs=True)
    text, flags = tr.program_text(plan, syms, pid=99)
    assert "int ret_0(void *ctx) { return count_return(0, 1); }" in text
    assert "int ret_11(void *ctx) { return count_return(11, 0); }" in text
    assert "ret_1(" not in text
    assert "-DWANT_RETURNS" in flags and "-DWANT_INIT" not in flags and "-DFILTER_PID=99" in flags
    assert f"-DIRQ_REGS=0x{syms['__irq_regs']:x}ULL" in flags


def test_ebpf_prints_the_program(capsys):
    assert main(["trace", "--ebpf"]) == 0
    out = capsys.readouterr().out
    assert "#define WANT_INIT 1" in out and "init_espfix_ap" in out
    assert "TRACEPOINT_PROBE(syscalls, sys_enter_modify_ldt)" in out


def test_trace_refused_here_in_one_line(capsys):
    """This host has no kernel headers, kprobes or BCC: exit 2, one line, no traceback."""
    rc = main(["trace", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert any(k in err for k in ("kernel headers", "BCC is not installed", "needs root",
                                  "lockdown"))


def test_return_sources_limit_the_plan(syms, monkeypatch):
    monkeypatch.setattr(tr, "_fred_active", lambda: False)
    plan = tr.make_plan(FakeBPF(), syms, {"returns"}, {"local_timer_exit", "sys_exit"})
    assert [tr.RETURN_SOURCES[i][1] for i in plan.returns] == ["local_timer_exit", "sys_exit"]


def test_unknown_return_source_refused(capsys):
    assert main(["trace", "--return-sources", "nmi_exit", "1"]) == 2
    assert "unknown return source 'nmi_exit'" in capsys.readouterr().err
