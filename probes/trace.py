"""BCC loader for probes/espfix.bpf.c: what can be traced here, build, attach, decode.

bcc (Debian's python3-bpfcc, not on PyPI) is imported lazily, only when a probe is
about to be loaded, so that the rest of espfix-inspect runs without it.  Every probe
point is checked with bcc's own helpers first (BPF.get_kprobe_functions,
BPF.tracepoint_exists); what is missing is reported and the rest still runs.
"""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from inspector.elfcore import lockdown_state
from inspector.errors import InspectError
from inspector.hostfacts import read_host_facts
from inspector.symbols import SymbolTable, load_symbols
from inspector.trace_summary import Outcome
from inspector import model, x86
from inspector.x86 import decode_user_desc, ldt_selector

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any

BPF_SOURCE = Path(__file__).resolve().with_name("espfix.bpf.c")
TASK_COMM_LEN = 16
WALK_CHUNK = 256          # tasks per BPF invocation of the LDT-holder walk
MAX_CHUNKS = 256         # so at most 65,536 processes

#: Events that come right before a return to user mode, counted when the task's saved
#: SS is in the LDT.  (category, event, check __irq_regs, what it is)
RETURN_SOURCES: tuple[tuple[str, str, bool, str], ...] = (
    ("irq_vectors", "local_timer_exit", True, "local APIC timer interrupt"),
    ("irq_vectors", "reschedule_exit", False, "reschedule IPI"),
    ("irq_vectors", "call_function_exit", False, "function-call IPI"),
    ("irq_vectors", "call_function_single_exit", False, "single function-call IPI"),
    ("irq_vectors", "irq_work_exit", False, "irq_work self-IPI"),
    ("irq_vectors", "x86_platform_ipi_exit", False, "platform IPI"),
    ("irq_vectors", "error_apic_exit", False, "APIC error interrupt"),
    ("irq_vectors", "spurious_apic_exit", False, "spurious APIC interrupt"),
    ("irq_vectors", "thermal_apic_exit", False, "thermal interrupt"),
    ("irq_vectors", "threshold_apic_exit", False, "MCE threshold interrupt"),
    ("irq_vectors", "deferred_error_apic_exit", False, "deferred error interrupt"),
    ("exceptions", "page_fault_user", False, "page fault from user mode"),
    ("syscalls", "sys_exit_rt_sigreturn", False, "rt_sigreturn"),
    ("raw_syscalls", "sys_exit", False, "system call exit (int $0x80 / ptrace-set SS)"),
)
SOURCE_NAMES = [f"{c}:{e}" for c, e, _, _ in RETURN_SOURCES]

#: kallsyms names the program needs, by section
SYMBOLS = {
    "init": ("espfix_stack", "__per_cpu_offset", "espfix_pages", "espfix_pud_page",
             "page_random", "page_offset_base"),
    "returns": ("__per_cpu_offset",),
    "holders": ("init_task",),
    "lock": ("espfix_init_mutex",),
}

#: The tracepoints that time waits on espfix_init_mutex (include/trace/events/lock.h,
#: since Linux kernel commit 16edd9b511a1, "locking: Add lock contention tracepoints",
#: in v5.19; fired in the mutex slow path since ee042be16cb4, "locking: Apply
#: contention tracepoints in the slow path", same release).
LOCK_TRACEPOINTS = (("lock", "contention_begin"), ("lock", "contention_end"))


@dataclass
class Plan:
    """What will be traced on this kernel, and why the rest will not."""
    init: bool = False
    ldt: bool = False
    returns: list[int] = field(default_factory=list)      # indexes into RETURN_SOURCES
    holders: bool = False
    irq_regs: bool = False
    lock: bool = False
    lock_why: str | None = "not asked for (--no-lock)"   # why waits are not measured
    missing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.init:
            parts.append("init_espfix_ap (kprobe + kretprobe"
                         + (", espfix_init_mutex waits)" if self.lock else ")"))
        if self.ldt:
            parts.append("modify_ldt (syscall tracepoints)")
        if self.returns:
            parts.append(f"returns through espfix ({len(self.returns)} tracepoints)")
        if self.holders:
            parts.append("LDT holders (task-list walk)")
        return ", ".join(parts) or "nothing"


