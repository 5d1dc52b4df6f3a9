#!/usr/bin/env python3
"""Where one live ``validate --json`` (or ``stacks --json``) spends its time, phase by phase.

    python3 bench/live_phases.py validate|stacks        (root, a live kernel; prints JSON)

Does what ``cmd_validate``/``cmd_stacks`` do, through the same functions, with a clock
around each step: the imports the command needs, argparse, the ELF headers of
/proc/kcore, /proc/kallsyms (read alone first, then read and resolved as the tool does),
matching the symbols to the core (VMCOREINFO SYMBOLs, linux_banner), the state read, the
audit and the JSON rendering.  The interpreter's own start is not in here: bench/
live_guest.py times ``python3 -c pass`` for that.
"""
from __future__ import annotations

import io
import json
import sys
import time

T0 = time.perf_counter()


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "validate"
    marks: list[tuple[str, float]] = []
    last = [T0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        marks.append((name, now - last[0]))
        last[0] = now

    from inspector import cli
    from inspector import target as tg
    from inspector.hostfacts import target_host_facts
    from inspector.state import load_state
    if cmd == "validate":
        from inspector.audit import audit
    from inspector import report
    mark("imports")
    args = cli.build_parser().parse_args([cmd, "--json"])
    mark("argparse")
    core = tg.ElfCore(tg.KCORE_PATH)
    mark("kcore ELF headers")
    with open(tg.KALLSYMS_PATH, "rb") as f:
        raw = f.read()
    mark("read /proc/kallsyms alone")
    del raw
    mem = tg.CoreMemory(core)
    syms = _load_kallsyms(tg, core)
    mark("read + resolve kallsyms")
    syms = tg.bind_symbols(syms, core, mem)
    target = tg.Target(core, mem, syms, core.vmcoreinfo, True, tg._meta(core))
    mark("match symbols to core")
    state = load_state(target, target_host_facts(target))
    mark("state read (incl. sysfs)")
    out = io.StringIO()
    if cmd == "validate":
        result = audit(state)
        mark("audit")
        if hasattr(report, "write_validate_json"):      # issue 13: what the CLI calls
            report.write_validate_json(out, state, result)
        else:
            out.write(report.dumps(report.validate_json(state, result)))
    elif hasattr(report, "write_stacks_json"):
        report.write_stacks_json(out, state, list(state.cpus))
    else:
        out.write(report.dumps(report.stacks_json(state, list(state.cpus))))
    mark("render JSON")
    target.close()
    total = time.perf_counter() - T0
    del args
    print(json.dumps({"command": cmd,
                      "phases_ms": {n: round(s * 1000, 1) for n, s in marks},
                      "total_ms": round(total * 1000, 1),
                      "pages_read": mem.stats.pages_read, "core_reads": core.reads,
                      "symbols_resolved": len(syms.addresses),
                      "modules": sorted(m for m in sys.modules
                                        if m.split(".")[0] in ("elftools", "tabulate", "ctypes",
                                                               "bcc"))}))
    return 0


def _load_kallsyms(tg, core):
    """The symbol step of open_target() for a live kernel."""
    names = getattr(tg, "live_symbol_names", None)
    if names is not None:                       # the targeted scan (issue 13)
        return tg.load_symbols(tg.KALLSYMS_PATH, names(core.vmcoreinfo))
    return tg.load_symbols(tg.KALLSYMS_PATH)


if __name__ == "__main__":
    sys.exit(main())
