#!/usr/bin/env python3
"""The reference reader for bench/bench_live.py: drgn doing the reads ``validate`` and
``stacks`` need, on the live kernel, without debug info.

    python3 bench/drgn_espfix.py [--kallsyms memory|proc] [--json]

``Program().set_kernel()`` opens /proc/kcore.  With no vmlinux, drgn's symbols come
from kallsyms: ``--kallsyms memory`` (the default) decodes the kernel's own compressed
tables (``kallsyms_names``, ``kallsyms_token_table``... located through VMCOREINFO,
Linux 6.0+, drgn's ``_load_builtin_kallsyms``); ``--kallsyms proc`` parses
/proc/kallsyms in drgn's C code (what ``load_vmlinux_kallsyms()`` picks for root on a
live kernel).  Then it reads ``nr_cpu_ids``, ``__cpu_possible_mask``,
``__per_cpu_offset[]``, every possible CPU's ``espfix_stack`` and ``espfix_waddr``, and
the 48-byte IRET frame at ``espfix_stack`` (drgn walks the page tables for the espfix
alias; if it cannot, the frame is read through ``espfix_waddr`` in the direct map, and
``frame_via`` says which).  The JSON it prints is compared with ``stacks --json`` by
the benchmark, so both sides are known to have read the same thing.

Needs python3-drgn 0.0.25+ (``drgn.helpers.linux.kallsyms``); Debian bookworm's 0.0.22
has no kallsyms support, so the bookworm rows cannot run it.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time

MASK64 = (1 << 64) - 1
FRAME = ("rax", "rip", "cs", "rflags", "rsp", "ss")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kallsyms", choices=("memory", "proc"), default="memory")
    ap.add_argument("--json", action="store_true", help="print what was read")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import drgn
    from drgn import FaultError, Program
    from drgn.helpers.linux import kallsyms as ks

    prog = Program()
    prog.set_kernel()
    t_kernel = time.perf_counter()
    if args.kallsyms == "memory":
        index = ks._load_builtin_kallsyms(prog)
    else:
        index = ks.load_vmlinux_kallsyms(prog)
    prog.register_symbol_finder("kallsyms", index, enable_index=0)
    t_syms = time.perf_counter()

    def sym(name: str) -> int:
        return prog.symbol(name).address

    nr = prog.read_u32(sym("nr_cpu_ids"))
    words = struct.unpack(f"<{(nr + 63) // 64}Q", prog.read(sym("__cpu_possible_mask"),
                                                            8 * ((nr + 63) // 64)))
    possible = [c for c in range(nr) if words[c >> 6] >> (c & 63) & 1]
    offsets = struct.unpack(f"<{nr}Q", prog.read(sym("__per_cpu_offset"), 8 * nr))
    stack_sym, waddr_sym = sym("espfix_stack"), sym("espfix_waddr")
    cpus = {}
    via = set()
    for cpu in possible:
        stack = prog.read_u64((stack_sym + offsets[cpu]) & MASK64)
        waddr = prog.read_u64((waddr_sym + offsets[cpu]) & MASK64)
        frame = None
        if stack:
            try:
                raw = prog.read(stack, 48)
                via.add("espfix_stack")
            except FaultError:
                raw = prog.read(waddr, 48)
                via.add("espfix_waddr")
            words6 = struct.unpack("<6Q", raw)
            frame = dict(zip(FRAME, (f"{w:#x}" for w in words6))) if any(words6) else None
        cpus[cpu] = {"espfix_stack": f"{stack:#x}" if stack else None,
                     "espfix_waddr": f"{waddr:#x}" if stack else None, "frame": frame}
    t_end = time.perf_counter()
    if args.json:
        print(json.dumps({"drgn": drgn.__version__, "kallsyms": args.kallsyms,
                          "frame_via": sorted(via), "cpus": cpus,
                          "seconds": {"import_and_set_kernel": round(t_kernel - t0, 4),
                                      "kallsyms": round(t_syms - t_kernel, 4),
                                      "reads": round(t_end - t_syms, 4)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