def import_bcc():
    try:
        import bcc  # noqa: F401  (Debian python3-bpfcc)
        from bcc import BPF
    except ImportError as e:
        raise InspectError(f"BCC is not installed ({e})",
                           "apt-get install python3-bpfcc (bcc is not on PyPI), and make "
                           "sure this Python sees Debian's dist-packages") from None
    return BPF


def _headers_present() -> bool:
    rel = platform.release()
    return any(Path(p).exists() for p in (f"/lib/modules/{rel}/build/include",
                                          "/sys/kernel/kheaders.tar.xz"))


def _fred_active() -> bool:
    """FRED in use (the ``fred`` cpuinfo flag, read by inspector.hostfacts)."""
    return bool(read_host_facts().fred)


def _lockdown() -> str | None:
    """The lockdown mode, as inspector.elfcore reads it (securityfs, else cmdline)."""
    return lockdown_state()[0]


def preflight() -> None:
    """Refuse, in one line, what no probe can get around."""
    if os.geteuid() != 0:
        raise InspectError("tracing needs root (CAP_BPF and CAP_PERFMON)", "run as root")
    if _lockdown() == "confidentiality":
        raise InspectError("kernel lockdown=confidentiality forbids BPF reads of kernel "
                           "memory, which every espfix probe needs",
                           "boot without lockdown=confidentiality")
    if not _headers_present():
        rel = platform.release()
        raise InspectError(f"no kernel headers for {rel} (BCC compiles against "
                           f"/lib/modules/{rel}/build; CONFIG_IKHEADERS is off)",
                           f"apt-get install linux-headers-{rel}")


def make_plan(BPF, syms: SymbolTable | None, want: set[str],
              sources: set[str] | None = None) -> Plan:
    """Check every probe point with bcc's helpers and the symbols it needs.
    *sources* limits the return tracepoints to these event names (default: all)."""
    plan = Plan()
    fred = _fred_active()

    def have(names: tuple[str, ...]) -> list[str]:
        return [n for n in names if syms is None or n not in syms]

    if "init" in want:
        if fred:
            plan.missing.append("init_espfix_ap: FRED is in use, espfix is never set up")
        elif not BPF.get_kprobe_functions(b"^init_espfix_ap$"):
            plan.missing.append("init_espfix_ap: not in available_filter_functions "
                                "(no kprobes, or the function was inlined)")
        elif (gone := have(SYMBOLS["init"])):
            plan.missing.append(f"init_espfix_ap: kallsyms lacks {', '.join(gone)} "
                                "(CONFIG_KALLSYMS_ALL off?)")
        else:
            plan.init = True
    if "lock" in want and plan.init:
        absent = [f"{c}:{e}" for c, e in LOCK_TRACEPOINTS if not BPF.tracepoint_exists(c, e)]
        if absent:
            plan.lock_why = f"no {absent[0]} tracepoint (added in v5.19)"
        elif have(SYMBOLS["lock"]):
            plan.lock_why = "espfix_init_mutex is not in kallsyms (CONFIG_KALLSYMS_ALL off?)"
        else:
            plan.lock, plan.lock_why = True, None
        if plan.lock_why:
            plan.missing.append(f"espfix_init_mutex waits: {plan.lock_why}")
    if "ldt" in want:
        absent = [e for e in ("sys_enter_modify_ldt", "sys_exit_modify_ldt")
                  if not BPF.tracepoint_exists("syscalls", e)]
        if absent:
            plan.missing.append(f"modify_ldt: no syscalls:{absent[0]} tracepoint "
                                "(CONFIG_FTRACE_SYSCALLS off, or modify_ldt compiled out)")
        else:
            plan.ldt = True
    if "returns" in want:
        if fred:
            plan.missing.append("returns: FRED is in use; ERETU needs no espfix")
        else:
            for i, (cat, ev, _irq, _what) in enumerate(RETURN_SOURCES):
                if sources is not None and ev not in sources:
                    continue
                if BPF.tracepoint_exists(cat, ev):
                    plan.returns.append(i)
                else:
                    plan.missing.append(f"returns: no {cat}:{ev} tracepoint")
            plan.irq_regs = syms is not None and "__irq_regs" in syms \
                and "__per_cpu_offset" in syms
            if not plan.irq_regs:
                plan.missing.append("returns: no __irq_regs symbol: timer interrupts of "
                                    "LDT tasks are counted even when they hit kernel mode")
    if "holders" in want:
        if not BPF.tracepoint_exists("syscalls", "sys_enter_getppid"):
            plan.missing.append("LDT holders: no syscalls:sys_enter_getppid tracepoint")
        elif have(SYMBOLS["holders"]):
            plan.missing.append("LDT holders: kallsyms lacks init_task")
        else:
            plan.holders = True
    return plan


