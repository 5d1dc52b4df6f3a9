"""Mass CPU onlining under `trace`, checked against `layout`: the scalability question
espfix64 was designed around, answered on a live kernel.

Runs on a guest with more than 64 possible CPUs that the kernel did not bring up at
boot (maxcpus=1: the slow rows bookworm:cpus72 and sid:cpus72, which must be named in
ESPFIX_VM_ROWS); elsewhere it skips.

1. `trace --summary` (text, the form printed in the README) while every offline CPU
   comes online: each CPU without a ministack is set up once, the first of each new
   64-CPU group pays one stack page, nothing else is allocated, and the counts equal
   what `layout --json` predicts for the CPUs before and after.
2. All those CPUs go offline, then `trace --json` while they come online a second
   time: every call is an early return with no allocation, and the summary says so.

Both traces end with every CPU online.  Under QEMU/TCG, detaching the full probe set
there (14 return tracepoints: text_poke_bp_batch IPIs every online CPU for each) hit a
soft lockup (shared/testbed.md); these traces use init_espfix_ap and the two lock
tracepoints only (--no-returns), and the kernel log must show no soft lockup.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.guest.live import cpulist, kcore_usable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT}
TRACE = ("trace", "--no-returns", "--no-ldt", "--no-holders", "--no-verify")
_USABLE, _WHY = kcore_usable()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _USABLE, reason=_WHY or "-")]
try:
    import bcc  # noqa: F401
except ImportError:
    pytestmark.append(pytest.mark.skip(reason="BCC (python3-bpfcc) is not installed"))


def tool_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "inspector", *args, "--json"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


def sysfs(name: str) -> list[int]:
    with open(f"/sys/devices/system/cpu/{name}") as f:
        return cpulist(f.read())


def set_online(cpus: list[int], on: bool) -> float:
    t = time.monotonic()
    for c in cpus:
        with open(f"/sys/devices/system/cpu/cpu{c}/online", "w") as f:
            f.write("1" if on else "0")
    return time.monotonic() - t


def start(*args: str) -> tuple[subprocess.Popen, str, float]:
    """Start trace; return once its first line (printed when every probe is attached)
    is out, with the time that took (BCC compiles for about a minute under TCG)."""
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "inspector", *TRACE, *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    if not first:
        proc.wait()
        pytest.fail(f"trace did not start: {proc.stderr.read()}")
    return proc, first, time.monotonic() - t


def stop(proc: subprocess.Popen) -> tuple[str, float]:
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return out, time.monotonic() - t


def kprobes_left() -> str:
    with open("/sys/kernel/tracing/kprobe_events") as f:
        return "".join(ln for ln in f if "init_espfix_ap" in ln)


@pytest.fixture(scope="module")
def runs():
    possible, online = sysfs("possible"), sysfs("online")
    state = tool_json("validate")
    had = sorted(r["cpu"] for r in state["cpus"] if r["initialised"])
    offline = [c for c in possible if c not in online
               and os.path.exists(f"/sys/devices/system/cpu/cpu{c}/online")]
    fresh = [c for c in offline if c not in had]
    if not any(c >= 64 and c // 64 not in {h // 64 for h in had} for c in fresh):
        pytest.skip("needs a guest with CPUs beyond 64 never brought up (maxcpus=1 and "
                    "-smp 72: ESPFIX_VM_ROWS=bookworm:cpus72 or sid:cpus72)")
    r: dict = {"had": had, "offline": offline, "fresh": fresh, "times": {}}
    procs = []
    try:
        # 1. first online of everything, text summary only
        p, r["header"], r["times"]["start1"] = start("--summary")
        procs.append(p)
        r["times"]["online1"] = set_online(offline, True)
        r["text"], r["times"]["stop1"] = stop(p)
        r["kprobes1"] = kprobes_left()
        r["validate"] = tool_json("validate")
        r["layout_after"] = tool_json("layout", "--cpu-list", ",".join(map(str, possible)),
                                      "--summary")
        r["layout_before"] = tool_json("layout", "--cpu-list", ",".join(map(str, had)),
                                       "--summary")
        # 2. offline and online again: early returns only, JSON with events
        r["times"]["offline"] = set_online(offline, False)
        p, first, r["times"]["start2"] = start("--json")
        procs.append(p)
        r["times"]["online2"] = set_online(offline, True)
        out, r["times"]["stop2"] = stop(p)
        r["docs"] = [json.loads(first)] + [json.loads(x) for x in out.splitlines() if x.strip()]
        r["kprobes2"] = kprobes_left()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print("\n".join(f"{k}: {v:.1f} s" for k, v in r["times"].items()))
    print(r["header"] + r["text"])          # the README's record comes from here
    s2 = [d for d in r["docs"] if d.get("event") == "summary"]
    if s2:
        s2 = s2[-1]
        print(f"second online (--json summary): {s2['calls']} calls, {s2['set_up']} set up, "
              f"{s2['early_return']} early returns, allocations "
              f"{ {k: a['seen'] for k, a in s2['allocations'].items()} }, match {s2['match']}, "
              f"mutex taken {s2['espfix_init_mutex']['taken']}, latency p50/max "
              f"{s2['latency_ns']['p50'] / 1e3:.1f}/{s2['latency_ns']['max'] / 1e3:.1f} us")
    return r


def text_summary(text: str) -> dict:
    """The few figures the checks need, read from the text summary."""
    m = re.search(r"init_espfix_ap: (\d+) calls?, (\d+) set up, (\d+) early returns?", text)
    assert m, text
    out = {"calls": int(m[1]), "set_up": int(m[2]), "early": int(m[3]), "alloc": {}}
    for kind in ("stack page", "PMD page", "PTE page"):
        m = re.search(rf"^{kind}\s+(\d+)\s+(\d+)\s+(\S+)$", text, re.M)
        assert m, (kind, text)
        out["alloc"][kind] = (int(m[1]), int(m[2]), [] if m[3] == "-" else cpulist(m[3]))
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d,-]+)\s+[\d.]+$", text, re.M)
    out["control"] = {int(c): cpulist(t) for c, _n, t in rows}
    return out


def test_first_online_sets_up_each_new_cpu_once(runs):
    s = text_summary(runs["text"])
    n_fresh = len(runs["fresh"])
    assert (s["calls"], s["set_up"], s["early"]) == \
        (len(runs["offline"]), n_fresh, len(runs["offline"]) - n_fresh), runs["text"]
    assert sorted(c for t in s["control"].values() for c in t) == runs["offline"]
    assert re.search(r"at most 1 call in flight at once .* \(serialized\)", runs["text"])
    assert all(r["initialised"] and r["ok"] for r in runs["validate"]["cpus"]
               if r["cpu"] in runs["offline"]), runs["validate"]["findings"]


def test_allocations_match_layout(runs):
    s = text_summary(runs["text"])
    after, before = runs["layout_after"]["memory"], runs["layout_before"]["memory"]
    pages = {"stack page": "stack_pages", "PMD page": "pmd_pages", "PTE page": "pte_pages"}
    groups_had = {c // 64 for c in runs["had"]}
    payers, seen = [], set(groups_had)
    for c in runs["fresh"]:                  # brought up in this order
        if c // 64 not in seen:
            seen.add(c // 64)
            payers.append(c)
    for kind, key in pages.items():
        want = after[key] - before[key]
        got_seen, got_layout, got_cpus = s["alloc"][kind]
        assert got_seen == got_layout == want, (kind, runs["text"])
    assert s["alloc"]["stack page"][2] == payers and payers, runs["text"]
    assert "allocations match layout's prediction" in runs["text"]
    assert "DIFFERENCE" not in runs["text"]


def test_mutex_taken_once_per_new_stack_page_never_contended(runs):
    """init_espfix_ap() takes espfix_init_mutex only when espfix_pages[cpu / 64] is NULL;
    every caller holds cpu_hotplug_lock for write, so it is never contended here."""
    text = " ".join(runs["text"].split())
    n = text_summary(runs["text"])["alloc"]["stack page"][0]
    assert f"espfix_init_mutex: taken by {n} call{'s' if n != 1 else ''}, 0 waited, " \
           "0 us blocked" in text, runs["text"]


def test_histogram_is_printed(runs):
    assert re.search(r"^\s+usecs\s+: count\s+distribution$", runs["text"], re.M)
    counts = [int(x) for x in re.findall(r"^\s+\d+ -> \d+\s+: (\d+)\s+\|", runs["text"], re.M)]
    assert sum(counts) == len(runs["offline"])


def test_second_online_is_early_returns_only(runs):
    inits = [d for d in runs["docs"] if d.get("event") == "init"]
    assert sorted(d["target_cpu"] for d in inits) == runs["offline"]
    assert all(d["outcome"] == "early return (espfix_stack already set)" and
               d["allocated"] == [] and not d["mutex"] for d in inits), inits
    s = [d for d in runs["docs"] if d.get("event") == "summary"][-1]
    assert (s["calls"], s["set_up"], s["early_return"]) == (len(inits), 0, len(inits))
    assert all(a["seen"] == a["predicted"] == a["layout"] == 0
               for a in s["allocations"].values()) and s["match"], s
    assert s["espfix_init_mutex"]["measured"] and s["espfix_init_mutex"]["taken"] == 0
    lat = s["latency_ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert sum(b["count"] for b in s["histogram"]["data"]) == len(inits)


def test_probes_detached_without_a_soft_lockup(runs):
    assert runs["kprobes1"] == "" and runs["kprobes2"] == ""
    assert runs["docs"][-1]["event"] == "stop" and runs["docs"][-1]["reason"] == "Ctrl-C"
    log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    assert "soft lockup" not in log, [x for x in log.splitlines() if "lockup" in x]
