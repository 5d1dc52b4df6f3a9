"""`espfix-inspect trace`: BCC probes on the espfix init path, modify_ldt and the returns
through espfix, in the conventions of bcc's tools.  The BPF side and its loader live in
probes/ (espfix.bpf.c, trace.py); this module parses arguments, ties each init event to
a fresh `validate` of that CPU, and prints.
"""
from __future__ import annotations

import argparse
import signal
import time

from .cliutil import HelpFormatter
from .errors import EXIT_OK, InspectError
from .model import parse_cpu_list
from .safetext import print_out
from .target import KCORE_PATH

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from .state import EspfixState
    from .target import Target

EXAMPLES = """examples:
    espfix-inspect trace                 # everything, until Ctrl-C
    espfix-inspect trace 30              # for 30 seconds
    espfix-inspect trace -p 1234         # modify_ldt and returns of one process only
    espfix-inspect trace --json 10       # one JSON object per line
    espfix-inspect trace --no-returns    # init_espfix_ap and modify_ldt only
    espfix-inspect trace --summary --no-returns --no-ldt   # online CPUs, then Ctrl-C:
                                         # the init summary alone
    espfix-inspect trace --ebpf          # print the BPF program and exit

what is traced:
    INIT    init_espfix_ap(cpu), kprobe + kretprobe: target CPU, the CPU and task that ran
            it, latency, whether it set the CPU up or returned early, and which pages it
            allocated (stack, PMD, PTE); then `validate` of that CPU through /proc/kcore
    LDT     modify_ldt(2) calls with the struct user_desc they install (16-bit or not)
    HOLDER  at start: the processes whose mm has an LDT now (task-list walk in BPF)
    RETURNS at the end: returns to user mode through espfix, per CPU and task, counted at
            the irq_vectors:*_exit, exceptions:page_fault_user, rt_sigreturn and
            raw_syscalls:sys_exit tracepoints (see docs/commands.md, trace, for what is and is not counted)
    SUMMARY at the end: the init_espfix_ap calls (set up / early return, latency
            percentiles and a log2 histogram as funclatency prints it), the pages they
            allocated next to what `layout` predicts for the CPUs that came up, time
            blocked on espfix_init_mutex (lock:contention_begin/end, v5.19+), and the
            CPU that ran each call (--summary: this alone, no INIT or LDT lines)

exit status: 0 traced until Ctrl-C, SIGTERM or the duration; 2 could not trace
"""


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="BCC probes: init_espfix_ap, modify_ldt, espfix returns",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("duration", nargs="?", type=float, help="seconds to trace (default: until "
                   "Ctrl-C)")
    p.add_argument("-p", "--pid", type=int, help="only this process (modify_ldt, returns)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--summary", action="store_true",
                   help="print only the init summary at the end, no INIT or LDT lines")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program and exit")
    p.add_argument("--no-init", action="store_true", help="do not probe init_espfix_ap")
    p.add_argument("--no-ldt", action="store_true", help="do not trace modify_ldt")
    p.add_argument("--no-returns", action="store_true", help="do not count espfix returns")
    p.add_argument("--no-holders", action="store_true", help="do not list LDT holders at start")
    p.add_argument("--no-lock", action="store_true",
                   help="do not time waits on espfix_init_mutex (lock:contention_* "
                        "tracepoints, which fire for every contended lock in the system)")
    p.add_argument("--return-sources", metavar="LIST",
                   help="count returns only at these tracepoints (comma-separated event "
                        "names, e.g. local_timer_exit,page_fault_user; default: all)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not validate a CPU through /proc/kcore after its init event")


def _want(args: argparse.Namespace) -> set[str]:
    want = {"init", "ldt", "returns", "holders", "lock"}
    for name in list(want):
        if getattr(args, f"no_{name}"):
            want.discard(name)
    return want


def _sources(args: argparse.Namespace, tr) -> set[str] | None:
    if not args.return_sources:
        return None
    names = {n.strip() for n in args.return_sources.split(",") if n.strip()}
    known = {ev for _cat, ev, _irq, _what in tr.RETURN_SOURCES}
    unknown = sorted(names - known)
    if unknown:
        raise InspectError(f"unknown return source {unknown[0]!r}",
                           f"choose from {', '.join(sorted(known))}")
    return names


