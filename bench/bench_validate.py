#!/usr/bin/env python3
"""Benchmark: validate on synthetic cores with 64, 8192 and 131,072 online CPUs.

Reports wall time (open + read state + audit, best of --repeat), pages read,
the most times any one page was fetched (the goal is 1), and peak memory
(tracemalloc for the Python heap, ru_maxrss for the process).  Cores are
built once per size into a temporary directory (not timed).

    python3 bench/bench_validate.py [--sizes 64,8192,131072] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inspector.audit import audit  # noqa: E402
from inspector.hostfacts import HostFacts  # noqa: E402
from inspector.state import load_state  # noqa: E402
from inspector.target import open_target  # noqa: E402
from tests.synthcore import SynthKernel, SynthSpec  # noqa: E402


def one_run(core: str, syms: str) -> dict:
    t0 = time.perf_counter()
    target = open_target(core, syms)
    try:
        state = load_state(target, HostFacts())
        result = audit(state)
        elapsed = time.perf_counter() - t0
        stats = target.mem.stats
        return {"seconds": elapsed, "ok": result.ok, "pages_read": stats.pages_read,
                "max_fetches_per_page": stats.max_fetches_per_page(),
                "small_reads": stats.small_reads, "findings": len(result.findings)}
    finally:
        target.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,8192,131072")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--levels", type=int, default=5, choices=(4, 5))
    ap.add_argument("--pti", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            k = SynthKernel(SynthSpec(nr_cpus=n, levels=args.levels, pti=args.pti))
            core, syms = f"{tmp}/core{n}", f"{tmp}/syms{n}"
            k.write(core, syms)
            del k
            runs = [one_run(core, syms) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            tracemalloc.start()
            one_run(core, syms)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            best.update(cpus=n, core_bytes=os.path.getsize(core),
                        py_heap_peak_mib=round(peak / 2**20, 1))
            rows.append(best)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"rows": rows, "process_maxrss_mib": round(maxrss, 1)}, indent=2))
        return 0
    print(f"{'CPUS':>7} {'SECONDS':>8} {'PAGES':>6} {'MAX/PG':>6} {'WORD READS':>10} "
          f"{'HEAP MiB':>8} {'CORE MiB':>8} OK")
    for r in rows:
        print(f"{r['cpus']:>7} {r['seconds']:>8.3f} {r['pages_read']:>6} "
              f"{r['max_fetches_per_page']:>6} {r['small_reads']:>10} "
              f"{r['py_heap_peak_mib']:>8} {r['core_bytes'] / 2**20:>8.1f} {r['ok']}")
    print(f"process peak RSS: {maxrss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
