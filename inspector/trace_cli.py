"""`espfix-inspect trace`: BCC probes on the espfix init path, modify_ldt and the returns
through espfix, in the conventions of bcc's tools.  The BPF side and its loader live in
probes/ (espfix.bpf.c, trace.py); this module parses arguments, ties each init event to
a fresh `validate` of that CPU, and prints.
"""
from __future__ import annotations

import argparse
import json
import signal
import time

from .errors import EXIT_OK, InspectError
from .safetext import print_out
from .target import KCORE_PATH

EXAMPLES = """examples:
    espfix-inspect trace                 # everything, until Ctrl-C
    espfix-inspect trace 30              # for 30 seconds
    espfix-inspect trace -p 1234         # modify_ldt and returns of one process only
    espfix-inspect trace --json 10       # one JSON object per line
    espfix-inspect trace --no-returns    # init_espfix_ap and modify_ldt only
    espfix-inspect trace --ebpf          # print the BPF program and exit

what is traced:
    INIT    init_espfix_ap(cpu), kprobe + kretprobe: target CPU, the CPU and task that ran
            it, latency, whether it set the CPU up or returned early, and which pages it
            allocated (stack, PMD, PTE); then `validate` of that CPU through /proc/kcore
    LDT     modify_ldt(2) calls with the struct user_desc they install (16-bit or not)
    HOLDER  at start: the processes whose mm has an LDT now (task-list walk in BPF)
    RETURNS at the end: returns to user mode through espfix, per CPU and task, counted at
            the irq_vectors:*_exit, exceptions:page_fault_user, rt_sigreturn and
            raw_syscalls:sys_exit tracepoints (see README for what is and is not counted)

exit status: 0 traced until Ctrl-C, SIGTERM or the duration; 2 could not trace
"""


