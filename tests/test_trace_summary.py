"""The init summary of `trace` on synthetic event lists: percentiles, the log2 histogram
against bcc's own output, the layout prediction against `layout`'s counts, the lock
and serialization figures, and both renderers.  The live side runs in the VM guests
(tests/guest/test_trace_live.py, tests/guest/test_trace_mass_online.py)."""

from __future__ import annotations

import random

import pytest

from inspector import trace_summary as ts
from inspector.model import memory_cost
from inspector.trace_output import JsonTrace
from inspector.trace_summary import Outcome, init_event
from tests.helpers import jsonschemas

SET_UP, EARLY = Outcome.SET_UP.value, Outcome.EARLY_RETURN.value


def bpf_log2l(v: int) -> int:
    """bcc's bpf_log2()/bpf_log2l() from src/cc/export/helpers.h, step by step, as the
    reference the Python bucket index is held to."""
    def log2(x: int) -> int:            # 32-bit
        r = int(x > 0xFFFF) << 4
        x >>= r
        shift = int(x > 0xFF) << 3
        x >>= shift
        r |= shift
        shift = int(x > 0xF) << 2
        x >>= shift
        r |= shift
        shift = int(x > 0x3) << 1
        x >>= shift
        r |= shift
        r |= x >> 1
        return r
    hi = v >> 32
    return log2(hi) + 32 + 1 if hi else log2(v) + 1


@pytest.mark.parametrize("v", [0, 1, 2, 3, 4, 7, 8, 1023, 1024, 65535, 65536, 2**32 - 1,
                               2**32, 2**40 + 5, 2**64 - 1])
def test_bucket_index_is_bpf_log2l(v):
    assert ts.log2_index(v) == bpf_log2l(v)


def test_bucket_index_random_values():
    rng = random.Random(15)
    for _ in range(2000):
        v = rng.getrandbits(rng.randrange(1, 64))
        assert ts.log2_index(v) == bpf_log2l(v)


#: bcc tools/funclatency_example.txt, `funclatency pthread:pthread_mutex_lock`: the
#: 40-wide layout of the current print_log2_hist.
FUNCLATENCY_SAMPLE = """\
     nsecs               : count     distribution
         0 -> 1          : 0        |                                        |
         2 -> 3          : 0        |                                        |
         4 -> 7          : 0        |                                        |
         8 -> 15         : 0        |                                        |
        16 -> 31         : 0        |                                        |
        32 -> 63         : 0        |                                        |
        64 -> 127        : 0        |                                        |
       128 -> 255        : 0        |                                        |
       256 -> 511        : 0        |                                        |
       512 -> 1023       : 0        |                                        |
      1024 -> 2047       : 0        |                                        |
      2048 -> 4095       : 508967   |****************************************|
      4096 -> 8191       : 70072    |*****                                   |
      8192 -> 16383      : 27686    |**                                      |
     16384 -> 32767      : 5075     |                                        |
     32768 -> 65535      : 2318     |                                        |
     65536 -> 131071     : 581      |                                        |
    131072 -> 262143     : 38       |                                        |
    262144 -> 524287     : 5        |                                        |
    524288 -> 1048575    : 1        |                                        |
   1048576 -> 2097151    : 9        |                                        |"""


def test_histogram_text_is_bccs():
    vals = [0] * ts.LOG2_INDEX_MAX
    counts = [508967, 70072, 27686, 5075, 2318, 581, 38, 5, 1, 9]
    vals[12:12 + len(counts)] = counts
    assert "\n".join(ts.format_log2_hist(vals, "nsecs")) == FUNCLATENCY_SAMPLE


def test_histogram_wide_layout_past_bucket_32():
    lines = ts.format_log2_hist(ts.log2_hist([3, 2**40]), "nsecs")
    assert lines[0] == "               nsecs                         : count     distribution"
    assert lines[-1] == (f"{2**40:20d} -> {2**41 - 1:<20d} : 1        |{'*' * 20}|")
    assert len(lines) == 1 + 41


def test_empty_histogram_prints_nothing():
    assert ts.format_log2_hist([0] * ts.LOG2_INDEX_MAX) == []
    assert ts.log2_hist([]) == [0] * ts.LOG2_INDEX_MAX
    with pytest.raises(ValueError):
        ts.log2_hist([-1])