class LiveVerifier:
    """`validate` of one CPU after its init event.  The live target (its kallsyms
    parse is the costly part) stays open between events; every check gets a fresh
    page cache (Target.fresh_memory), as `watch` does."""

    def __init__(self) -> None:
        self.target: Target | None = None

    def _fresh_state(self) -> EspfixState:
        """The live state read anew, through the /proc/kcore target opened once."""
        from .hostfacts import target_host_facts
        from .state import load_state
        from .target import open_target
        if self.target is None:
            self.target = open_target(KCORE_PATH, None)
        target = self.target
        target.fresh_memory()
        return load_state(target, target_host_facts(target))

    def verify(self, cpu: int) -> dict:
        from .audit import audit
        try:
            state = self._fresh_state()
            result = audit(state)
        except InspectError as e:
            self.close()
            return {"verdict": "not checked", "why": e.cause}
        mine = [f for f in result.findings if f.severity != "info" and
                (f.cpu == cpu or f.cpu is None or (f.affects is not None and cpu in f.affects))]
        st = state.cpus.get(cpu)
        return {"verdict": "ok" if not mine else "FINDINGS",
                "online": bool(st and st.online), "initialised": bool(st and st.initialised),
                "findings": [f.as_dict() for f in mine]}

    def initialised(self) -> tuple[set[int], str]:
        """The CPUs with a ministack now, for the summary's layout prediction: from
        per_cpu(espfix_stack) through /proc/kcore, else (no kcore) the online CPUs,
        which all have one."""
        try:
            state = self._fresh_state()
            return ({c for c, st in state.cpus.items() if st.initialised},
                    "espfix_stack read through /proc/kcore")
        except (InspectError, OSError, ValueError) as e:
            self.close()
            why = e.cause if isinstance(e, InspectError) else str(e)
            try:
                with open("/sys/devices/system/cpu/online") as f:
                    online = set(parse_cpu_list(f.read(4096)))
            except (OSError, ValueError):
                online = set()
            return online, f"the online CPUs; /proc/kcore unusable: {why}"

    def close(self) -> None:
        if self.target is not None:
            self.target.close()
            self.target = None


def _ebpf_listing(tr, want: set[str], sources: set[str] | None, pid: int | None) -> str:
    """--ebpf: the program as it would be loaded here (symbols when kallsyms shows them)."""
    try:
        syms = tr.kernel_symbols()
    except InspectError:
        syms = None
    plan = tr.Plan(init="init" in want, ldt="ldt" in want, holders="holders" in want,
                   lock="init" in want and "lock" in want,
                   returns=[i for i, (_c, ev, _i, _w) in enumerate(tr.RETURN_SOURCES)
                            if sources is None or ev in sources] if "returns" in want else [],
                   irq_regs=syms is not None and "__irq_regs" in syms)
    text, flags = tr.program_text(plan, syms, pid)
    return tr.ebpf_listing(text, flags)


def cmd_trace(args: argparse.Namespace) -> int:

    from probes import trace as tr
    from .cliutil import Terminated

    want = _want(args)
    sources = _sources(args, tr)
    if args.ebpf:
        print_out(_ebpf_listing(tr, want, sources, args.pid))
        return EXIT_OK
    if args.duration is not None and args.duration <= 0:
        raise InspectError(f"duration {args.duration} must be positive", "give seconds, e.g. 10")
    tr.preflight()
    BPF = tr.import_bcc()
    syms = tr.kernel_symbols()
    plan = tr.make_plan(BPF, syms, want, sources)
    if not (plan.init or plan.ldt or plan.returns or plan.holders):
        raise InspectError("nothing can be traced on this kernel: " + "; ".join(plan.missing),
                           "see man espfix-inspect-trace, REQUIREMENTS")

    from .trace_output import JsonTrace, TextTrace
    out = (JsonTrace if args.json else TextTrace)(lambda text: print_out(text, flush=True),
                                                  events=not args.summary)
    # Ctrl-C and SIGTERM end the trace between two polls, so that no event already
    # read from the ring buffers is dropped; SIGINT is set explicitly because a shell
    # leaves it ignored for background jobs.
    stop: list[str] = []
    signal.signal(signal.SIGINT, lambda *_: stop.append("Ctrl-C"))
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    session = tr.TraceSession(plan, syms, args.pid)
    verifier = LiveVerifier()
    t0 = time.monotonic()
    reason = "duration"
    inits: list[dict] = []
    before: set[int] = set()
    before_source = ""

    def handle(events: list[dict]) -> None:
        for ev in events:
            if ev["type"] == "init":
                if not args.no_verify:
                    ev["validate"] = verifier.verify(ev["target_cpu"])
                inits.append(ev)
            # bpf_ktime_get_ns() is CLOCK_MONOTONIC, the clock of time.monotonic()
            out.event(ev, ev["ts_ns"] / 1e9 - t0)

    try:
        if plan.init:
            # The CPUs with a ministack once the probes are live: what the summary's
            # layout prediction starts from.
            before, before_source = verifier.initialised()
        out.start(plan.describe(), plan.missing, args.pid, args.duration)
        holders, walked, cut = session.ldt_holders()
        if plan.holders:
            out.holders(holders, walked, cut)
        out.ready()
        while not stop:
            left = None if args.duration is None else args.duration - (time.monotonic() - t0)
            if left is not None and left <= 0:
                break
            wait = 250 if left is None else max(1, min(250, int(left * 1000)))
            if plan.init or plan.ldt:
                handle(session.poll(wait))
            else:
                time.sleep(wait / 1000)
        if stop:
            reason = stop[0]
        handle(session.poll(0))             # what arrived before the end
    except (KeyboardInterrupt, Terminated):  # a second signal while finishing
        reason = stop[0] if stop else "interrupted"
    try:
        rows, looked, counted = session.returns()
    finally:
        session.close()                      # probes detached on every path
        verifier.close()
    elapsed = time.monotonic() - t0
    if plan.returns:
        out.returns(rows, looked, counted, elapsed)
    if plan.init:
        from .trace_summary import summarize
        out.summary(summarize(inits, before, before_source, plan.lock_why))
    out.end(reason, elapsed, looked, counted)
    return EXIT_OK


COMMANDS = {"trace": cmd_trace}
