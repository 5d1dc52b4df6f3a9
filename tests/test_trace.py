"""`trace` without a kernel: decoding of the BPF events, the plan against what a kernel
offers (a stand-in for bcc's BPF class), the generated program, and the CLI's refusals.
The probes themselves run in the VM guests (tests/guest/test_trace_live.py)."""

from __future__ import annotations

import pytest

from inspector.cli import main
from probes import trace as tr
from tests.helpers import jsonschemas
from tests.helpers.synthcore import SynthKernel, SynthSpec


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


def test_bpf_layout_formula_takes_the_model_constants(syms):
    """The BPF text spells no layout number: the loader defines each from the model and
    x86 facts, and the PUD-slot expression, evaluated with them, is
    model.group_pud_index for every group and page_random."""
    import re

    from inspector import model
    text, flags = tr.program_text(tr.Plan(init=True), syms, None)
    defines = dict(f[2:].partition("=")[::2] for f in flags)
    init_read = re.sub(r"/\*.*?\*/", "", text[text.index("init_read("):text.index("int on_init_entry")],
                       flags=re.S)
    assert not re.search(r"\b(64|1024|127|0x0*fffffffff000)\b|& 1\)|>> 4\b|\* 4\b", init_read)
    expr = re.search(r"u32 idx = (.*);", init_read).group(1)
    for name in re.findall(r"\b[A-Z][A-Z0-9_]+\b", init_read):
        assert name in defines, f"{name} is used by the BPF text but not defined by the loader"
    py = re.sub(r"\b[A-Z][A-Z0-9_]+\b", lambda m: defines[m.group(0)].rstrip("UL"), expr)
    for group in range(model.ESPFIX_MAX_CPUS // model.CPUS_PER_GROUP):
        for page_random in (0, 17, 0x3a5, model.ESPFIX_PAGE_SPACE - 1):
            got = eval(py, {"group": group, "page_random": page_random})    # noqa: S307
            assert got == model.group_pud_index(group, page_random)


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


# ------------------------------------------------- espfix_init_mutex and the summary

@pytest.fixture
def mutex_syms():
    """The `syms` kernel plus espfix_init_mutex (a static: kallsyms shows it with
    CONFIG_KALLSYMS_ALL, type d, as on Debian's 6.1)."""
    from inspector.symbols import parse_symbol_text
    return parse_symbol_text(SynthKernel(SynthSpec()).symbol_text() +
                             "ffffffff81a00000 D init_task\n0000000000031000 A __irq_regs\n"
                             "ffffffff8422e4e0 d espfix_init_mutex\n", "kallsyms", "kallsyms")


def test_lock_plan_needs_the_tracepoints_and_the_symbol(syms, mutex_syms, monkeypatch):
    monkeypatch.setattr(tr, "_fred_active", lambda: False)
    plan = tr.make_plan(FakeBPF(), mutex_syms, {"init", "lock"})
    assert plan.init and plan.lock and plan.lock_why is None and plan.missing == []
    text, flags = tr.program_text(plan, mutex_syms, None)
    assert "-DWANT_LOCK" in flags and "-DESPFIX_INIT_MUTEX=0xffffffff8422e4e0ULL" in flags
    assert "TRACEPOINT_PROBE(lock, contention_begin)" in text
    old = FakeBPF(tracepoints={"syscalls:sys_enter_modify_ldt"})       # before v5.19
    plan = tr.make_plan(old, mutex_syms, {"init", "lock"})
    assert plan.init and not plan.lock and "v5.19" in plan.lock_why
    assert plan.missing == [f"espfix_init_mutex waits: {plan.lock_why}"]
    plan = tr.make_plan(FakeBPF(), syms, {"init", "lock"})             # no KALLSYMS_ALL
    assert not plan.lock and "not in kallsyms" in plan.lock_why
    plan = tr.make_plan(FakeBPF(), mutex_syms, {"init"})               # --no-lock
    assert not plan.lock and "--no-lock" in plan.lock_why
    assert "-DWANT_LOCK" not in tr.program_text(plan, mutex_syms, None)[1]


def test_init_event_carries_the_mutex_and_its_wait():
    e = ev()
    e.lock_wait_ns, e.lock_contended = 1234, 1
    s = tr.init_summary(e)
    assert s["mutex"] is True and s["lock_wait_ns"] == 1234 and s["lock_contended"] == 1
    assert s["latency_ns"] == 153_400
    shared = (0, 0xFF11000001000000, 0x8000000001234063, 0x8000000004321063)
    assert tr.init_summary(ev(before=shared))["mutex"] is False   # page there: no mutex


class FakeSession:
    """Stands in for tr.TraceSession: two init_espfix_ap calls and one modify_ldt."""
    def __init__(self, plan, syms, pid=None):
        import time
        now = time.monotonic_ns()
        e1, e2 = ev(target=64), ev(before=(0xFFFFFF0000001000,) * 4, target=65)
        e1.ts_ns, e2.ts_ns = now, now + 10**6
        e1.before.page = 0                          # first of cpus 64-127: a stack page
        e1.before.pud, e1.before.pmd = e1.after.pud, e1.after.pmd   # group 0 has its tables
        e2.before.pud, e2.before.pmd = e1.after.pud, e1.after.pmd
        e2.after.stack, e2.after.page = 0xFFFFFF0000001040, e1.after.page
        e2.after.pud, e2.after.pmd = e1.after.pud, e1.after.pmd
        e2.before.stack = e2.after.stack           # an early return
        self.pending = [tr.init_summary(e1), tr.init_summary(e2),
                        {"type": "ldt", "ts_ns": now, "pid": 1, "tid": 1, "comm": "x", "func": 1,
                         "ret": 0}]

    def ldt_holders(self):
        return [], 0, False

    def poll(self, timeout_ms):
        out, self.pending = self.pending, []
        return out

    def returns(self):
        return [], 0, 0

    def close(self):
        pass


@pytest.fixture
def fake_trace(mutex_syms, monkeypatch):
    import signal

    from inspector import trace_cli
    monkeypatch.setattr(tr, "_fred_active", lambda: False)
    monkeypatch.setattr(tr, "preflight", lambda: None)
    monkeypatch.setattr(tr, "import_bcc", lambda: FakeBPF())
    monkeypatch.setattr(tr, "kernel_symbols", lambda: mutex_syms)
    monkeypatch.setattr(tr, "TraceSession", FakeSession)
    monkeypatch.setattr(trace_cli.LiveVerifier, "initialised",
                        lambda self: ({0, 1}, "test state"))
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


def test_summary_alone_in_json(fake_trace, capsys):
    assert main(["trace", "--json", "--summary", "--no-verify", "--no-returns", "0.2"]) == 0
    docs = jsonschemas.loads_lines(capsys.readouterr().out, "trace")
    assert [d["event"] for d in docs] == ["start", "summary", "stop"]
    s = docs[1]
    assert (s["calls"], s["set_up"], s["early_return"]) == (2, 1, 1)
    assert s["allocations"]["stack page"]["cpus"] == "64" and s["match"] is True
    assert s["initialised_before"] == "0-1" and s["before_source"] == "test state"
    assert s["espfix_init_mutex"] == {"measured": True, "why": None, "taken": 1,
                                      "contended": 0, "wait_ns": 0, "max_wait_ns": 0,
                                      "waiters": ""}
    assert docs[-1]["reason"] == "duration" and docs[-1]["wall_seconds"] >= 0.2


def test_events_in_json_speak_watchs_vocabulary(fake_trace, capsys):
    """Every line: schema, event, time (as watch's lines); init/ldt add elapsed; the
    probes' own "type" and "ts_ns" do not reach the JSON."""
    assert main(["trace", "--json", "--no-verify", "--no-returns", "0.2"]) == 0
    docs = jsonschemas.loads_lines(capsys.readouterr().out, "trace")
    assert [d["event"] for d in docs] == ["start", "init", "init", "ldt", "summary", "stop"]
    assert all(list(d)[:3] == ["schema", "event", "time"] for d in docs)
    assert not any("type" in d or "ts_ns" in d or "t" in d for d in docs)
    assert [d["target_cpu"] for d in docs[1:3]] == [64, 65]
    assert all(isinstance(d["elapsed"], float) for d in docs[1:4])


def test_events_then_summary_in_text(fake_trace, capsys):
    assert main(["trace", "--no-verify", "--no-returns", "0.2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  INIT   ") == 2 and "  LDT    " in out
    assert out.index("INIT") < out.index("init_espfix_ap: 2 calls, 1 set up, 1 early return\n")
    assert "allocations match layout's prediction" in out


def test_summary_text_has_no_event_lines(fake_trace, capsys):
    assert main(["trace", "--summary", "--no-verify", "--no-returns", "--no-lock", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "  INIT   " not in out and "  LDT    " not in out and "TIME(s)" not in out
    assert "wait not measured: not asked for (--no-lock)" in " ".join(out.split())
    assert "stack page        1         1  64" in out


def test_before_state_falls_back_to_the_online_cpus(monkeypatch):
    """No usable /proc/kcore: the online CPUs, which all have a ministack, and the
    reason in the source text."""
    from inspector import target, trace_cli
    from inspector.errors import InspectError
    from inspector.model import parse_cpu_list

    def refuse(*_a):
        raise InspectError("/proc/kcore does not exist", "run in a VM")
    monkeypatch.setattr(target, "open_target", refuse)
    cpus, source = trace_cli.LiveVerifier().initialised()
    with open("/sys/devices/system/cpu/online") as f:
        assert cpus == set(parse_cpu_list(f.read()))
    assert source == "the online CPUs; /proc/kcore unusable: /proc/kcore does not exist"
