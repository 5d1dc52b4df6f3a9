"""Real faults in a live kernel, caught by espfix-inspect (issue 11), as root in a VM guest.

The test-only module tests/kmod/espfix_fault.c is built here against the guest's
linux-headers with the kernel's own gcc, loaded, and asked through debugfs to break the
live espfix64 state one way at a time (a PTE clone made writable, a PUD clone cleared,
``per_cpu(espfix_stack, n)`` zeroed, the PTI user entry removed...).  For each fault:

- live ``validate`` exits 1, and its tables name the expected checks and CPUs;
- live ``validate --json`` lists exactly those (check, CPU) pairs and marks exactly the
  expected CPUs not ok;
- a ``snapshot`` taken while the fault is in place gives the same findings offline;
- one ``watch --json --textfile`` (started once, 1 s interval) reports each finding as
  new in the first round that started after the injection, and
  ``espfix_inspect_validation_ok`` is 0 in its textfile;
- after the revert, ``validate`` is OK again and ``watch`` reports the findings gone.

The expected findings come from the fault itself (what the module wrote, where), not
from the tool.  The observed table (kernel, paging, fault, checks, CPUs) is written to
``$ESPFIX_VM_OUT/faults.md`` (or /tmp) and printed at the end of the run
(tests/guest/conftest.py).

This writes kernel memory, so it runs only inside the project's test VMs
(ESPFIX_VM=guest) and, to keep CI within budget, only in the rows of FAULT_ROWS in
tests/guest/kmod.py (ESPFIX_FAULTS=1 forces it in any row).  tests/guest/conftest.py
runs these tests after every other guest test and starts the module build at
collection.  No task with an LDT runs while a fault is in place: nothing here uses
``exercise`` or modify_ldt, and the module refuses to inject while any task holds one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.guest.kmod import MODULE, Build, cannot_build, why_not_here
from tests.guest.live import cpulist
from tests.helpers.jsonproc import JsonLinesProc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = [sys.executable, "-m", "inspector"]
ENV = {**os.environ, "PYTHONPATH": ROOT}
DEBUGFS = "/sys/kernel/debug/espfix_fault"
WATCH_INTERVAL = "1"
TOOL_TIMEOUT = 300

_WHY = why_not_here()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(_WHY is not None, reason=_WHY or "-")]


# ---------------------------------------------------------------------------- faults

@dataclasses.dataclass(frozen=True)
class Fault:
    name: str               # the module's fault name
    issue: str              # item of issue 11's list
    text: str               # what it breaks, for the README table
    arg: int | None = None  # clone / entry index, or the source CPU of stack_copy
    scope: str = "cpu"      # whose ministack it breaks: cpu, page (64 CPUs), group (1024), all
    checks: tuple[str, ...] = ()          # checks that must fire, at the scope's first CPU
    per_cpu_checks: tuple[str, ...] = ()  # checks that must fire for every CPU in scope
    walks: bool = False     # the walk of espfix_stack goes through the broken entry
    kernel_wide: tuple[str, ...] = ()     # checks that fire with no CPU
    needs: str | None = None               # a /proc/cpuinfo flag the fault needs


FAULTS = [
    Fault("pte_rw", "1", "PTE clone 5 of the stack page gets _PAGE_RW", 5, "page",
          ("pte_clones", "pte_prot")),
    Fault("pte_user", "2", "PTE clone 9 gets _PAGE_USER", 9, "page", ("pte_clones", "pte_prot")),
    Fault("pte_nx", "2", "PTE clone 13 loses _PAGE_NX", 13, "page", ("pte_clones", "pte_prot"),
          needs="nx"),
    Fault("pte_elsewhere", "3", "PTE clone 0 (the one espfix_stack uses) maps another page", 0,
          "page", ("pte_clones",), walks=True),
    Fault("pmd_clear", "4", "PMD clone 300 of the group cleared", 300, "group",
          ("pmd_clones",)),
    Fault("pmd_elsewhere", "4", "PMD clone 17 points at another (empty) PTE page", 17,
          "group", ("pmd_clones",)),
    Fault("pud_clear", "5", "PUD clone 2 of the group cleared", 2, "group", ("pud_clones",)),
    Fault("pud_elsewhere", "5", "PUD clone 1 points at another (empty) PMD page", 1,
          "group", ("pud_clones",)),
    Fault("stray_pte", "6", "a present PTE in a slot no stack page in use occupies", None,
          "group", ("stray_pte",)),
    Fault("stack_zero", "7", "per_cpu(espfix_stack, n) = 0 on an online CPU", None, "cpu",
          ("cpu_init",)),
    Fault("stack_copy", "7", "per_cpu(espfix_stack, n) = CPU 0's value", 0, "cpu",
          ("espfix_stack", "espfix_waddr")),
    Fault("waddr_off", "8", "per_cpu(espfix_waddr, n) off by 64 bytes", None, "cpu",
          ("espfix_waddr",)),
    Fault("pages_elsewhere", "9", "espfix_pages[n/64] points at another page", None, "page",
          ("espfix_pages", "pte_clones"), per_cpu_checks=("espfix_waddr",)),
    Fault("pti_clear", "10", "the PTI user page tables' espfix entry cleared", None, "all",
          per_cpu_checks=("pti_walk",), kernel_wide=("pti",), needs="pti"),
]


# ---------------------------------------------------------------------------- helpers

def run_tool(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*TOOL, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=TOOL_TIMEOUT)
    return p.returncode, out, err


def together(*argvs: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Run tool invocations concurrently (the guest has 4 vCPUs) and wait for all."""
    procs = [run_tool(*a) for a in argvs]
    return [finish(p) for p in procs]