def program_text(plan: Plan, syms: SymbolTable | None, pid: int | None) -> tuple[str, list[str]]:
    """The C text and the -D flags for this plan."""
    text = BPF_SOURCE.read_text()
    probes = []
    for i in plan.returns:
        cat, ev, irq, _what = RETURN_SOURCES[i]
        check = 1 if irq and plan.irq_regs else 0
        probes.append(f"int ret_{i}(void *ctx) {{ return count_return({i}, {check}); }}")
    text = text.replace("@RETURN_PROBES@", "\n".join(probes))
    flags = []
    for name, on in (("WANT_INIT", plan.init), ("WANT_LOCK", plan.init and plan.lock),
                     ("WANT_LDT", plan.ldt),
                     ("WANT_RETURNS", bool(plan.returns)), ("WANT_HOLDERS", plan.holders)):
        if on:
            flags.append(f"-D{name}")

    def addr(sym: str) -> str:
        return f"0x{syms[sym]:x}ULL" if syms is not None and sym in syms else "0ULL"

    consts = {"ESPFIX_STACK": "espfix_stack", "PER_CPU_OFFSET": "__per_cpu_offset",
              "ESPFIX_PAGES": "espfix_pages", "ESPFIX_PUD_PAGE": "espfix_pud_page",
              "PAGE_RANDOM": "page_random", "PAGE_OFFSET_BASE": "page_offset_base",
              "INIT_TASK": "init_task", "ESPFIX_INIT_MUTEX": "espfix_init_mutex"}
    for macro, sym in consts.items():
        flags.append(f"-D{macro}={addr(sym)}")
    if plan.irq_regs:
        flags.append(f"-DIRQ_REGS={addr('__irq_regs')}")
    if pid is not None:
        flags.append(f"-DFILTER_PID={pid}")
    flags.append(f"-DTRIGGER_PID={os.getpid()}")
    flags.append(f"-DWALK_CHUNK={WALK_CHUNK}")
    flags.extend(f"-D{name}={value}" for name, value in layout_defines().items())
    return text, flags


def layout_defines() -> dict[str, str]:
    """The espfix layout and page-table facts the BPF text uses, from their one home
    (:mod:`inspector.model`, :mod:`inspector.x86`), as C literals."""
    return {"ESPFIX_STACKS_PER_PAGE": f"{model.ESPFIX_STACKS_PER_PAGE}U",
            "CPUS_PER_GROUP": f"{model.CPUS_PER_GROUP}U",
            "GROUP_PAGE_SHIFT": f"{model.GROUP_PAGE_SHIFT}",
            "PUD_GROUPS": f"{model.PUD_GROUPS}U",
            "ESPFIX_PUD_CLONES": f"{model.ESPFIX_PUD_CLONES}U",
            "X86_PAGE_PRESENT": f"{x86.PAGE_PRESENT:#x}ULL",
            "X86_PTE_PFN_MASK": f"{x86.PTE_PFN_MASK:#018x}ULL"}


def ebpf_listing(text: str, flags: list[str]) -> str:
    """The program as BCC will compile it: the -D flags as #defines, then the text."""
    defines = []
    for f in flags:
        name, _, value = f[2:].partition("=")
        defines.append(f"#define {name} {value or 1}")
    return "\n".join(defines) + "\n" + text


