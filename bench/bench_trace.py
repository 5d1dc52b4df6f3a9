#!/usr/bin/env python3
"""Overhead of `espfix-inspect trace`, measured inside a VM guest (root, BCC, kprobes).

    python3 -m tests.vm run --kernel bookworm --variant l5 -- python3 bench/bench_trace.py

1. syscall load: `dd bs=1` copies N bytes (2 syscalls per byte); every syscall exit
   passes the raw_syscalls:sys_exit return counter.  Run with and without the probes:
   the difference per event is the probe's cost, and events/s is what it sustained.
2. CPU hotplug: offline+online of one CPU, with and without the probes (the kprobe and
   kretprobe on init_espfix_ap, and the validate that follows in user space).
Under QEMU/TCG every number is slower than on hardware; compare the two columns.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}
BYTES = 200_000
CYCLES = 5


def dd_seconds() -> float:
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={BYTES}"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def hotplug_seconds(cpu: int) -> float:
    path = f"/sys/devices/system/cpu/cpu{cpu}/online"
    t = time.perf_counter()
    for _ in range(CYCLES):
        for v in ("0", "1"):
            with open(path, "w") as f:
                f.write(v)
    return (time.perf_counter() - t) / CYCLES


def best(fn, *a, n: int = 3) -> float:
    return min(fn(*a) for _ in range(n))


def main() -> int:
    cpu = max(os.sched_getaffinity(0))
    base_dd, base_hp = best(dd_seconds), best(hotplug_seconds, cpu)
    proc = subprocess.Popen([sys.executable, "-m", "inspector", "trace", "--json"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    json.loads(proc.stdout.readline())                  # started: probes attached
    t0 = time.perf_counter()
    traced_dd, traced_hp = best(dd_seconds), best(hotplug_seconds, cpu)
    elapsed = time.perf_counter() - t0
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    end = [json.loads(x) for x in out.splitlines() if '"event": "stop"' in x][-1]
    syscalls = 2 * BYTES
    rows = [
        (f"dd bs=1, {syscalls} syscalls", base_dd, traced_dd),
        ("CPU offline+online", base_hp, traced_hp),
    ]
    print(f"{'WHAT':28} {'NO PROBES':>10} {'PROBES':>10} {'DELTA':>10}")
    for what, a, b in rows:
        print(f"{what:28} {a:9.3f}s {b:9.3f}s {b - a:+9.3f}s")
    per_event = (traced_dd - base_dd) / syscalls
    print(f"return-path probes: {end['looked']} events looked at in {elapsed:.1f} s "
          f"({end['looked'] / elapsed:,.0f}/s sustained), {per_event * 1e9:,.0f} ns added "
          f"per syscall exit")
    print(f"init_espfix_ap probes: {(traced_hp - base_hp) * 1e3:+.1f} ms per offline+online "
          f"cycle of cpu{cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
