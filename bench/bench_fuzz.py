"""The long fuzz run: many more mutants than the test suite's bounded run, with figures.

    python3 bench/bench_fuzz.py [--count 20000] [--seed 7] [--save DIR]

Prints mutants and runs per second, the slowest single run, the peak RSS, outcomes by
operator, and every failure (a failing mutant is written to --save DIR, default
tests/data/fuzz, for tests/test_fuzz.py to replay).  Exit 1 if any mutant failed.
The figures in docs/input-safety.md come from this command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.helpers import fuzz  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--save", default=fuzz.REGRESSIONS)
    args = p.parse_args()
    fuzz.limit_memory()
    t0 = time.monotonic()
    cpu0 = time.process_time()

    def progress(done: int, total: int) -> None:
        if done % 1000 == 0:
            print(f"  {done}/{total} mutants, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    outcomes = fuzz.fuzz(args.count, args.seed, args.save, progress)
    wall = time.monotonic() - t0
    summary = fuzz.summarize(outcomes, wall)
    summary.update(mutants=args.count, seed=args.seed,
                   cpu_seconds=round(time.process_time() - cpu0, 1),
                   runs_per_cpu_second=round(len(outcomes) / max(1e-9, time.process_time() - cpu0), 1))
    print(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
