"""What the ``init_espfix_ap()`` calls of one ``trace`` add up to.

The question espfix64 was designed around (Linux kernel commit 3891a04aafd6, "x86-64,
espfix: Don't leak bits 31:16 of %esp returning to 16-bit stack", in v3.16): when many
CPUs come up, how long does espfix set-up take, does it serialize, and does it allocate
what its rules say?  This module answers it from the INIT events ``trace`` decodes: events in,
an :class:`InitSummary` out, and two renderers of it (:func:`render_text`,
:func:`summary_json`).  It is pure: no BCC, no I/O, so it is tested on the host with
synthetic event lists, and ``trace`` stays a short loop.

The rules, from ``init_espfix_ap()`` in ``arch/x86/kernel/espfix_64.c``:

- it returns at once when ``per_cpu(espfix_stack, cpu)`` is set: every online of a CPU
  after its first is an early return, and the kernel never frees espfix state;
- otherwise, when ``espfix_pages[cpu / 64]`` is NULL, it takes ``espfix_init_mutex``
  and allocates the stack page for that 64-CPU group, plus the PMD page and the PTE
  page when the 1024-CPU group has none yet (the group's ``espfix_pud_page`` entries
  not present).  These are the numbers ``layout`` prints (:func:`inspector.model.memory_cost`).

It runs in ``do_boot_cpu()`` (``arch/x86/kernel/smpboot.c``) on the control CPU, the
one bringing the target up.  Every caller holds ``cpu_hotplug_lock`` for write
(``_cpu_up()`` in ``kernel/cpu.c`` calls ``cpus_write_lock()``), so two calls cannot
overlap, and ``espfix_init_mutex`` is not contended by CPU bring-up itself.  Parallel
bring-up (since Linux kernel commit 0c7ffa32dbd6, "x86/smpboot/64: Implement
arch_cpuhp_init_parallel_bringup() and enable it", in v6.5) kicks the APs at boot
without waiting for each, but ``cpuhp_bringup_mask()`` still calls ``cpu_up()`` for one
CPU after another on the boot CPU, so ``init_espfix_ap()`` stays serial there too.

>>> s = summarize([init_event(1, 0, 120_000, "set up"),
...                init_event(1, 0, 30_000, "early return (espfix_stack already set)")],
...               initialised_before={0})
>>> s.calls, s.set_up, s.early_return, s.latency.max_ns
(2, 1, 1, 120000)
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Iterable, Sequence

from .model import CPUS_PER_GROUP, ESPFIX_STACKS_PER_PAGE, format_cpu_list, memory_cost

__all__ = [
    "Outcome", "ALLOC_KINDS", "LOG2_INDEX_MAX", "Latency", "LockWait", "ControlCpu",
    "InitSummary", "log2_index", "log2_hist", "format_log2_hist", "percentile",
    "predict_allocations", "max_in_flight", "summarize", "render_text", "summary_json",
    "init_event",
]


class Outcome(str, Enum):
    """What one ``init_espfix_ap()`` call did (the INIT event's ``outcome``)."""

    SET_UP = "set up"
    EARLY_RETURN = "early return (espfix_stack already set)"
    NOT_SET = "returned without setting espfix_stack"


#: The pages ``init_espfix_ap()`` allocates, in the order it allocates them: the PMD
#: page (``alloc_pages_node(node, PGALLOC_GFP, 0)`` for a non-present PUD entry), the
#: PTE page (same, for a non-present PMD entry), then the stack page.
ALLOC_KINDS = ("stack page", "PMD page", "PTE page")

#: Buckets of a log2 histogram, as bcc's ``log2_index_max``: enough for any u64.
LOG2_INDEX_MAX = 65
#: Width of bcc's distribution column (``stars_max``), halved past bucket 32.
STARS_MAX = 40


# --------------------------------------------------------------- log2 histogram

def log2_index(value: int) -> int:
    """The bucket bcc's ``bpf_log2l()`` gives *value*: 0 and 1 -> 1, 2-3 -> 2, 4-7 -> 3,
    so that bucket ``i`` holds ``2**(i-1) .. 2**i - 1`` (bcc ``src/cc/export/helpers.h``)."""
    return max(1, int(value).bit_length())


def log2_hist(values: Iterable[int]) -> list[int]:
    """Counts per bucket, the list a ``BPF_HISTOGRAM`` read back from a map would give."""
    vals = [0] * LOG2_INDEX_MAX
    for v in values:
        if v < 0:
            raise ValueError(f"negative value {v} in a log2 histogram")
        vals[log2_index(v)] += 1
    return vals


def format_log2_hist(vals: Sequence[int], val_type: str = "usecs") -> list[str]:
    """The lines bcc's ``print_log2_hist()`` prints for *vals* (``bcc/table.py``,
    ``_print_log2_hist`` without leading-zero stripping): the header naming *val_type*,
    then one ``low -> high : count |stars|`` line per bucket from 1 to the last non-empty
    one.  The star bar is ``width * count / max`` stars, 40 wide (20 with the wide
    layout bcc switches to past bucket 32).  Nothing at all when every bucket is empty.
    """
    last = max((i for i, v in enumerate(vals) if v > 0), default=-1)
    if last <= 0:
        return []
    peak = max(vals)
    if last <= 32:
        head, lo_w, width = "     %-19s : count     distribution", 10, STARS_MAX
    else:
        head, lo_w, width = "               %-29s : count     distribution", 20, STARS_MAX // 2
    lines = [head % val_type]
    for i in range(1, last + 1):
        low, high = (1 << i) >> 1, (1 << i) - 1
        if low == high:           # bucket 1 holds 0 and 1
            low = 0
        bar = "*" * min(width, int(width * vals[i] / peak))
        lines.append(f"{low:{lo_w}d} -> {high:<{lo_w}d} : {vals[i]:<8d} |{bar:<{width}s}|")
    return lines


# --------------------------------------------------------------------- numbers

def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    """Nearest-rank percentile: the smallest observed value with at least *p* percent of
    the values at or below it (so p100 is the maximum and every answer was observed)."""
    if not sorted_values:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} outside (0, 100]")
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def max_in_flight(intervals: Iterable[tuple[int, int]]) -> int:
    """The largest number of ``[start, end)`` intervals open at one instant: 1 means the
    calls ran one after another."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = peak = 0
    for _, step in edges:        # an end sorts before a start at the same instant
        depth += step
        peak = max(peak, depth)
    return peak


def predict_allocations(set_up_order: Sequence[int],
                        initialised_before: Iterable[int]) -> dict[str, list[int]]:
    """Which CPU must pay for which page, by the rules of ``init_espfix_ap()``: the first
    CPU set up in a 64-CPU group with no ministack yet pays its stack page, and the first
    in a 1024-CPU group with none pays the PMD and PTE pages.  *set_up_order* lists the
    CPUs in the order they were set up; *initialised_before* are the CPUs that already
    had ``espfix_stack`` set."""
    before = set(initialised_before)
    pages = {c // ESPFIX_STACKS_PER_PAGE for c in before}
    groups = {c // CPUS_PER_GROUP for c in before}
    out: dict[str, list[int]] = {k: [] for k in ALLOC_KINDS}
    for cpu in set_up_order:
        if cpu // ESPFIX_STACKS_PER_PAGE not in pages:
            pages.add(cpu // ESPFIX_STACKS_PER_PAGE)
            out["stack page"].append(cpu)
        if cpu // CPUS_PER_GROUP not in groups:
            groups.add(cpu // CPUS_PER_GROUP)
            out["PMD page"].append(cpu)
            out["PTE page"].append(cpu)
    return out


# ----------------------------------------------------------------- the summary

@dataclass(frozen=True)
class Latency:
    """Call latencies in nanoseconds (entry to return of ``init_espfix_ap()``)."""

    calls: int
    total_ns: int
    p50_ns: int | None
    p90_ns: int | None
    p99_ns: int | None
    max_ns: int | None
    hist_us: tuple[int, ...]      # log2 buckets of whole microseconds, as funclatency -u

    @classmethod
    def of(cls, latencies_ns: Sequence[int]) -> Latency:
        srt = sorted(latencies_ns)
        return cls(len(srt), sum(srt), percentile(srt, 50), percentile(srt, 90),
                   percentile(srt, 99), srt[-1] if srt else None,
                   tuple(log2_hist(v // 1000 for v in srt)))

    def as_dict(self) -> dict:
        return {"calls": self.calls, "total": self.total_ns, "p50": self.p50_ns,
                "p90": self.p90_ns, "p99": self.p99_ns, "max": self.max_ns}


@dataclass(frozen=True)
class LockWait:
    """Time blocked on ``espfix_init_mutex``, from the ``lock:contention_begin/end``
    tracepoints filtered on its address; ``measured`` False says why not."""

    measured: bool
    why: str = ""
    taken: int = 0                # calls that took the mutex (stack page NULL at entry)
    contended: int = 0            # calls that waited for it
    total_ns: int = 0
    max_ns: int = 0
    waiters: tuple[int, ...] = ()  # target CPUs whose call waited


@dataclass(frozen=True)
class ControlCpu:
    """The calls one control CPU ran."""

    cpu: int
    calls: int
    targets: tuple[int, ...]
    busy_ns: int


@dataclass(frozen=True)
class InitSummary:
    calls: int
    set_up: int
    early_return: int
    not_set: int
    latency: Latency                  # all calls
    by_outcome: dict[str, Latency]    # Outcome value -> its calls (outcomes seen only)
    control: tuple[ControlCpu, ...]
    max_in_flight: int
    span_ns: int                  # first entry to last return
    observed: dict[str, list[int]]    # kind -> CPUs whose call allocated one, in order
    predicted: dict[str, list[int]]   # kind -> CPUs the rules say pay for one
    layout_pages: dict[str, int]      # what `layout` counts for before / after / new
    before: tuple[int, ...]
    before_source: str
    differences: tuple[str, ...]
    lock: LockWait
    validated: dict[str, int] = field(default_factory=dict)   # verdict -> count


def init_event(target: int, cpu: int, latency_ns: int, outcome: str,
               allocated: Sequence[str] = (), ts_ns: int = 0, **extra) -> dict:
    """An INIT event as ``probes.trace.init_summary()`` returns it (for tests and doctests)."""
    return {"type": "init", "target_cpu": target, "cpu": cpu, "latency_ns": latency_ns,
            "latency_us": round(latency_ns / 1e3, 1), "outcome": outcome,
            "allocated": list(allocated), "ts_ns": ts_ns, **extra}


def _lock_wait(inits: list[dict], lock_why: str | None) -> LockWait:
    taken = sum(1 for e in inits if e.get("mutex"))
    if lock_why is not None:
        return LockWait(False, lock_why, taken=taken)
    waits = [e for e in inits if e.get("lock_contended")]
    return LockWait(True, taken=taken, contended=len(waits),
                    total_ns=sum(e.get("lock_wait_ns", 0) for e in waits),
                    max_ns=max((e.get("lock_wait_ns", 0) for e in waits), default=0),
                    waiters=tuple(e["target_cpu"] for e in waits))


def summarize(events: Iterable[dict], initialised_before: Iterable[int],
              before_source: str = "given", lock_why: str | None = None) -> InitSummary:
    """Aggregate the INIT events of one trace (other event types are ignored).

    *initialised_before*: the CPUs whose ``espfix_stack`` was set when tracing began
    (``trace`` reads them through /proc/kcore, else from the online mask);
    *lock_why*: None when the mutex wait was measured, else why it could not be.
    """
    inits = sorted((e for e in events if e.get("type") == "init"),
                   key=lambda e: e.get("ts_ns", 0))
    latency = Latency.of([int(e["latency_ns"]) for e in inits])
    by_outcome = {o.value: Latency.of([int(e["latency_ns"]) for e in inits
                                       if e["outcome"] == o]) for o in Outcome}
    outcomes = Counter(e["outcome"] for e in inits)
    set_up = [e["target_cpu"] for e in inits if e["outcome"] == Outcome.SET_UP]
    # A CPU set up in this trace had no ministack when it began, whatever a state read
    # made after the probes were attached says.
    before = sorted(set(initialised_before) - set(set_up))
    observed: dict[str, list[int]] = {k: [] for k in ALLOC_KINDS}
    for e in inits:
        for kind in e.get("allocated", ()):
            observed.setdefault(kind, []).append(e["target_cpu"])
    predicted = predict_allocations(set_up, before)
    differences = []
    for kind in ALLOC_KINDS:
        if observed[kind] != predicted[kind]:
            differences.append(
                f"{kind}: allocated by cpus {_cpus(observed[kind])}, layout predicts "
                f"cpus {_cpus(predicted[kind])}")
    for kind in sorted(set(observed) - set(ALLOC_KINDS)):
        differences.append(f"{kind}: unknown allocation kind on cpus {_cpus(observed[kind])}")
    cost_before, cost_after = memory_cost(before), memory_cost(set(before) | set(set_up))
    layout_pages = {}
    for kind, attr in zip(ALLOC_KINDS, ("stack_pages", "pmd_pages", "pte_pages")):
        layout_pages[kind] = getattr(cost_after, attr) - getattr(cost_before, attr)
        if layout_pages[kind] != len(predicted[kind]):    # two readings of one rule
            differences.append(f"{kind}: layout counts {layout_pages[kind]} new, "
                               f"the per-CPU rule {len(predicted[kind])}")
    by_cpu: dict[int, list[dict]] = {}
    for e in inits:
        by_cpu.setdefault(e["cpu"], []).append(e)
    control = tuple(ControlCpu(c, len(es), tuple(e["target_cpu"] for e in es),
                               sum(int(e["latency_ns"]) for e in es))
                    for c, es in sorted(by_cpu.items()))
    spans = [(int(e.get("ts_ns", 0)), int(e.get("ts_ns", 0)) + int(e["latency_ns"]))
             for e in inits]
    validated = Counter(e["validate"]["verdict"] for e in inits if e.get("validate"))
    return InitSummary(
        calls=len(inits), set_up=outcomes[Outcome.SET_UP],
        early_return=outcomes[Outcome.EARLY_RETURN], not_set=outcomes[Outcome.NOT_SET],
        latency=latency, by_outcome={o: lat for o, lat in by_outcome.items() if lat.calls},
        control=control, max_in_flight=max_in_flight(spans),
        span_ns=(max(e for _, e in spans) - min(s for s, _ in spans)) if spans else 0,
        observed=observed, predicted=predicted, layout_pages=layout_pages,
        before=tuple(before), before_source=before_source,
        differences=tuple(differences), lock=_lock_wait(inits, lock_why),
        validated=dict(sorted(validated.items())))


# ------------------------------------------------------------------ renderers

_SHORT = {Outcome.SET_UP.value: "set up", Outcome.EARLY_RETURN.value: "early return",
          Outcome.NOT_SET.value: "not set", "all": "all"}


def _cpus(cpus: Iterable[int]) -> str:
    return format_cpu_list(cpus) or "-"


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, 80, subsequent_indent="  ", break_on_hyphens=False)


def _us(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e3:.1f}"


def render_text(s: InitSummary) -> list[str]:
    """The summary as ``trace`` prints it (80 columns, tables by tabulate)."""
    from tabulate import tabulate
    L = s.latency
    out = [f"init_espfix_ap: {_n(s.calls, 'call')}, {s.set_up} set up, "
           f"{_n(s.early_return, 'early return')}"
           + (f", {s.not_set} without setting espfix_stack" if s.not_set else "")]
    if not s.calls:
        return out
    rows = [[_SHORT[o], x.calls, *(_us(v) for v in (x.total_ns, x.p50_ns, x.p90_ns,
                                                       x.p99_ns, x.max_ns))]
            for o, x in [*s.by_outcome.items(), ("all", L)]]
    out += [""] + tabulate(rows, headers=["LATENCY (us)", "CALLS", "TOTAL", "P50", "P90", "P99",
                                          "MAX"], disable_numparse=True,
                           colalign=("left",) + ("right",) * 6).splitlines()
    out += [""] + format_log2_hist(L.hist_us, "usecs") + [""]
    rows = [[kind, len(s.observed[kind]), len(s.predicted[kind]),
             _cpus(s.observed[kind])] for kind in ALLOC_KINDS]
    out += tabulate(rows, headers=["ALLOCATED", "SEEN", "LAYOUT", "PAID BY CPUS"],
                    colalign=("left", "right", "right", "left")).splitlines()
    out += _wrap(f"layout: cpus {_cpus(s.before)} had a ministack before ({s.before_source});"
                 f" the {s.set_up} set up here need " +
                 ", ".join(_n(n, k) for k, n in s.layout_pages.items()))
    for d in s.differences:
        out += _wrap(f"DIFFERENCE {d}")
    if not s.differences:
        out.append("allocations match layout's prediction")
    lk = s.lock
    if lk.measured:
        out += _wrap(f"espfix_init_mutex: taken by {_n(lk.taken, 'call')}, {lk.contended} waited"
                     + (f" (cpus {_cpus(lk.waiters)}), {_us(lk.total_ns)} us in all, max "
                        f"{_us(lk.max_ns)} us" if lk.contended else ", 0 us blocked"))
    else:
        out += _wrap(f"espfix_init_mutex: taken by {_n(lk.taken, 'call')}; wait not measured: "
                     f"{lk.why}")
    out.append("")
    rows = [[c.cpu, c.calls, _cpus(c.targets), _us(c.busy_ns)] for c in s.control]
    out += tabulate(rows, headers=["RAN ON CPU", "CALLS", "TARGET CPUS", "BUSY (us)"],
                    colalign=("right", "right", "left", "right"),
                    disable_numparse=True).splitlines()
    out.append(f"at most {_n(s.max_in_flight, 'call')} in flight at once over "
               f"{s.span_ns / 1e9:.3f} s" + (" (serialized)" if s.max_in_flight == 1 else ""))
    if s.validated:
        out.append("validate after each call: " +
                   ", ".join(f"{n} {v}" for v, n in s.validated.items()))
    return out


def summary_json(s: InitSummary) -> dict:
    """The fields of ``trace --json``'s ``summary`` line (:class:`inspector.trace_output.
    JsonTrace` adds schema, event and time); latencies in ns, the histogram as bcc's
    ``get_json_hist`` lists buckets (interval-start/-end, count), sets of CPUs as
    CPU-list strings (``64-127``)."""
    L = s.latency
    last = max((i for i, v in enumerate(L.hist_us) if v > 0), default=0)
    hist = [{"interval-start": (1 << i) >> 1 if i > 1 else 0, "interval-end": (1 << i) - 1,
             "count": L.hist_us[i]} for i in range(1, last + 1)]
    lk = s.lock
    return {
        "calls": s.calls, "set_up": s.set_up,
        "early_return": s.early_return, "not_set": s.not_set,
        "latency_ns": {**L.as_dict(), "by_outcome": {_SHORT[o]: x.as_dict()
                                                     for o, x in s.by_outcome.items()}},
        "histogram": {"val_type": "usecs", "data": hist},
        "allocations": {k: {"seen": len(s.observed[k]), "cpus": format_cpu_list(s.observed[k]),
                            "predicted": len(s.predicted[k]),
                            "predicted_cpus": format_cpu_list(s.predicted[k]),
                            "layout": s.layout_pages[k]}
                        for k in ALLOC_KINDS},
        "initialised_before": format_cpu_list(s.before), "before_source": s.before_source,
        "differences": list(s.differences), "match": not s.differences,
        "espfix_init_mutex": {"measured": lk.measured, "why": lk.why or None,
                              "taken": lk.taken, "contended": lk.contended,
                              "wait_ns": lk.total_ns, "max_wait_ns": lk.max_ns,
                              "waiters": format_cpu_list(lk.waiters)},
        "control_cpus": [{"cpu": c.cpu, "calls": c.calls, "targets": format_cpu_list(c.targets),
                          "busy_ns": c.busy_ns} for c in s.control],
        "max_in_flight": s.max_in_flight, "span_ns": s.span_ns,
        "validated": s.validated,
    }
