#!/usr/bin/env python3
"""Benchmark: live validate, stacks and watch's first round against drgn, in VM guests.

    python3 bench/bench_live.py [--rows trixie:l4,sid:l5] [--repeat 5] [--profile]

Boots each row through the VM harness (tests/vm, QEMU/TCG) and runs
bench/live_guest.py there: every command as a fresh process, alternating, --repeat
times after one warm-up, wall time fork to exit.  Prints the medians, each command's
ratio to drgn reading the same per-CPU words and ministacks (bench/drgn_espfix.py),
and the CPU cost of watch's first round as the watch reports it.  drgn comes from the
image (Debian python3-drgn): bookworm's 0.0.22 cannot load kallsyms, so its rows time
the tool alone.  --json prints every guest document instead.

Under TCG everything is 10-20 times slower than on hardware and the host's load shows
in the numbers: compare within a row, where drgn and the tool take turns.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.vm.kernels import parse_rows  # noqa: E402
from tests.vm.run import VMError, run_in_vm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="trixie:l4,sid:l5")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="add the phase breakdown")
    ap.add_argument("--timeout", type=float, default=2400)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    docs = []
    for kernel, variant in parse_rows(args.rows):
        only = "" if kernel != "bookworm" else " --only python,validate,stacks,watch"
        cmd = (f"python3 bench/live_guest.py --repeat {args.repeat}{only}"
               + (" --profile" if args.profile else ""))
        try:
            res = run_in_vm(kernel, variant, cmd, args.timeout)
        except VMError as e:
            print(f"{kernel}:{variant}: {e}", file=sys.stderr)
            return 2
        try:
            doc = json.loads(res.stdout)
        except ValueError:
            print(f"{kernel}:{variant}: no JSON from the guest ({res.describe()}):\n"
                  f"{res.stdout[-2000:]}{res.stderr[-2000:]}", file=sys.stderr)
            return 2
        doc["row"] = f"{kernel}:{variant}"
        doc["vm"] = res.describe()
        docs.append(doc)
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    print(f"{'ROW':<12} {'KERNEL':<22} {'drgn':>6} {'validate':>13} {'stacks':>13} "
          f"{'watch 1 1':>13} {'python':>6} {'1st round':>9}")
    for d in docs:
        m, r = d["median"], d.get("ratio_to_drgn", {})

        def cell(name: str, m: dict = m, r: dict = r) -> str:
            wall = m[name]["wall"]
            return f"{wall:6.2f} ({r[name]:.2f}x)" if name in r else f"{wall:6.2f}        "
        rounds = [x["round_cost"]["cpu_seconds"] for x in d["runs"].get("watch", [])
                  if x.get("round_cost")]
        first = f"{sorted(rounds)[len(rounds) // 2]:.2f} s" if rounds else "-"
        drgn = f"{m['drgn']['wall']:6.2f}" if "drgn" in m else "     -"
        print(f"{d['row']:<12} {d['kernel']:<22} {drgn} {cell('validate')} {cell('stacks')} "
              f"{cell('watch')} {m['python']['wall']:6.2f} {first:>9}")
        for p in d["problems"]:
            print(f"  problem: {p}")
    print(f"medians of {args.repeat} runs each, seconds, fork to exit; (x) = median / drgn's "
          "median; 1st round = CPU of watch's start round")
    return 1 if any(d["problems"] for d in docs) else 0


if __name__ == "__main__":
    sys.exit(main())
