"""Write a synthetic kernel core (and its kallsyms) for trying espfix-inspect offline.

    python3 -m tests.helpers.mkcore -o /tmp/demo --cpus 8 --fault writable-pte
    espfix-inspect validate --core /tmp/demo/kernel.core --symbols /tmp/demo/kallsyms

The core is built by tests/helpers/synthcore.py, which replays init_espfix_ap() for each CPU;
--fault applies one corruption from tests/helpers/faults.py.  Test scaffolding: real kernels
are covered by the VM harness (tests/vm) and the snapshots in samples/.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.helpers.faults import BY_NAME  # noqa: E402
from tests.helpers.synthcore import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.helpers.mkcore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="directory for kernel.core + kallsyms")
    p.add_argument("--cpus", type=int, default=4, help="possible = online CPUs (default 4)")
    p.add_argument("--levels", type=int, choices=(4, 5), default=5)
    p.add_argument("--pti", action="store_true", help="with PTI user page tables")
    p.add_argument("--relative-percpu", action="store_true",
                   help="per-CPU symbols as relocated addresses (6.15+)")
    p.add_argument("--fault", choices=sorted(BY_NAME), help="inject one corruption")
    a = p.parse_args(argv)
    k = build(nr_cpus=a.cpus, levels=a.levels, pti=a.pti,
              percpu="relative" if a.relative_percpu else "zero-based")
    if a.fault:
        BY_NAME[a.fault](k)
    os.makedirs(a.out, exist_ok=True)
    core, syms = os.path.join(a.out, "kernel.core"), os.path.join(a.out, "kallsyms")
    k.write(core, syms)
    print(f"wrote {core} and {syms}" + (f" (fault: {a.fault})" if a.fault else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