def kernel_symbols() -> SymbolTable:
    return load_symbols("/proc/kallsyms")


# ------------------------------------------------------------------ event layouts

class InitState(ctypes.Structure):
    _fields_ = [("stack", ctypes.c_uint64), ("page", ctypes.c_uint64),
                ("pud", ctypes.c_uint64), ("pmd", ctypes.c_uint64)]


class InitEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("latency_ns", ctypes.c_uint64),
                ("target_cpu", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("comm", ctypes.c_char * TASK_COMM_LEN),
                ("before", InitState), ("after", InitState),
                ("lock_wait_ns", ctypes.c_uint64), ("lock_contended", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32)]


class LdtEvent(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("ret", ctypes.c_int64),
                ("pid", ctypes.c_uint32), ("tid", ctypes.c_uint32),
                ("func", ctypes.c_uint32), ("bytecount", ctypes.c_uint32),
                ("entry_number", ctypes.c_uint32), ("base_addr", ctypes.c_uint32),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("have_desc", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("comm", ctypes.c_char * TASK_COMM_LEN)]


class Holder(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("nr_entries", ctypes.c_uint32),
                ("comm", ctypes.c_char * TASK_COMM_LEN)]


def cast(data, kind):
    return ctypes.cast(data, ctypes.POINTER(kind)).contents


# ------------------------------------------------------------------ decoding

PRESENT = 1


def init_summary(ev: InitEvent) -> dict:
    """What one init_espfix_ap() call did, from the state read before and after it.
    ``mutex``: it took espfix_init_mutex, which init_espfix_ap() does only when it
    finds espfix_pages[cpu / 64] NULL; ``lock_wait_ns``/``lock_contended``: how long
    and how often it waited for it (0 unless the lock tracepoints are attached)."""
    b, a = ev.before, ev.after
    did_work = b.stack == 0 and a.stack != 0
    allocated = []
    if did_work:
        if not b.page and a.page:
            allocated.append("stack page")
        if not b.pud & PRESENT and a.pud & PRESENT:
            allocated.append("PMD page")
        if not b.pmd & PRESENT and a.pmd & PRESENT:
            allocated.append("PTE page")
    return {
        "type": "init", "ts_ns": ev.ts_ns, "target_cpu": ev.target_cpu, "cpu": ev.cpu, "pid": ev.pid,
        "comm": ev.comm.decode(errors="replace"), "latency_us": round(ev.latency_ns / 1e3, 1),
        "latency_ns": ev.latency_ns,
        "outcome": (Outcome.SET_UP if did_work else
                    Outcome.EARLY_RETURN if b.stack else Outcome.NOT_SET).value,
        "allocated": allocated, "mutex": did_work and not b.page,
        "lock_wait_ns": ev.lock_wait_ns, "lock_contended": ev.lock_contended,
        "espfix_stack": f"{a.stack:#x}", "espfix_pages": f"{a.page:#x}",
    }


def ldt_summary(ev: LdtEvent) -> dict:
    out = {"type": "ldt", "ts_ns": ev.ts_ns, "pid": ev.pid, "tid": ev.tid,
           "comm": ev.comm.decode(errors="replace"), "func": ev.func, "ret": ev.ret}
    if ev.have_desc:
        d = decode_user_desc(ev.flags)
        empty = ev.base_addr == 0 and ev.limit == 0 and ev.flags in (0, 0x28)
        out.update({"entry": ev.entry_number, "base": f"{ev.base_addr:#x}",
                    "limit": f"{ev.limit:#x}", **d,
                    "selector": f"{ldt_selector(ev.entry_number):#x}",
                    "sixteen_bit": bool(not d["seg_32bit"] and not d["lm"] and not empty
                                        and not d["seg_not_present"]),
                    "kind": "code" if d["contents"] & 2 else "data"})
    return out


# ------------------------------------------------------------------ the session

class TraceSession:
    """Compiled and attached probes; always detach with close() (or use `with`)."""

    def __init__(self, plan: Plan, syms: SymbolTable, pid: int | None = None) -> None:
        BPF = import_bcc()
        self.plan = plan
        self.text, self.flags = program_text(plan, syms, pid)
        self.events: list[dict] = []
        self.holders: list[dict] = []
        self.bpf: Any = None               # a bcc.BPF (bcc has no type information)
        try:
            self.bpf = BPF(text=self.text, cflags=self.flags)
        except Exception as e:     # BCC raises plain Exception on a compile/load failure
            raise InspectError(f"BCC could not compile or load the espfix probes: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               "check the kernel headers match the running kernel; "
                               "rerun with --ebpf to see the program") from None
        try:
            self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> None:
        b = self.bpf
        if self.plan.init:
            b.attach_kprobe(event="init_espfix_ap", fn_name="on_init_entry")
            b.attach_kretprobe(event="init_espfix_ap", fn_name="on_init_return")
            b["init_events"].open_ring_buffer(
                lambda _ctx, data, _size: self.events.append(
                    init_summary(cast(data, InitEvent))))
        if self.plan.ldt:
            b["ldt_events"].open_ring_buffer(
                lambda _ctx, data, _size: self.events.append(
                    ldt_summary(cast(data, LdtEvent))))
        if self.plan.holders:
            b["holders"].open_ring_buffer(self._on_holder)
        attached = []
        for i in self.plan.returns:
            cat, ev, _irq, _what = RETURN_SOURCES[i]
            try:
                b.attach_tracepoint(tp=f"{cat}:{ev}", fn_name=f"ret_{i}")
                attached.append(i)
            except Exception as e:      # BCC: plain Exception when perf_event_open fails
                self.plan.missing.append(f"returns: {cat}:{ev} refused the BPF program "
                                         f"({str(e).splitlines()[0]})")
        self.plan.returns = attached

    def _on_holder(self, _ctx, data, _size) -> None:
        h = cast(data, Holder)
        self.holders.append({"type": "holder", "pid": h.pid, "nr_entries": h.nr_entries,
                             "comm": h.comm.decode(errors="replace")})

    def ldt_holders(self) -> tuple[list[dict], int, bool]:
        """Trigger the task-list walk (our own getppid()) and collect its output:
        (holders, tasks walked, walk cut short at MAX_TASKS)."""
        if not self.plan.holders:
            return [], 0, False
        self.holders = []
        done = self.bpf["holders_done"]
        for i in range(3):
            done[ctypes.c_int(i)] = ctypes.c_uint64(0)
        for _ in range(MAX_CHUNKS):
            os.getppid()                           # runs the next WALK_CHUNK steps
            if done[ctypes.c_int(1)].value:
                break
        self.bpf.ring_buffer_poll(timeout=100)
        walked = done[ctypes.c_int(0)].value
        cut = not done[ctypes.c_int(1)].value
        return sorted(self.holders, key=lambda h: h["pid"]), walked, cut

    def poll(self, timeout_ms: int) -> list[dict]:
        """Wait up to timeout_ms for events; return (and forget) all that arrived."""
        if self.plan.init or self.plan.ldt or self.plan.holders:
            self.bpf.ring_buffer_poll(timeout=timeout_ms)
        out, self.events = self.events, []
        return out

    def returns(self) -> tuple[list[dict], int, int]:
        """Counted returns through espfix: rows by (cpu, pid, comm, ss, cs, source),
        plus the number of events looked at and counted."""
        if not self.plan.returns:
            return [], 0, 0
        rows = []
        for k, v in self.bpf["returns"].items():
            rows.append({"type": "returns", "cpu": k.cpu, "pid": k.pid,
                         "comm": k.comm.decode(errors="replace"), "ss": f"{k.ss:#x}",
                         "cs": f"{k.cs:#x}", "source": SOURCE_NAMES[k.source],
                         "count": v.value})
        seen = self.bpf["seen"]
        looked, counted = seen[ctypes.c_int(0)].value, seen[ctypes.c_int(1)].value
        rows.sort(key=lambda r: (r["cpu"], r["pid"], r["source"]))
        return rows, looked, counted

    def close(self) -> None:
        """Detach every probe and free the program (idempotent)."""
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