def kallsyms(*names: str) -> dict[str, int]:
    """Addresses from /proc/kallsyms, read here (not through the tool or the module)."""
    want, out = set(names), {}
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] in want and parts[2] not in out:
                out[parts[2]] = int(parts[0], 16)
    return out


def cpuinfo_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return flag in line.split(":", 1)[1].split()
    return False


def columns(text: str, first_header: str) -> list[dict[str, str]]:
    """Rows of a tabulate "simple" table in *text*, cut at the dash line's columns."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(first_header) and i + 1 < len(lines) and \
                lines[i + 1].startswith("---"):
            spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]
            spans[-1] = (spans[-1][0], 10 ** 6)
            heads = [line[a:b].strip() for a, b in spans]
            rows = []
            for row in lines[i + 2:]:
                if not row.strip():
                    break
                rows.append({h: row[a:b].strip() for h, (a, b) in zip(heads, spans)})
            return rows
    return []


def pairs(findings: list[dict]) -> set[tuple[str, int | None]]:
    return {(f["check"], f["cpu"]) for f in findings if f["severity"] in ("error", "warning")}


def fmt_pairs(ps) -> str:
    return ", ".join(f"{c}@{'-' if cpu is None else cpu}"
                     for c, cpu in sorted(ps, key=lambda p: (p[0], -1 if p[1] is None else p[1])))


def prom_samples(path: str) -> dict[str, float]:
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Watch(JsonLinesProc):
    """The one watch of this module, read without ever killing it on a timeout."""

    def __init__(self, textfile: str) -> None:
        super().__init__([*TOOL, "watch", "--json", "--textfile", textfile, WATCH_INTERVAL],
                         ROOT, ENV)
        self.prom = os.path.join(textfile, "espfix_inspect.prom")

    def drain(self, timeout: float = 0.0) -> None:
        """Read every event already written; wait up to *timeout* s for the first."""
        fd = self.p.stdout.fileno()
        wait = timeout
        while self.sel.select(timeout=wait):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.buf += chunk
            wait = 0.0
        now = time.monotonic()
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            ev = json.loads(line)
            ev["_seen"] = now
            self.events.append(ev)

    def last_round(self) -> int:
        self.drain()
        rounds = [e["round"] for e in self.events if e["event"] == "round"]
        return rounds[-1] if rounds else 0

    def wait_round(self, number: int, timeout: float) -> dict:
        """The round event numbered *number* (or later), waiting up to *timeout* s."""
        end = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == "round" and e["round"] >= number:
                    return e
            left = end - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                raise AssertionError(f"watch: no round {number} within {timeout} s "
                                     f"(exit {self.p.poll()}); last events "
                                     f"{self.events[-5:]}")
            self.drain(min(left, 1.0))

    def findings_by_round(self, after: int, change: str) -> dict[tuple, int]:
        """(check, cpu) -> the round whose comparison reported it as *change* (new/gone),
        for findings events after index *after* of self.events."""
        out: dict[tuple, int] = {}
        pending: list[tuple] = []
        for e in self.events[after:]:
            if e["event"] == "finding" and e["change"] == change \
                    and e["severity"] in ("error", "warning"):
                pending.append((e["check"], e["cpu"]))
            elif e["event"] == "round":
                for key in pending:
                    out.setdefault(key, e["round"])
                pending = []
        return out


# ---------------------------------------------------------------------------- the lab

@dataclasses.dataclass
class Lab:
    tmp: str
    watch: Watch
    osrelease: str
    levels: int
    pti: bool
    online: list[int]
    baseline: dict
    status: dict[str, str]
    rows: list[dict] = dataclasses.field(default_factory=list)
    t_start: float = 0.0
    t_build: float = 0.0        # make, from its start (maybe at collection)
    t_ready: float = 0.0        # this fixture's wait for build, watch and baseline
    loaded: bool = True

    def control(self, line: str) -> None:
        with open(f"{DEBUGFS}/control", "w") as f:
            f.write(line)

    def read_status(self) -> dict[str, str]:
        out: dict[str, str] = {}
        with open(f"{DEBUGFS}/status") as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition(": ")
                out[key] = value if key not in out else out[key] + "\n" + value
        return out


def _rmmod() -> None:
    if os.path.isdir(f"/sys/module/{MODULE}"):
        subprocess.run(["rmmod", MODULE], check=False, timeout=60)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    t0 = time.monotonic()
    if os.path.isdir(f"/sys/module/{MODULE}"):
        pytest.fail(f"{MODULE} is already loaded: a previous run did not unload it")
    build = getattr(request.config, "espfix_kmod_build", None)   # started by conftest.py
    own_build = build is None
    if own_build:
        why = cannot_build()
        if why is not None:
            pytest.skip(why)
        build = Build()
    tmp = str(tmp_path_factory.mktemp("faults"))
    textfile = os.path.join(tmp, "textfile")
    os.mkdir(textfile)
    # a build still running overlaps the watch's start and the baseline validate
    watch = Watch(textfile)
    lab_obj: Lab | None = None
    try:
        rc, out, err = finish(run_tool("validate", "--json"))
        assert rc == 0, f"the kernel must be clean before any fault: {out}{err}"
        baseline = json.loads(out)
        watch.wait_round(1, 240)
        assert build.wait() == 0, f"module build failed:\n{build.output}"
        ins = subprocess.run(["insmod", build.ko], capture_output=True, text=True, timeout=120)
        if ins.returncode != 0:
            if "Key was rejected" in ins.stderr or "Operation not permitted" in ins.stderr:
                pytest.skip(f"this kernel refuses unsigned modules: {ins.stderr.strip()}")
            pytest.fail(f"insmod failed: {ins.stderr}\n{_dmesg_tail()}")
        k = baseline["kernel"]
        lab_obj = Lab(tmp, watch, k["osrelease"], k["levels"], cpuinfo_has("pti"),
                      cpulist(open("/sys/devices/system/cpu/online").read()), baseline, {},
                      t_start=t0, t_build=build.seconds or 0.0,
                      t_ready=time.monotonic() - t0)
        lab_obj.status = lab_obj.read_status()
        yield lab_obj
    finally:
        if lab_obj is not None and os.path.exists(f"{DEBUGFS}/control"):
            try:
                lab_obj.control("revert")
            except OSError:
                pass                              # ENOENT: nothing in place
        _rmmod()
        watch.kill()
        if own_build:
            build.close()
        if lab_obj is not None:
            # printed at the end of the run by tests/guest/conftest.py
            request.config.espfix_fault_table = _write_table(lab_obj)


def _dmesg_tail() -> str:
    r = subprocess.run(["dmesg"], capture_output=True, text=True)
    return "\n".join(r.stdout.splitlines()[-15:])


def _table_path() -> str:
    return os.path.join(os.environ.get("ESPFIX_VM_OUT") or "/tmp", "faults.md")


def _write_table(lab: Lab) -> str:
    row_name = f"{os.environ.get('ESPFIX_VM_KERNEL')}:{os.environ.get('ESPFIX_VM_VARIANT')}"
    paging = f"{lab.levels}-level" + (", PTI" if lab.pti else "")
    total = time.monotonic() - lab.t_start
    rounds = [e["cost"]["cpu_seconds"] for e in lab.watch.events if e["event"] == "round"]
    mean = sum(rounds) / len(rounds) if rounds else 0.0
    lines = [f"# {row_name} ({lab.osrelease}): {len(lab.rows)} fault(s), {total:.0f} s in all, "
             f"{lab.t_ready:.0f} s of it waiting for the module build, the watch's first "
             f"round and the baseline (make ran {lab.t_build:.0f} s); watch: {len(rounds)} "
             f"rounds, {mean * 1000:.0f} ms CPU each", ""]
    for r in lab.rows:
        lines.append(f"| {lab.osrelease} | {paging} | {r['fault']} ({r['detail']}) | "
                     f"{r['checks']} | {r['cpus']} | {r['watch']} | {r['seconds']:.0f} s "
                     f"(faulted {r['t_tools']:.0f} s, reverted {r['t_after']:.0f} s) |")
    lines.append("")
    for r in lab.rows:                  # what the tool said, for the README
        lines += [f"{r['fault']}:", *(f"    {m}" for m in r["messages"])]
    for r in lab.rows[-1:]:
        lines += ["", f"$ espfix-inspect validate     # during {r['fault']}", r["text"]]
    with open(_table_path(), "w") as f:
        f.write("\n".join(lines) + "\n")
    return _table_path()


# ---------------------------------------------------------------------------- tests

def test_module_resolved_the_kernel_symbols(lab):
    """The module found the symbols itself (kprobe -> kallsyms_lookup_name); they must be
    the ones /proc/kallsyms shows, and it must see the paging mode and PTI the CPU has."""
    names = ("init_top_pgt", "espfix_stack", "espfix_waddr", "espfix_pages",
             "espfix_pud_page")
    ks = kallsyms(*names)
    for name in names:
        assert int(lab.status[name], 16) == ks[name], (name, lab.status[name])
    assert int(lab.status["levels"]) == lab.levels
    assert int(lab.status["pti"]) == int(lab.pti)
    assert lab.status["active"] == "none"
    assert lab.status["flush"] in ("flush_tlb_kernel_range", "flush_tlb_all")


def expected(lab: Lab, f: Fault, cpu: int) -> tuple[set, set[int]]:
    """(check, CPU) pairs the fault must produce and the CPUs it must mark not ok,
    from where the module writes: a stack page serves CPUs n/64*64.., a group n/1024*1024.."""
    init = [c["cpu"] for c in lab.baseline["cpus"] if c["initialised"]]
    if f.scope == "cpu":
        first, scope = cpu, [cpu]
    elif f.scope == "page":
        first = cpu // 64 * 64
        scope = [c for c in init if c // 64 == cpu // 64]
    elif f.scope == "group":
        first = cpu // 1024 * 1024
        scope = [c for c in init if c // 1024 == cpu // 1024]
    else:
        first, scope = None, init
    want = {(c, first) for c in f.checks}
    want |= {(c, n) for c in f.per_cpu_checks for n in scope}
    if f.walks:
        want |= {("walk", n) for n in scope}
        if lab.pti:
            want |= {("pti_walk", n) for n in scope}
    want |= {(c, None) for c in f.kernel_wide}
    return want, set(scope)


def bad_cpus(doc: dict) -> set[int]:
    return {c["cpu"] for c in doc["cpus"] if not c["ok"]}


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_is_caught_and_reverted(lab, fault):
    if fault.needs is not None and not cpuinfo_has(fault.needs):
        pytest.skip(f"{fault.name} needs the {fault.needs!r} CPU flag, which this row "
                    f"has not (/proc/cpuinfo)")
    t0 = time.monotonic()
    cpu = lab.online[-1]                     # the last online CPU: never CPU 0 here
    want, want_bad = expected(lab, fault, cpu)
    snap = os.path.join(lab.tmp, f"{fault.name}.core")
    w = lab.watch
    arg = "" if fault.arg is None else f" {fault.arg}"

    r_before = w.last_round()
    mark = len(w.events)
    try:
        lab.control(f"inject {fault.name} {cpu}{arg}")
    except OSError as e:
        raise AssertionError(f"inject {fault.name} failed: {e}\n{_dmesg_tail()}") from None
    injected = True
    try:
        status = lab.read_status()
        assert status["active"].startswith(f"{fault.name} cpu={cpu}"), status
        (rc_text, text, err_text), (rc_json, out_json, err_json), (rc_snap, _, err_snap) = \
            together(("validate",), ("validate", "--json"), ("snapshot", "-o", snap))
        t_tools = time.monotonic() - t0
        # watch: every expected finding is new by the first round that began after the
        # injection (round r_before + 1 may have started before it)
        w.wait_round(r_before + 2, 60)
        new = w.findings_by_round(mark, "new")
        prom_faulted = prom_samples(w.prom)
        r_revert = w.last_round()
        mark_revert = len(w.events)
        lab.control("revert")
        injected = False
        t_rev = time.monotonic()
        status_after = lab.read_status()
        (rc_clean, out_clean, err_clean), (rc_off, out_off, err_off) = \
            together(("validate", "--json"), ("validate", "--core", snap, "--json"))
        gone_round = w.wait_round(r_revert + 2, 60)
        gone = w.findings_by_round(mark_revert, "gone")
        prom_clean = prom_samples(w.prom)
        t_after = time.monotonic() - t_rev
    finally:
        if injected:
            lab.control("revert")

    # live validate: exit 1, and the tables name the checks and CPUs
    assert rc_text == 1, f"validate exit {rc_text}: {text}{err_text}"
    rows = columns(text, "SEVERITY")
    # the CPUS column lists the CPUs a finding affects ("-", "3", "0-3", "0,2,... (n CPUs)"):
    # its first is the finding's cpu (the first CPU of its page or group)
    text_pairs = {(r["CHECK"], int(re.match(r"\d+", r["CPUS"]).group())
                   if r["CPUS"] not in ("", "-") else None) for r in rows
                  if r["SEVERITY"] in ("error", "warning")}
    assert text_pairs == want, f"validate named {fmt_pairs(text_pairs)}, want {fmt_pairs(want)}"
    verdicts = {int(r["CPU"]): r["VERDICT"] for r in columns(text, "CPU")}
    assert {c for c, v in verdicts.items() if v == "BAD"} == want_bad, verdicts
    assert "result: FINDINGS" in text

    # live validate --json lists the same
    assert rc_json == 1, err_json
    doc = json.loads(out_json)
    assert doc["ok"] is False
    assert pairs(doc["findings"]) == want, fmt_pairs(pairs(doc["findings"]))
    assert bad_cpus(doc) == want_bad

    # the snapshot taken during the fault gives the same findings offline
    assert rc_snap == 0, err_snap
    assert rc_off == 1, err_off
    offline = json.loads(out_off)
    assert offline["findings"] == doc["findings"]
    assert bad_cpus(offline) == want_bad

    # watch: new within one round, textfile says not ok
    late = {k: r for k, r in new.items() if r > r_before + 2}
    assert want <= set(new), f"watch reported {fmt_pairs(new)}, want {fmt_pairs(want)}"
    assert not late, f"watch was late (injected after round {r_before}): {late}"
    assert set(new) == want, fmt_pairs(new)
    assert prom_faulted["espfix_inspect_validation_ok"] == 0
    for check in {c for c, _ in want}:
        assert prom_faulted[f'espfix_inspect_findings{{check="{check}",severity="error"}}'] > 0

    # after the revert: validate OK, watch says gone, textfile ok again
    assert status_after["active"] == "none"
    assert status_after["changed_at_last_revert"] == "0"
    assert status_after["ldt_holders_at_last_revert"] == "0"
    assert rc_clean == 0, out_clean + err_clean
    clean = json.loads(out_clean)
    assert pairs(clean["findings"]) == set() and clean["cpus"] == lab.baseline["cpus"]
    assert set(gone) == want, f"watch said gone: {fmt_pairs(gone)}"
    assert max(gone.values()) <= r_revert + 2
    assert gone_round["ok"], gone_round
    assert prom_clean["espfix_inspect_validation_ok"] == 1

    observed = pairs(doc["findings"])
    lab.rows.append({
        "fault": f"{fault.issue}. `{fault.name}`", "detail": fault.text,
        "checks": ", ".join(sorted({c for c, _ in observed})),
        "cpus": f"{fmt_pairs(observed)}; BAD: "
                f"{','.join(map(str, sorted(bad_cpus(doc)))) or '-'}",
        "watch": f"new in round {max(new.values())} (injected after {r_before}), "
                 f"gone in {max(gone.values())} (reverted after {r_revert})",
        "seconds": time.monotonic() - t0, "t_tools": t_tools, "t_after": t_after,
        "messages": [f"{f['severity']} {f['check']} {'' if f['cpu'] is None else f['cpu']}: "
                     f"{f['message']}" for f in doc["findings"]],
        "text": text})


def test_unload_restores_a_fault_in_place(lab):
    """Unloading the module with a fault still in place puts the state back."""
    cpu = lab.online[-1]
    lab.control(f"inject pte_rw {cpu} 21")
    status = lab.read_status()
    assert status["active"].startswith("pte_rw"), status
    r = subprocess.run(["rmmod", MODULE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lab.loaded = False
    rc, out, err = finish(run_tool("validate", "--json"))
    assert rc == 0, out + err
    doc = json.loads(out)
    assert doc["cpus"] == lab.baseline["cpus"]
    assert doc["kernel"] == lab.baseline["kernel"]
