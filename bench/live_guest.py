#!/usr/bin/env python3
"""Guest side of bench/bench_live.py: time live commands end to end, alternating.

    python3 bench/live_guest.py [--repeat 5] [--drgn-kallsyms memory|proc] [--profile]

Runs as root inside a VM guest (tests/vm), from the project tree.  Each repetition runs,
in this order, every command once as a fresh process and takes its wall time from fork
to exit (``time.perf_counter`` around ``os.wait4``), with the child's own user+system
CPU time and peak RSS from ``wait4``'s rusage:

- ``python3 -c pass``: the interpreter's own start, a floor for every row;
- ``drgn``: bench/drgn_espfix.py (Program().set_kernel(), kallsyms, every possible
  CPU's espfix_stack, espfix_waddr and 48-byte ministack);
- ``validate``: ``python3 -m inspector validate --json``;
- ``stacks``: ``python3 -m inspector stacks --json``;
- ``watch``: ``python3 -m inspector watch --json 1 1`` (start, the first round, stop).

Then one ``watch --json 1 4`` reports what each round costs (``--watch-rounds``).

One untimed warm-up repetition comes first (the first start after boot reads the
interpreter and modules from the virtual disk).  Nothing of the tool is cached between
runs: every run opens /proc/kcore and reads /proc/kallsyms again.  Before timing, the
project tree is byte-compiled (``compileall``), as an installed package is; the image's
Python packages (drgn, pyelftools, tabulate) come byte-compiled from Debian.

Each run's output is checked: the exit status, the JSON, and that drgn and ``stacks``
read the same ``espfix_stack``/``espfix_waddr``/frame for every CPU.  ``--profile`` adds
the breakdown of one ``validate`` and one ``stacks`` (bench/live_phases.py), the top of
``-X importtime`` and a cProfile summary.  Prints one JSON document on stdout.
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
PY = sys.executable


def commands(drgn_kallsyms: str) -> dict[str, list[str]]:
    tool = [PY, "-m", "inspector"]
    return {
        "python": [PY, "-c", "pass"],
        "drgn": [PY, os.path.join(ROOT, "bench", "drgn_espfix.py"), "--json",
                 "--kallsyms", drgn_kallsyms],
        "validate": [*tool, "validate", "--json"],
        "stacks": [*tool, "stacks", "--json"],
        "watch": [*tool, "watch", "--json", "1", "1"],
    }


def run_once(argv: list[str]) -> dict:
    """Fork, exec, wait4: wall seconds, the child's CPU seconds and peak RSS, output."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=ROOT, env=env)
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
                "rc": proc.returncode, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def check(name: str, run: dict) -> str | None:
    """Why a run's output is wrong, or None."""
    if name == "python":
        return None if run["rc"] == 0 else f"exit {run['rc']}"
    if run["rc"] not in (0, 1) or (name == "drgn" and run["rc"]):
        return f"exit {run['rc']}: {run['stderr'].strip()[-300:]}"
    try:
        if name == "watch":
            events = [json.loads(line) for line in run["stdout"].splitlines() if line]
            kinds = [e["event"] for e in events]
            if "round" not in kinds or kinds[-1] != "stop":
                return f"watch events {kinds}"
        else:
            json.loads(run["stdout"])
    except ValueError as e:
        return f"bad JSON: {e}"
    return None


def same_reads(drgn_out: str, stacks_out: str) -> str | None:
    """Do drgn and ``stacks --json`` agree on every CPU's words and frame?"""
    d = json.loads(drgn_out)["cpus"]
    s = {str(c["cpu"]): c for c in json.loads(stacks_out)["cpus"]}
    if sorted(d, key=int) != sorted(s, key=int):
        return f"CPU sets differ: drgn {sorted(d)} stacks {sorted(s)}"
    for cpu, dv in d.items():
        sv = s[cpu]
        for key in ("espfix_stack", "espfix_waddr", "frame"):
            if dv[key] != sv[key]:
                return f"cpu {cpu} {key}: drgn {dv[key]} stacks {sv[key]}"
    return None


