"""`exercise`: run the 16-bit-SS return path on each CPU and prove nothing leaks.

For each CPU a child is forked, pinned there, given a 16-bit data segment in its LDT
(modify_ldt) and stopped under ptrace.  The parent then points it, with PTRACE_SETREGS,
at a few bytes of machine code in a shared MAP_32BIT page, with SS = the LDT selector,
CS = __USER_CS (64-bit) or __USER32_CS (compat), and an RSP whose bits 16..31 are ours.
While it spins, every interrupt that returns to it goes through the kernel's espfix path
(arch/x86/entry/entry_64.S: ``testb $4, (SS-RIP)(%rsp); jnz native_irq_return_ldt``):
the child makes no system calls, so each return to it is an IRET.

What is checked (the reasoning of tools/testing/selftests/x86/sigreturn.c):
- 64-bit CS: IRET restores the whole RSP, which must come back unchanged;
- compat CS: with a 16-bit SS, IRET restores only SP[15:0]; espfix makes RSP[31:16]
  come back as the user's, so ESP must be unchanged.  RSP[63:32] differ by CPU vendor
  and are reported, not judged.
A leak is kernel bits in RSP[31:16].  The child checks its own RSP after every
interruption it notices (a jump in its TSC stream); the parent checks the saved
registers after stopping it; where /proc/kcore is readable the CPU's ministack must
hold the child's last IRET frame (its RIP, CS, SS selector and RSP).

The machine code (GNU as, AT&T syntax); %rsi/%esi points at the counters, which the
parent reads through the shared page:

    64-bit (SPIN64)                         compat (SPIN32)
      rdtsc                                   rdtsc
      shl  $32, %rdx                          mov  %eax, %ebx
      or   %rdx, %rax                       loop:
      mov  %rax, %rbx                         incl (%esi)           # iterations
    loop:                                     rdtsc
      incl (%rsi)           # iterations      mov  %eax, %ecx
      rdtsc                                   sub  %ebx, %ecx
      shl  $32, %rdx                          mov  %eax, %ebx
      or   %rdx, %rax                         cmp  40(%esi), %ecx  # gap threshold
      mov  %rax, %rcx                         jb   loop
      sub  %rbx, %rcx                         incl 8(%esi)          # interruptions
      mov  %rax, %rbx                         cmp  32(%esi), %esp   # expected ESP
      cmp  40(%rsi), %rcx   # gap threshold   je   loop
      jb   loop                               incl 16(%esi)         # mismatches
      incl 8(%rsi)          # interruptions   mov  %esp, 24(%esi)   # last bad ESP
      cmp  32(%rsi), %rsp   # expected RSP    jmp  loop
      je   loop
      incl 16(%rsi)         # mismatches
      mov  %rsp, 24(%rsi)   # last bad RSP
      jmp  loop

No instruction touches the stack, so the bogus stack segment is never used for data
(in compat mode %esi-based accesses go through DS = __USER_DS).
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from .errors import InspectError
from .hostfacts import read_host_facts
from .ldt import (PTRACE_CONT, PTRACE_O_EXITKILL, PTRACE_SETOPTIONS, PTRACE_TRACEME,
                  SharedPage, data16_desc, die_with_parent, getregs, modify_ldt_write,
                  ptrace, setregs)
from .state import EspfixState
from .vocab import StrEnum
from .x86 import MASK64, USER32_CS, USER_CS, USER_DS, ldt_selector

SPIN64 = bytes.fromhex("0f3148c1e2204809d04889c3ff060f3148c1e2204809d04889c14829d9"
                       "4889c3483b4e2872e6ff4608483b662074ddff461048896618ebd4")
SPIN32 = bytes.fromhex("0f3189c3ff060f3189c129d989c33b4e2872f1ff46083b662074e9ff46"
                       "10896618ebe1")

# shared page layout
CODE64, CODE32, CONTROL64 = 0x000, 0x100, 0x200      # CONTROL64: the same loop, flat SS
DATA = 0x800
ITER, GAPS, BAD, LAST_BAD, EXPECT, THRESH = 0, 8, 16, 24, 32, 40
CHILD_ERR = 0xF00                                      # child setup failure: stage, errno

LDT_ENTRY = 1
MASK32 = 0xFFFF_FFFF
RSP_HIGH = 0x0000_7A5E_0000_0000                      # canonical user half, 64-bit rounds
#: bits 16..31 of these are neither 0 (espfix_stack's own bits 16..31) nor a pattern a
#: kernel stack would have by design; two values make a chance match ~2^-32.
RSP_LOW = (0xC0DE_1230, 0x3F21_7FF0)

STAGES = {1: "sched_setaffinity", 2: "modify_ldt", 3: "ptrace(PTRACE_TRACEME)",
          4: "prctl(PR_SET_PDEATHSIG)"}

#: A round whose child never ran its loop (a busy machine: on a 72-vCPU TCG guest, 1 of
#: 288 rounds) is run again with the duration multiplied by these factors, at most
#: RETRY_MAX_SECONDS each, before it is reported as "could not run".
RETRY_FACTORS = (4, 16)
RETRY_MAX_SECONDS = 10.0


class Verdict(StrEnum):
    """The verdict of one round trip (:func:`judge`).  A ``str`` enum: the JSON and the
    table carry the bare value, spelt as before (``"ok"``, ``"NO-FRAME"``)."""

    OK = "ok"                          # the return happened and nothing leaked
    LEAK = "LEAK"                      # kernel bits in RSP[31:16] (or any RSP bit, 64-bit)
    NO_FRAME = "NO-FRAME"              # the ministack does not hold this round's frame
    CONTROL_FAILED = "CONTROL-FAILED"  # the flat-SS control left a frame in the ministack
    IDLE = "IDLE"                      # the child never ran its loop (retried)
    COULD_NOT_RUN = "could not run"    # still idle after the retries: proves nothing
    UNJUDGED = "?"                     # not judged yet


#: Verdicts that are findings (exit 1); "could not run" is not one.
FINDING_VERDICTS = (Verdict.LEAK, Verdict.NO_FRAME, Verdict.CONTROL_FAILED)
COULD_NOT_RUN = Verdict.COULD_NOT_RUN


@dataclass(frozen=True)
class Mode:
    name: str
    cs: int
    code_off: int
    flat_ss: bool = False         # the negative control: no LDT stack segment

    @property
    def compat(self) -> bool:
        return self.cs == USER32_CS


MODE64 = Mode("64-bit", USER_CS, CODE64)
MODE32 = Mode("compat", USER32_CS, CODE32)
CONTROL = Mode("control", USER_CS, CONTROL64, flat_ss=True)


@dataclass
class RoundTrip:
    cpu: int
    mode: str
    cs: int
    ss: int
    rsp_set: int
    rsp_back: int | None = None           # saved user RSP after the child was stopped
    iterations: int = 0
    interruptions: int = 0                 # gaps the child saw in its own TSC stream
    child_mismatches: int = 0
    child_last_bad: int | None = None
    timer_irqs: int | None = None          # /proc/interrupts LOC on that CPU meanwhile
    frame: dict[str, int] | None = None   # the ministack's frame after the round
    frame_checked: bool = False
    verdict: Verdict = Verdict.UNJUDGED
    reasons: list[str] = field(default_factory=list)
    duration: float = 0.0                  # seconds the child was let run (last attempt)
    attempts: int = 1                      # > 1: the child never ran and the round was retried

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("cs", "ss", "rsp_set", "rsp_back", "child_last_bad"):
            d[k] = None if d[k] is None else f"{d[k]:#x}"
        if self.frame is not None:
            d["frame"] = {k: f"{v:#x}" for k, v in self.frame.items()}
        return d


def judge(rt: RoundTrip, mode: Mode, code_range: range) -> None:
    """Set rt.verdict and rt.reasons from what was observed.  Pure: tests feed it frames.

    LEAK: a returned RSP differs from the one set (64-bit: all bits; compat: bits 0..31;
    the interesting ones are 16..31).  NO-FRAME: the ministack does not hold this round's
    IRET frame although /proc/kcore was read.  IDLE: nothing proves a return happened.
    The control round (flat SS) must NOT leave its frame in the ministack.
    """
    reasons: list[str] = []
    leak = False
    want = rt.rsp_set if not mode.compat else rt.rsp_set & MASK32
    if rt.child_mismatches:
        leak = True
        bad = rt.child_last_bad or 0
        reasons.append(f"the child saw RSP {bad:#x} after {rt.child_mismatches} "
                       f"interruption(s), set {want:#x} (bits 16..31: {(bad >> 16) & 0xFFFF:#06x} "
                       f"vs {(want >> 16) & 0xFFFF:#06x})")
    if rt.rsp_back is not None:
        back = rt.rsp_back if not mode.compat else rt.rsp_back & MASK32
        if back != want:
            leak = True
            reasons.append(f"saved RSP after the round is {rt.rsp_back:#x}, set {rt.rsp_set:#x}")
        elif mode.compat and rt.rsp_back >> 32:
            reasons.append(f"RSP[63:32] came back as {rt.rsp_back >> 32:#x} "
                           "(vendor behaviour of IRET to compat mode, not a leak)")
    no_frame = False
    if rt.frame_checked:
        f = rt.frame
        ours = (f is not None and f["rip"] in code_range and f["cs"] == rt.cs
                and f["ss"] == rt.ss)
        if mode.flat_ss:
            if ours:
                no_frame = True
                reasons.append("control round with a flat SS left a frame in the ministack: "
                               "the frame check would not tell espfix returns apart")
        elif not ours:
            no_frame = True
            reasons.append("the ministack does not hold this child's IRET frame: "
                           + ("it is empty" if f is None else
                              f"it holds RIP {f['rip']:#x} CS {f['cs']:#x} SS {f['ss']:#x}"))
        elif f is not None and (f["rsp"] >> 16) & 0xFFFF != (want >> 16) & 0xFFFF:
            leak = True
            reasons.append(f"the ministack frame's RSP {f['rsp']:#x} has bits 16..31 "
                           f"{(f['rsp'] >> 16) & 0xFFFF:#06x}, the child's are "
                           f"{(want >> 16) & 0xFFFF:#06x}")
    if leak:
        rt.verdict = Verdict.LEAK
    elif no_frame:
        rt.verdict = Verdict.NO_FRAME if not mode.flat_ss else Verdict.CONTROL_FAILED
    elif rt.iterations == 0:
        rt.verdict = Verdict.IDLE
        reasons.append("the child never ran its loop")
    else:
        rt.verdict = Verdict.OK
    rt.reasons = reasons


# --------------------------------------------------------------------------- probing

def timer_irqs() -> dict[int, int]:
    """LOC (local timer interrupts) per online CPU from /proc/interrupts."""
    try:
        with open("/proc/interrupts") as f:
            header = f.readline().split()
            for line in f:
                parts = line.split()
                if parts and parts[0] == "LOC:":
                    cpus = [int(h[3:]) for h in header if h.startswith("CPU")]
                    return {c: int(v) for c, v in zip(cpus, parts[1:1 + len(cpus)])}
    except (OSError, ValueError):
        pass
    return {}


def tsc_threshold() -> int:
    """Gap that counts as an interruption: 2 us of TSC cycles ("cpu MHz", else 2 GHz)."""
    mhz = 2000.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    mhz = float(line.split(":")[1])
                    break
    except (OSError, ValueError):
        pass
    return max(1000, int(mhz * 2))


def _seccomp_mode() -> str:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1]
    except OSError:
        pass
    return "?"


def setup_error(stage: int, err: int) -> InspectError:
    """One clear line for a child that could not be set up."""
    name = STAGES.get(stage, "setup")
    if stage == 2:
        if err == 38:          # ENOSYS
            return InspectError("modify_ldt is not available: the kernel was built without "
                                "CONFIG_MODIFY_LDT_SYSCALL (ENOSYS)",
                                "nothing can reach espfix from user space on this kernel")
        if err == 1 or (err == 22 and _seccomp_mode() == "2"):
            return InspectError(f"modify_ldt was refused ({os.strerror(err)}): a seccomp "
                                f"filter blocks it (Seccomp mode {_seccomp_mode()})",
                                "run outside the container or sandbox, or allow modify_ldt "
                                "in its seccomp profile")
        if err == 22:          # EINVAL for a 16-bit segment
            return InspectError("the kernel refuses 16-bit LDT segments (EINVAL): "
                                "CONFIG_X86_16BIT is off, or a Xen PV guest",
                                "espfix is not reachable here; nothing to exercise")
    if stage == 3:
        return InspectError(f"ptrace(PTRACE_TRACEME) refused: {os.strerror(err)}",
                            "allow ptrace (kernel.yama.ptrace_scope < 3, no seccomp filter "
                            "on ptrace, CAP_SYS_PTRACE in containers)")
    if stage == 1:
        return InspectError(f"cannot pin the child to its CPU: {os.strerror(err)}",
                            "pick online CPUs allowed by this cpuset ({cpus})", field="cpu")
    return InspectError(f"child setup failed at {name}: {os.strerror(err)}", "see dmesg")


def refuse_if_fred() -> None:
    facts = read_host_facts()
    if facts.fred:
        raise InspectError("espfix is not used on this machine: the kernel runs with FRED, "
                           "whose ERETU restores the full RSP (init_espfix_bsp() returns "
                           "early), so there is no espfix return path to exercise",
                           "nothing to do; boot with fred=off to exercise espfix")


# --------------------------------------------------------------------------- the child

def _child(page: SharedPage, cpu: int, parent: int) -> None:   # pragma: no cover - forked
    stage = 4
    try:
        # Die with the parent, whatever kills it: a child left spinning with a 16-bit SS
        # would burn a CPU forever, reparented to init.  The parent may already be gone.
        die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(6)
        stage = 1
        os.sched_setaffinity(0, {cpu})
        stage = 2
        modify_ldt_write(data16_desc(LDT_ENTRY))
        stage = 3
        ptrace(PTRACE_TRACEME, 0)
        os.kill(os.getpid(), signal.SIGSTOP)
    except OSError as e:
        page.write(CHILD_ERR, struct.pack("<ii", stage, e.errno or 0))
        os._exit(3)
    os._exit(4)        # not reached: the parent redirects the child before it resumes


@contextmanager
def traced_child(page: SharedPage, cpu: int) -> Iterator[int]:
    """A stopped, traced child pinned to *cpu* with our LDT entry; always killed and
    reaped on exit (exceptions and Ctrl-C included)."""
    page.write(CHILD_ERR, bytes(8))
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:                                          # pragma: no cover
        try:
            _child(page, cpu, parent)
        finally:
            os._exit(5)
    try:
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):
            stage, err = struct.unpack("<ii", page.read(CHILD_ERR, 8))
            pid = 0                                       # already reaped
            raise setup_error(stage, err)
        # and the kernel kills the tracee if this tracer exits in any way
        ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_EXITKILL)
        yield pid
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise InspectError(f"the exercise child died ({_status_text(status)})",
                               "check dmesg for a fault in the espfix return path")
        # another signal stop (e.g. SIGSEGV from a bad IRET): report it
        raise InspectError(f"the exercise child stopped with signal "
                           f"{signal.Signals(os.WSTOPSIG(status)).name} instead of running",
                           "check dmesg: the kernel refused the IRET frame")


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def round_trip(page: SharedPage, pid: int, cpu: int, mode: Mode, rsp_low: int,
               duration: float, threshold: int, base_regs,
               frame_of: Callable[[int], dict[str, int] | None] | None) -> RoundTrip:
    ss = USER_DS if mode.flat_ss else ldt_selector(LDT_ENTRY)
    rsp = rsp_low if mode.compat else RSP_HIGH | rsp_low
    rt = RoundTrip(cpu, mode.name, mode.cs, ss, rsp, duration=duration)
    data = page.addr + DATA
    page.write(DATA, bytes(64))
    page.write(DATA + EXPECT, struct.pack("<Q", rsp))
    page.write(DATA + THRESH, struct.pack("<Q", threshold))
    regs = type(base_regs).from_buffer_copy(base_regs)
    regs.rip = page.addr + mode.code_off
    regs.cs, regs.ss, regs.rsp, regs.rsi = mode.cs, ss, rsp, data
    regs.orig_rax = MASK64                 # -1, not in a syscall: no restart on resume
    regs.eflags = 0x202                    # IF
    regs.ds = regs.es = USER_DS
    setregs(pid, regs)
    before = timer_irqs().get(cpu)
    ptrace(PTRACE_CONT, pid, 0, None)
    time.sleep(duration)
    _stop(pid)
    after = timer_irqs().get(cpu)
    if before is not None and after is not None:
        rt.timer_irqs = after - before
    rt.rsp_back = getregs(pid).rsp
    it, gaps, bad, last_bad = struct.unpack("<IxxxxIxxxxIxxxxQ", page.read(DATA, 32))
    rt.iterations, rt.interruptions, rt.child_mismatches = it, gaps, bad
    rt.child_last_bad = last_bad if bad else None
    if frame_of is not None:
        rt.frame = frame_of(cpu)
        rt.frame_checked = True
    code = SPIN32 if mode.compat else SPIN64
    judge(rt, mode, range(page.addr + mode.code_off, page.addr + mode.code_off + len(code)))
    return rt


def exercise(cpus: list[int], duration: float = 0.25,
             state: EspfixState | None = None, control: bool = False,
             progress: Callable[[int], object] | None = None) -> list[RoundTrip]:
    """Run every round trip on every CPU in *cpus*.  With *state* (a live /proc/kcore
    state) each round is tied to the CPU's ministack.  *progress* is called with the
    1-based position of each CPU as its rounds start (inspector.progress)."""
    refuse_if_fred()
    page = SharedPage()
    try:
        page.write(CODE64, SPIN64)
        page.write(CODE32, SPIN32)
        page.write(CONTROL64, SPIN64)
        threshold = tsc_threshold()
        frame_of = (lambda c: state.frame(c, fresh=True)) if state is not None else None
        out: list[RoundTrip] = []
        plan = [(MODE64, lo) for lo in RSP_LOW] + [(MODE32, lo) for lo in RSP_LOW]
        if control:
            plan.append((CONTROL, RSP_LOW[0]))
        for n, cpu in enumerate(cpus, 1):
            if progress is not None:
                progress(n)
            with traced_child(page, cpu) as pid:
                base = getregs(pid)
                for mode, lo in plan:
                    rt = round_trip(page, pid, cpu, mode, lo, duration, threshold, base,
                                    frame_of)
                    for factor in RETRY_FACTORS:
                        if rt.verdict != Verdict.IDLE:
                            break
                        longer = min(duration * factor, RETRY_MAX_SECONDS)
                        rt = replace(round_trip(page, pid, cpu, mode, lo, longer, threshold,
                                                base, frame_of), attempts=rt.attempts + 1)
                    if rt.verdict == Verdict.IDLE:
                        rt.verdict = Verdict.COULD_NOT_RUN
                        rt.reasons.append(f"still idle after {rt.attempts} attempts (the "
                                          f"last {rt.duration:g} s): the machine is too "
                                          "busy; this round proves nothing either way")
                    elif rt.attempts > 1:
                        rt.reasons.append(f"ran on attempt {rt.attempts} ({rt.duration:g} s): "
                                          "the child did not get the CPU at first")
                    out.append(rt)
        return out
    finally:
        page.close()