def add_parser(sub) -> None:
    p = sub.add_parser("trace", help="BCC probes: init_espfix_ap, modify_ldt, espfix returns",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("duration", nargs="?", type=float, help="seconds to trace (default: until "
                   "Ctrl-C)")
    p.add_argument("-p", "--pid", type=int, help="only this process (modify_ldt, returns)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--ebpf", action="store_true", help="print the BPF program and exit")
    p.add_argument("--no-init", action="store_true", help="do not probe init_espfix_ap")
    p.add_argument("--no-ldt", action="store_true", help="do not trace modify_ldt")
    p.add_argument("--no-returns", action="store_true", help="do not count espfix returns")
    p.add_argument("--no-holders", action="store_true", help="do not list LDT holders at start")
    p.add_argument("--return-sources", metavar="LIST",
                   help="count returns only at these tracepoints (comma-separated event "
                        "names, e.g. local_timer_exit,page_fault_user; default: all)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not validate a CPU through /proc/kcore after its init event")


def _want(args: argparse.Namespace) -> set[str]:
    want = {"init", "ldt", "returns", "holders"}
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
        self.target = None

    def verify(self, cpu: int) -> dict:
        from .audit import audit
        from .state import load_state
        from .target import open_target
        try:
            if self.target is None:
                self.target = open_target(KCORE_PATH, None)
            self.target.fresh_memory()
            state = load_state(self.target)
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

    def close(self) -> None:
        if self.target is not None:
            self.target.close()
            self.target = None


def _init_line(ev: dict) -> str:
    alloc = f"; allocated: {', '.join(ev['allocated'])}" if ev["allocated"] else ""
    v = ev.get("validate")
    ver = ""
    if v is not None:
        ver = f"; validate cpu {ev['target_cpu']}: {v['verdict']}"
        if v["verdict"] == "not checked":
            ver += f" ({v['why']})"
        for f in v.get("findings", []):
            ver += f"\n          {f['severity']} {f['check']}: {f['message']}"
    return (f"cpu {ev['target_cpu']} brought up by cpu {ev['cpu']} (pid {ev['pid']} "
            f"{ev['comm']}), {ev['latency_us']} us: {ev['outcome']}{alloc}{ver}")


def _ldt_line(ev: dict) -> str:
    head = f"pid {ev['pid']} ({ev['comm']}) modify_ldt({ev['func']:#x})"
    if "entry" in ev:
        bits = "16-bit" if ev["sixteen_bit"] else ("64-bit" if ev["lm"] else
                                                    "32-bit" if ev["seg_32bit"] else "empty")
        head += (f": entry {ev['entry']} (selector {ev['selector']}), {bits} {ev['kind']}, "
                 f"base {ev['base']} limit {ev['limit']}")
    return f"{head} -> {ev['ret']}"


def cmd_trace(args: argparse.Namespace) -> int:
    from probes import trace as tr
    from .cli import Terminated

    want = _want(args)
    sources = _sources(args, tr)
    if args.ebpf:
        try:
            syms = tr.kernel_symbols()
        except InspectError:
            syms = None
        plan = tr.Plan(init="init" in want, ldt="ldt" in want, holders="holders" in want,
                       returns=[i for i, (_c, ev, _i, _w) in enumerate(tr.RETURN_SOURCES)
                                if sources is None or ev in sources] if "returns" in want else [],
                       irq_regs=syms is not None and "__irq_regs" in syms)
        text, flags = tr.program_text(plan, syms, args.pid)
        print_out(tr.ebpf_listing(text, flags))
        return EXIT_OK
    if args.duration is not None and args.duration <= 0:
        raise InspectError(f"duration {args.duration} must be positive", "give seconds, e.g. 10")
    tr.preflight()
    BPF = tr.import_bcc()
    syms = tr.kernel_symbols()
    plan = tr.make_plan(BPF, syms, want, sources)
    if not (plan.init or plan.ldt or plan.returns or plan.holders):
        raise InspectError("nothing can be traced on this kernel: " + "; ".join(plan.missing),
                           "see README, trace: requirements")

    def emit(doc: dict, line: str) -> None:
        print_out(json.dumps(doc) if args.json else line, flush=True)

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

    def handle(events: list[dict]) -> None:
        for ev in events:
            # bpf_ktime_get_ns() is CLOCK_MONOTONIC, the clock of time.monotonic()
            ts = ev.pop("ts_ns") / 1e9 - t0
            if ev["type"] == "init":
                if not args.no_verify:
                    ev["validate"] = verifier.verify(ev["target_cpu"])
                emit({**ev, "t": round(ts, 3)}, f"{ts:9.3f}  INIT   {_init_line(ev)}")
            else:
                emit({**ev, "t": round(ts, 3)}, f"{ts:9.3f}  LDT    {_ldt_line(ev)}")

    try:
        if not args.json:
            emit({}, f"Tracing {plan.describe()}" + (f" for pid {args.pid}" if args.pid else "")
                 + (f" for {args.duration:g} s" if args.duration else "") + ". Ctrl-C to end.")
            for m in plan.missing:
                emit({}, f"not traced: {m}")
        else:
            emit({"type": "start", "tracing": plan.describe(), "missing": plan.missing}, "")
        holders, walked, cut = session.ldt_holders()
        if plan.holders:
            if args.json:
                for h in holders:
                    emit(h, "")
            else:
                names = ", ".join(f"{h['pid']} ({h['comm']}, {h['nr_entries']} entries)"
                                  for h in holders) or "none"
                emit({}, f"LDT holders now ({walked} processes walked"
                         f"{', cut short' if cut else ''}): {names}")
        if not args.json:
            emit({}, f"{'TIME(s)':>9}  {'EVENT':6} DETAILS")
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
        if args.json:
            for r in rows:
                emit(r, "")
        else:
            from tabulate import tabulate
            emit({}, f"\nreturns through espfix: {counted} counted of {looked} "
                     f"return-to-user events seen in {elapsed:.1f} s")
            if rows:
                emit({}, tabulate([[r["cpu"], r["pid"], r["comm"], r["ss"], r["cs"],
                                    r["source"], r["count"]] for r in rows],
                                  headers=["CPU", "PID", "COMM", "SS", "CS", "SOURCE",
                                           "COUNT"]))
    emit({"type": "end", "reason": reason, "seconds": round(elapsed, 3),
          "looked": looked, "counted": counted},
         f"ended ({reason}) after {elapsed:.1f} s; probes detached")
    return EXIT_OK


COMMANDS = {"trace": cmd_trace}