def test_percentiles_nearest_rank():
    vals = list(range(1, 101))
    assert [ts.percentile(vals, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert ts.percentile([7], 50) == ts.percentile([7], 99) == 7
    assert ts.percentile([1, 2, 3], 50) == 2 and ts.percentile([1, 2, 3, 4], 50) == 2
    assert ts.percentile([], 50) is None
    with pytest.raises(ValueError):
        ts.percentile(vals, 0)


def test_in_flight():
    assert ts.max_in_flight([]) == 0
    assert ts.max_in_flight([(0, 10), (10, 20), (20, 30)]) == 1      # back to back
    assert ts.max_in_flight([(0, 10), (5, 20), (6, 7)]) == 3


def test_prediction_mass_online_of_72_cpus():
    p = ts.predict_allocations(range(1, 72), {0})
    assert p == {"stack page": [64], "PMD page": [], "PTE page": []}


def test_prediction_follows_bring_up_order_and_groups():
    # whichever CPU of a group comes first pays
    p = ts.predict_allocations([65, 64, 1030, 1024, 2], {0})
    assert p == {"stack page": [65, 1030], "PMD page": [1030], "PTE page": [1030]}
    # nothing set up before: cpu 0 pays for everything in group 0
    p = ts.predict_allocations(range(0, 2048), ())
    assert p["stack page"] == list(range(0, 2048, 64))
    assert p["PMD page"] == p["PTE page"] == [0, 1024]


def test_prediction_agrees_with_layout_counts():
    """Two readings of one rule: who pays (per CPU) and how many pages `layout`
    (model.memory_cost) counts for the CPUs before and after."""
    rng = random.Random(64)
    for _ in range(200):
        before = set(rng.sample(range(4096), rng.randrange(0, 40)))
        new = [c for c in rng.sample(range(4096), rng.randrange(0, 300)) if c not in before]
        p = ts.predict_allocations(new, before)
        after, was = memory_cost(before | set(new)), memory_cost(before)
        assert len(p["stack page"]) == after.stack_pages - was.stack_pages
        assert len(p["PMD page"]) == after.pmd_pages - was.pmd_pages
        assert len(p["PTE page"]) == len(p["PMD page"])


def lat(c: int, outcome: str) -> int:
    """Synthetic latencies: set-up 40.1-47.1 us, early returns 20.1-27.1 us."""
    return (40_000 if outcome == SET_UP else 20_000) + 100 * c


def mass_online(n=72, base_ns=10**9):
    """What trace decodes when cpus 1..n-1 come up one by one from cpu 0 (maxcpus=1),
    then go offline and come up again: the first round sets each up (cpu 64 pays the
    second stack page and takes the mutex), the second returns early."""
    evs, t = [], base_ns
    for rnd in (SET_UP, EARLY):
        for c in range(1, n):
            first = rnd == SET_UP and c % 64 == 0
            evs.append(init_event(c, 0 if c < 40 else 3, lat(c, rnd), rnd,
                                  ["stack page"] if first else [], ts_ns=t, mutex=first,
                                  lock_wait_ns=0, lock_contended=0,
                                  validate={"verdict": "ok"}))
            t += 10**6
    return evs


def test_summary_of_a_mass_online():
    evs = mass_online()
    s = ts.summarize(evs + [{"type": "ldt"}], {0}, "test")
    assert (s.calls, s.set_up, s.early_return, s.not_set) == (142, 71, 71, 0)
    lats = sorted(lat(c, o) for c in range(1, 72) for o in (SET_UP, EARLY))
    assert s.latency.total_ns == sum(lats) and s.latency.max_ns == 47_100
    assert s.latency.p50_ns == 27_100 and s.latency.p90_ns == lats[127]
    assert s.latency.p99_ns == lats[140] and s.latency.calls == 142
    assert s.latency.hist_us[5] == s.latency.hist_us[6] == 71     # 16-31 us, 32-63 us
    assert sum(s.latency.hist_us) == 142
    setup, early = s.by_outcome[SET_UP], s.by_outcome[EARLY]
    assert (setup.calls, setup.p50_ns, setup.max_ns) == (71, 43_600, 47_100)
    assert (early.calls, early.p50_ns, early.max_ns) == (71, 23_600, 27_100)
    assert Outcome.NOT_SET.value not in s.by_outcome
    assert s.observed == s.predicted == {"stack page": [64], "PMD page": [], "PTE page": []}
    assert s.layout_pages == {"stack page": 1, "PMD page": 0, "PTE page": 0}
    assert s.differences == () and s.before == (0,)
    assert s.lock.measured and s.lock.taken == 1 and s.lock.contended == 0
    assert [(c.cpu, c.calls) for c in s.control] == [(0, 78), (3, 64)]
    assert s.max_in_flight == 1 and s.validated == {"ok": 142}
    assert s.span_ns == 141 * 10**6 + lat(71, EARLY)


def test_a_second_online_is_predicted_to_allocate_nothing():
    evs = [e for e in mass_online() if e["outcome"] == EARLY]
    s = ts.summarize(evs, set(range(72)))
    assert s.set_up == 0 and s.early_return == 71
    assert s.predicted == {k: [] for k in ts.ALLOC_KINDS} and s.differences == ()
    assert s.lock.taken == 0


def test_an_unexpected_allocation_is_reported():
    evs = mass_online()
    evs[64]["allocated"] = ["stack page"]          # cpu 65 of round two: impossible
    evs[63]["allocated"] = []                      # cpu 64 did not
    s = ts.summarize(evs, {0})
    assert s.differences == ("stack page: allocated by cpus 65, layout predicts cpus 64",)
    assert any(line.startswith("DIFFERENCE stack page") for line in ts.render_text(s))
    assert ts.summary_json(s)["match"] is False


def test_cpus_set_up_in_the_trace_were_not_there_before():
    """The before-state is read after the probes are live; a CPU set up in between shows
    in both and must count as new."""
    s = ts.summarize(mass_online(), set(range(0, 5)))
    assert s.before == (0,) and s.differences == ()


def test_lock_waits():
    evs = mass_online()
    evs[63].update(lock_wait_ns=250_000, lock_contended=1)
    s = ts.summarize(evs, {0})
    assert (s.lock.contended, s.lock.total_ns, s.lock.max_ns, s.lock.waiters) == \
        (1, 250_000, 250_000, (64,))
    text = "\n".join(ts.render_text(s))
    assert "espfix_init_mutex: taken by 1 call, 1 waited (cpus 64), 250.0 us" in text
    s = ts.summarize(evs, {0}, lock_why="no lock:contention_begin tracepoint (added in v5.19)")
    assert not s.lock.measured and "wait not measured: no lock:contention_begin" in \
        "\n".join(ts.render_text(s))
    assert ts.summary_json(s)["espfix_init_mutex"]["measured"] is False


def test_overlapping_calls_show():
    evs = [init_event(1, 0, 100, SET_UP, ts_ns=0), init_event(2, 1, 100, SET_UP, ts_ns=50)]
    s = ts.summarize(evs, {0})
    assert s.max_in_flight == 2
    assert "at most 2 calls in flight" in "\n".join(ts.render_text(s))


def test_text_fits_80_columns_and_names_everything():
    lines = ts.render_text(ts.summarize(mass_online(), {0}, "espfix_stack read through "
                                        "/proc/kcore"))
    assert all(len(x) <= 80 for x in lines), [x for x in lines if len(x) > 80]
    text = "\n".join(lines)
    for needle in ("init_espfix_ap: 142 calls, 71 set up, 71 early returns",
                   "LATENCY (us)", "set up", "early return", "47.1",
                   "usecs               : count",
                   "ALLOCATED", "stack page", "allocations match layout's prediction",
                   "RAN ON CPU", "(serialized)", "validate after each call: 142 ok"):
        assert needle in text, needle


def test_no_calls():
    s = ts.summarize([], {0})
    assert ts.render_text(s) == ["init_espfix_ap: 0 calls, 0 set up, 0 early returns"]
    one = ts.summarize([init_event(1, 0, 5000, EARLY)], {0, 1})
    assert ts.render_text(one)[0] == "init_espfix_ap: 1 call, 0 set up, 1 early return"
    doc = ts.summary_json(s)
    assert doc["calls"] == 0 and doc["latency_ns"]["p50"] is None
    assert doc["histogram"]["data"] == []


def test_json_shape():
    lines: list[str] = []
    JsonTrace(lines.append).summary(ts.summarize(mass_online(), {0}))
    doc = jsonschemas.loads(lines[0], "trace")
    assert doc["event"] == "summary" and doc["match"] is True
    assert doc["allocations"]["stack page"] == {"seen": 1, "cpus": "64", "predicted": 1,
                                                "predicted_cpus": "64", "layout": 1}
    hist = doc["histogram"]["data"]
    assert hist[0] == {"interval-start": 0, "interval-end": 1, "count": 0}
    assert hist[-1] == {"interval-start": 32, "interval-end": 63, "count": 71}
    assert doc["latency_ns"]["by_outcome"]["set up"]["max"] == 47_100
    assert doc["control_cpus"][1] == {"cpu": 3, "calls": 64, "targets": "40-71",
                                      "busy_ns": sum(lat(c, o) for c in range(40, 72)
                                                     for o in (SET_UP, EARLY))}
