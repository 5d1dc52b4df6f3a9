#!/usr/bin/env python3
"""Benchmark: the CLI on synthetic cores from 64 to 131,072 online CPUs, end to end.

For each size a synthetic 5-level core (tests/helpers/synthcore.py, every CPU online and set
up) is written once into a temporary directory (not timed; by `python3 -m tests.helpers.mkcore`
in its own process, so that this one stays small: a child's peak RSS from wait4 also
counts the parent's pages at exec).  Then, --repeat times each and alternating, a
fresh process runs

    python3 -m inspector validate --json --core CORE --symbols KALLSYMS
    python3 -m inspector stacks --json   --core CORE --symbols KALLSYMS
    python3 -m inspector layout --cpus N --json

with stdout to /dev/null; its wall time (fork to exit), CPU time (user + system) and
peak RSS come from os.wait4.  Nothing is cached between runs: each opens the core and
the symbols again; the package is byte-compiled first (as an installed one is).  One
more process (an open + state + audit + every frame) reports the read counters:
distinct pages fetched, the most fetches of any one page (the goal is 1) and the
per-CPU word reads (PAGES v/s: pages validate reads / with stacks' stack pages).
Medians are printed; `us/CPU` is validate's wall time per CPU,
which stays flat when the cost grows linearly.

    python3 bench/bench_validate.py [--sizes 64,1024,8192,32768,131072] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COUNTERS = """
import json, sys
from inspector.audit import audit
from inspector.hostfacts import HostFacts
from inspector.state import load_state
from inspector.target import open_target
target = open_target(sys.argv[1], sys.argv[2])
state = load_state(target, HostFacts())
result = audit(state)
stats = target.mem.stats
validate_pages = stats.pages_read
for cpu in state.cpus:                   # what stacks reads on top: every stack page
    state.frame(cpu)
print(json.dumps({"ok": result.ok, "pages_validate": validate_pages,
                  "pages_read": stats.pages_read,
                  "max_fetches_per_page": stats.max_fetches_per_page(),
                  "word_reads": stats.small_reads}))
"""


def counters(core: str, syms: str) -> dict:
    out = subprocess.run([sys.executable, "-c", COUNTERS, core, syms], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


#: The children run as an installed tool does: from byte-compiled modules.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(argv: list[str]) -> dict:
    """One fresh process: wall seconds fork to exit, CPU seconds and peak RSS (wait4)."""
    with open(os.devnull, "wb") as null:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=null, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} exited {rc}: {err}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mib": ru.ru_maxrss / 1024}


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,1024,8192,32768,131072")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    py = [sys.executable, "-m", "inspector"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "inspector")],
                   check=True, env=ENV)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            subprocess.run([sys.executable, "-m", "tests.helpers.mkcore", "-o", f"{tmp}/{n}", "--cpus",
                            str(n), "--levels", "5"], cwd=ROOT, check=True, capture_output=True)
            core, syms = f"{tmp}/{n}/kernel.core", f"{tmp}/{n}/kallsyms"
            cmds = {"validate": [*py, "validate", "--json", "--core", core, "--symbols", syms],
                    "stacks": [*py, "stacks", "--json", "--core", core, "--symbols", syms],
                    "layout": [*py, "layout", "--cpus", str(n), "--json"]}
            runs: dict[str, list[dict]] = {c: [] for c in cmds}
            for _ in range(args.repeat):
                for name, argv in cmds.items():
                    runs[name].append(run(argv))
            row = {"cpus": n, "core_mib": round(os.path.getsize(core) / 2**20, 1),
                   **counters(core, syms)}
            for name in cmds:
                row[name] = {k: round(med(runs[name], k), 3) for k in ("wall", "cpu", "rss_mib")}
            row["us_per_cpu"] = round(row["validate"]["wall"] / n * 1e6, 2)
            rows.append(row)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"rows": rows, "repeat": args.repeat, "loadavg_1min": load}, indent=2))
        return 0
    print(f"{'CPUS':>7} {'VALIDATE s':>10} {'cpu':>5} {'MiB':>4} {'STACKS s':>8} {'cpu':>5} "
          f"{'MiB':>4} {'LAYOUT s':>8} {'cpu':>5} {'MiB':>4} {'PAGES v/s':>10} {'MAX/PG':>6} "
          f"{'WORDS':>6} {'us/CPU':>6}")
    for r in rows:
        v, s, lay = r["validate"], r["stacks"], r["layout"]
        print(f"{r['cpus']:>7} {v['wall']:>10.3f} {v['cpu']:>5.2f} {v['rss_mib']:>4.0f} "
              f"{s['wall']:>8.3f} {s['cpu']:>5.2f} {s['rss_mib']:>4.0f} {lay['wall']:>8.3f} "
              f"{lay['cpu']:>5.2f} {lay['rss_mib']:>4.0f} "
              f"{str(r['pages_validate']) + '/' + str(r['pages_read']):>10} "
              f"{r['max_fetches_per_page']:>6} {r['word_reads']:>6} {r['us_per_cpu']:>6.1f}")
    print(f"medians of {args.repeat}; wall = fork to exit; 1-min load average at the end: "
          f"{load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