def watch_rounds(count: int) -> dict:
    """One ``watch --json 1 COUNT``: the cost each round reports (the first, "start",
    opens the target; the others reuse it, as a long-running watch does)."""
    run = run_once([PY, "-m", "inspector", "watch", "--json", "1", str(count)])
    events = [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
    rounds = [{"trigger": e["trigger"], **e["cost"]} for e in events if e["event"] == "round"]
    later = [r["cpu_seconds"] for r in rounds if r["trigger"] != "start"]
    return {"rounds": rounds, "exit": run["rc"],
            "median_cpu_seconds_after_start": round(median(later), 4) if later else None,
            "share_of_one_cpu_at_10s": round(median(later) / 10, 5) if later else None}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def profile(out: dict) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for cmd in ("validate", "stacks"):
        r = subprocess.run([PY, os.path.join(ROOT, "bench", "live_phases.py"), cmd],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        out.setdefault("phases", {})[cmd] = (json.loads(r.stdout) if r.returncode == 0
                                             else {"error": r.stderr[-500:]})
    r = subprocess.run([PY, "-X", "importtime", "-m", "inspector", "validate", "--json"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    top = []                     # (cumulative us, module) of the top-level imports
    for line in r.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:"):].split("|")
        try:
            cum = int(parts[1])
        except (IndexError, ValueError):
            continue                 # the header line
        name = parts[2].rstrip()
        if len(name) - len(name.lstrip()) == 1:
            top.append((cum, name.strip()))
    out["importtime_top"] = [{"module": n, "cumulative_ms": round(c / 1000, 1)}
                             for c, n in sorted(top, reverse=True)[:12]]
    out["importtime_total_ms"] = round(sum(c for c, _n in top) / 1000, 1)
    for cmd in ("validate", "stacks"):
        with tempfile.NamedTemporaryFile(suffix=".prof") as tf:
            subprocess.run([PY, "-m", "cProfile", "-o", tf.name, "-m", "inspector", cmd,
                            "--json"], capture_output=True, env=env, cwd=ROOT)
            import io
            import pstats
            buf = io.StringIO()
            pstats.Stats(tf.name, stream=buf).sort_stats("cumulative").print_stats(25)
            out.setdefault("cprofile", {})[cmd] = buf.getvalue()[-6000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--drgn-kallsyms", choices=("memory", "proc"), default="memory")
    ap.add_argument("--only", help="comma-separated subset of the commands")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--watch-rounds", type=int, default=4, metavar="N",
                    help="also run `watch --json 1 N` once and report each round's cost "
                         "(0: skip)")
    args = ap.parse_args()
    subprocess.run([PY, "-m", "compileall", "-q", os.path.join(ROOT, "inspector"),
                    os.path.join(ROOT, "bench")], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    cmds = commands(args.drgn_kallsyms)
    if args.only:
        cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
    doc: dict = {"kernel": os.uname().release, "python": sys.version.split()[0],
                 "cpus_online": os.cpu_count(), "repeat": args.repeat,
                 "drgn_kallsyms": args.drgn_kallsyms, "runs": {k: [] for k in cmds},
                 "problems": []}
    warm = {name: run_once(argv) for name, argv in cmds.items()}
    doc["warmup_wall"] = {k: round(v["wall"], 3) for k, v in warm.items()}
    for name, run in warm.items():
        why = check(name, run)
        if why:
            doc["problems"].append(f"warm-up {name}: {why}")
    if "drgn" in warm and "stacks" in warm and not doc["problems"]:
        why = same_reads(warm["drgn"]["stdout"], warm["stacks"]["stdout"])
        doc["drgn_agrees_with_stacks"] = why is None
        if why:
            doc["problems"].append(f"drgn and stacks disagree: {why}")
        try:
            d = json.loads(warm["drgn"]["stdout"])
            doc["drgn_version"], doc["drgn_frame_via"] = d["drgn"], d["frame_via"]
            doc["drgn_inner_seconds"] = d["seconds"]
        except (ValueError, KeyError):
            pass
    for rep in range(args.repeat):
        for name, argv in cmds.items():
            run = run_once(argv)
            why = check(name, run)
            if why:
                doc["problems"].append(f"rep {rep} {name}: {why}")
            doc["runs"][name].append({"wall": round(run["wall"], 4),
                                      "cpu": round(run["cpu"], 4),
                                      "maxrss_mib": round(run["maxrss_kib"] / 1024, 1),
                                      "rc": run["rc"]})
            if name == "watch":
                for line in run["stdout"].splitlines():
                    ev = json.loads(line) if line.startswith("{") else {}
                    if ev.get("event") == "round":
                        doc["runs"][name][-1]["round_cost"] = ev.get("cost")
    med = {k: {"wall": round(median([r["wall"] for r in v]), 3),
               "cpu": round(median([r["cpu"] for r in v]), 3),
               "maxrss_mib": round(median([r["maxrss_mib"] for r in v]), 1)}
           for k, v in doc["runs"].items()}
    doc["median"] = med
    if "drgn" in med:
        doc["ratio_to_drgn"] = {k: round(v["wall"] / med["drgn"]["wall"], 3)
                                for k, v in med.items() if k != "drgn"}
    if args.watch_rounds:
        doc["watch_rounds"] = watch_rounds(args.watch_rounds)
    if args.profile:
        profile(doc)
    print(json.dumps(doc, indent=1))
    return 1 if doc["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
