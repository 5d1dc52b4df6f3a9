"""Validation checks: the live espfix state against the kernel's own rules.

Each check is a small function ``check_<name>(ctx) -> Iterable[Finding]`` that
declares itself through :func:`check` into the registry :data:`CHECKS`: its name,
the other finding names it emits, a one-line summary, the severities it can emit and
the kernel source it holds the state to.  :func:`audit` runs them all.  The metrics
(:mod:`inspector.prom`), ``docs/checks.md`` (``python3 -m tests.helpers.gendocs``) and the tests
take the check names from the registry: :data:`FINDING_NAMES`.  What the checks hold
the kernel to comes from ``arch/x86/kernel/espfix_64.c`` (``init_espfix_ap()``: the
clone counts, ``PGTABLE_PROT``, the PTE protection), ``arch/x86/mm/pti.c``
(``pti_setup_espfix64()``) and ``entry_64.S``.

The randomisation every later check depends on (``page_random``/``slot_random``,
``init_espfix_random()``) is worked out once, when the :class:`Context` is made,
before any check runs; the ``randomness`` check only reports what was found.  So the
checks are independent of each other and of their order (tests/test_audit.py runs
them shuffled).

Severities (:class:`Severity`): ``error`` (espfix is broken or unsafe here),
``warning`` (odd but not known to be harmful) and ``info`` (facts worth knowing: CPUs
never online, remote-node ministacks).  Errors and warnings are findings (exit 1).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import repeat

from .model import (CPUS_PER_GROUP, ESPFIX_BASE_ADDR, ESPFIX_PMD_CLONES,
                    ESPFIX_PTE_CLONES, ESPFIX_PUD_CLONES, ESPFIX_STACKS_PER_PAGE,
                    PTE_STRIDE, Randomness, espfix_base_addrs, format_cpu_list,
                    group_pud_index, invert_espfix_stack, pte_slots, pud_slots)
from .pagetable import decode_flags
from .errors import PageFiltered
from .records import dataclass, field
from .state import EspfixState
from .vocab import StrEnum
from .x86 import (DIRECT_MAP_SIZE, MASK64, PAGE_ACCESSED, PAGE_DIRTY, PAGE_GLOBAL, PAGE_NX,
                  PAGE_PRESENT, PAGE_RW, PAGE_USER, PTE_FLAGS_MASK)

__all__ = ["Finding", "AuditResult", "audit", "run_check", "check", "CheckInfo", "CHECKS",
           "FINDING_NAMES", "Severity", "SEVERITIES", "SEVERITY_MEANING", "Context",
           "expected_table_flags", "expected_pte_flags"]


class Severity(StrEnum):
    """How bad a finding is.  A ``str`` enum: JSON, text and metric labels carry the
    bare value (``"error"``)."""

    ERROR = "error"          # espfix is broken or unsafe here
    WARNING = "warning"      # odd, not known to be harmful
    INFO = "info"            # a fact worth knowing; not a finding for the exit status


ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO
#: What each severity means (docs/checks.md).
SEVERITY_MEANING = {
    ERROR: "espfix is broken or unsafe here (a finding: exit 1)",
    WARNING: "odd, not known to be harmful (a finding: exit 1)",
    INFO: "a fact worth knowing, e.g. CPUs never online, remote-node ministacks "
          "(not a finding)",
}
#: Every severity, most severe first (the order of the metric labels).
SEVERITIES: tuple[Severity, ...] = tuple(Severity)


@dataclass
class Finding:
    check: str
    severity: Severity
    message: str
    cpu: int | None = None
    details: dict = field(default_factory=dict)
    # the CPUs whose ministack the finding concerns, when more than `cpu` (a stack page
    # serves 64 CPUs, a group's PUD/PMD/PTE pages 1024)
    affects: range | None = None

    def as_dict(self) -> dict:
        # "cpus": the CPU-list string of every finding that concerns several CPUs
        extra = {"cpus": f"{self.affects.start}-{self.affects.stop - 1}"} \
            if self.affects is not None else {}
        return {"check": self.check, "severity": self.severity, "cpu": self.cpu,
                "message": self.message, **extra, **self.details}


def _group_cpus(g: int) -> range:
    return range(g * CPUS_PER_GROUP, (g + 1) * CPUS_PER_GROUP)


def _page_cpus(idx: int) -> range:
    return range(idx * ESPFIX_STACKS_PER_PAGE, (idx + 1) * ESPFIX_STACKS_PER_PAGE)


def expected_table_flags(ptemask: int) -> int:
    """``PGTABLE_PROT & __supported_pte_mask``: P|A|D|NX, read-only, for the
    PUD and PMD entries ``init_espfix_ap()`` writes."""
    return (PAGE_PRESENT | PAGE_ACCESSED | PAGE_DIRTY | PAGE_NX) & ptemask


def expected_pte_flags(ptemask: int) -> set[int]:
    """``__PAGE_KERNEL_RO & __supported_pte_mask`` for the stack-page PTEs:
    P|A|D|G|NX before 6.6, P|A|G|NX since f788b71768ff ("x86/mm: Remove
    _PAGE_DIRTY from kernel RO pages").  Either is the kernel's own value."""
    base = PAGE_PRESENT | PAGE_ACCESSED | PAGE_GLOBAL | PAGE_NX
    return {base & ptemask, (base | PAGE_DIRTY) & ptemask}


@dataclass
class Context:
    """What every check reads, worked out once before any check runs: the initialised
    CPUs and their words, the stack pages and groups in use, and the randomisation."""

    state: EspfixState
    rnd: Randomness | None = None           # the randomisation the checks hold CPUs to
    rnd_source: str = ""                    # "statics" or "inferred"
    #: page_random/slot_random as read from the statics (None: not read, or out of range)
    rnd_statics: Randomness | None = None
    rnd_statics_out_of_range: bool = False  # the statics were read but cannot be right
    #: what most initialised CPUs' espfix_stack imply (None: no CPU, or none inverts)
    rnd_inferred: Randomness | None = None
    initialised: list[int] = field(default_factory=list)   # CPUs with an espfix_stack
    used_pages: set[int] = field(default_factory=set)      # espfix_pages indices in use
    used_groups: set[int] = field(default_factory=set)     # 1024-CPU groups in use
    # espfix_stack and espfix_waddr of each CPU in `initialised`, in the same order
    stacks: list[int] = field(default_factory=list)
    waddrs: list[int] = field(default_factory=list)
    _expected: dict[Randomness, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        init = [st for st in self.state.cpus.values() if st.espfix_stack]
        self.initialised = [st.cpu for st in init]
        self.stacks = [st.espfix_stack for st in init]
        self.waddrs = [st.espfix_waddr for st in init]
        self.used_pages = {c // ESPFIX_STACKS_PER_PAGE for c in self.initialised}
        self.used_groups = {p // PTE_STRIDE for p in self.used_pages}
        self._work_out_randomness()

    def _work_out_randomness(self) -> None:
        """``page_random``/``slot_random`` (``init_espfix_random()``,
        arch/x86/kernel/espfix_64.c): read from the statics when the symbols show them,
        else inferred from the CPUs (majority).  Reads nothing: the state is loaded."""
        inferred = _uniform_randomness(self)
        if inferred is None:
            votes: Counter = Counter()
            for cpu, stack in zip(self.initialised, self.stacks):
                try:
                    votes[invert_espfix_stack(cpu, stack)] += 1
                except ValueError:
                    continue
            inferred = Randomness(*votes.most_common(1)[0][0]) if votes else None
        self.rnd_inferred = inferred
        info = self.state.info
        if info.page_random is not None and info.slot_random is not None:
            try:
                self.rnd_statics = Randomness(info.page_random, info.slot_random)
            except ValueError:
                self.rnd_statics_out_of_range = True
        if self.rnd_statics is not None:
            self.rnd, self.rnd_source = self.rnd_statics, "statics"
        else:
            self.rnd, self.rnd_source = inferred, "inferred"

    def expected_stacks(self, rnd: Randomness) -> list[int]:
        """``espfix_base_addr(cpu)`` under *rnd* for every CPU in ``initialised``."""
        if rnd not in self._expected:
            self._expected[rnd] = espfix_base_addrs(self.initialised, rnd.page_random,
                                                    rnd.slot_random)
        return self._expected[rnd]

    @property
    def ptemask(self) -> int:
        m = self.state.info.supported_pte_mask
        return (MASK64 if m is None else m) & ~self.state.info.sme_mask

    def flags(self, entry: int) -> int:
        return entry & PTE_FLAGS_MASK & ~self.state.info.sme_mask

    def addr(self, entry: int) -> int:
        return self.state.walker.entry_addr(entry)

    def group_pud_index(self, group: int) -> int:
        assert self.rnd is not None
        return group_pud_index(group, self.rnd.page_random)


@dataclass
class AuditResult:
    findings: list[Finding]
    rnd: Randomness | None
    rnd_source: str
    per_cpu_bad: set[int]

    @property
    def ok(self) -> bool:
        return not any(f.severity in (ERROR, WARNING) for f in self.findings)


Check = Callable[[Context], Iterable[Finding]]


@dataclass(frozen=True)
class CheckInfo:
    """One check as it declares itself: what ``docs/checks.md``, the man page test and
    the metric labels are made from."""

    name: str                          # the check, and the name of most of its findings
    summary: str                       # one line: what it holds the kernel to
    severities: tuple[Severity, ...]   # what its findings can carry
    source: str                        # the kernel source the rule comes from
    fn: Check = field(repr=False)
    also: tuple[str, ...] = ()         # other finding names it emits

    @property
    def names(self) -> tuple[str, ...]:
        """Every finding name this check emits, its own first."""
        return (self.name,) + self.also


#: The registry, in the order the checks run and their findings are reported.
CHECKS: list[CheckInfo] = []


def check(name: str, summary: str, severities: Iterable[Severity], source: str,
          also: Iterable[str] = ()) -> Callable[[Check], Check]:
    """Register the decorated function as the check *name* (see :class:`CheckInfo`)."""
    def register(fn: Check) -> Check:
        info = CheckInfo(name, summary, tuple(Severity(s) for s in severities), source, fn,
                         tuple(also))
        taken = {n for c in CHECKS for n in c.names}
        if taken & set(info.names) or len(set(info.names)) != len(info.names):
            raise ValueError(f"check {name}: a finding name is declared twice")
        CHECKS.append(info)
        return fn
    return register


def _initialised(ctx: Context) -> list[int]:
    return ctx.initialised


#: ``CONFIG_PHYSICAL_ALIGN`` is at least 2 MiB on x86-64 (arch/x86/Kconfig: "range
#: 0x200000 0x1000000 if X86_64"); KASLR moves the image, and phys_base follows the
#: load address, in multiples of it (arch/x86/boot/compressed/kaslr.c).
PHYSICAL_ALIGN_MIN = 0x200000


@check("cpu_masks", "The CPU masks agree: online is a subset of possible, some CPU is "
       "online, nr_cpu_ids is the last possible CPU + 1, no mask bit at or beyond it.",
       [ERROR], "kernel/smp.c setup_nr_cpu_ids(); kernel/cpu.c set_cpu_online()")
def check_cpu_masks(ctx: Context) -> Iterable[Finding]:
    """The CPU masks agree with each other and with ``nr_cpu_ids``: online is a subset
    of possible (``set_cpu_online()`` only marks possible CPUs), at least one CPU is
    online (the one that wrote the state), and ``nr_cpu_ids`` is the last possible CPU
    plus one (``setup_nr_cpu_ids()``, kernel/smp.c) with no mask bit at or above it.
    A core that breaks these cannot be trusted for the per-CPU checks either."""
    st = ctx.state
    possible = set(st.possible)
    stray = sorted(set(st.online) - possible)
    if stray:
        yield Finding("cpu_masks", ERROR, f"CPUs {format_cpu_list(stray)} are online but not "
                      "possible: the CPU masks are corrupt (these CPUs are not checked)",
                      None, {"cpus": format_cpu_list(stray)})
    if not st.online:
        yield Finding("cpu_masks", ERROR, "no CPU is online in __cpu_online_mask: the mask "
                      "is corrupt (a running kernel has at least the CPU that wrote it)")
    nr = st.info.nr_cpu_ids
    if st.possible and st.possible[-1] + 1 != nr:
        yield Finding("cpu_masks", ERROR, f"nr_cpu_ids is {nr} but the last possible CPU "
                      f"is {st.possible[-1]} (setup_nr_cpu_ids() makes them agree)")
    if not st.possible:
        yield Finding("cpu_masks", ERROR, "no CPU is possible in __cpu_possible_mask: the "
                      "mask is corrupt")
    for mask, cpus in sorted(st.beyond_nr_cpu_ids.items()):
        if cpus:
            yield Finding("cpu_masks", ERROR, f"the {mask} mask has CPUs "
                          f"{format_cpu_list(cpus)} set, at or beyond nr_cpu_ids ({nr})",
                          None, {"cpus": format_cpu_list(cpus)})


@check("kernel_image", "The KASLR offset (VMCOREINFO KERNELOFFSET) and phys_base are "
       "multiples of 2 MiB, the smallest CONFIG_PHYSICAL_ALIGN on x86-64.",
       [ERROR], "arch/x86/Kconfig PHYSICAL_ALIGN; arch/x86/boot/compressed/kaslr.c")
def check_kernel_image(ctx: Context) -> Iterable[Finding]:
    """The KASLR offset and ``phys_base`` are multiples of ``CONFIG_PHYSICAL_ALIGN``;
    anything else cannot come from a booted kernel, and every image address the
    inspector translated through them is suspect."""
    info = ctx.state.info
    for name, value in (("KASLR offset (VMCOREINFO KERNELOFFSET)", info.kaslr_offset),
                        ("phys_base", info.phys_base)):
        if value % PHYSICAL_ALIGN_MIN:
            yield Finding("kernel_image", ERROR, f"the {name} {value:#x} is not a multiple "
                          f"of {PHYSICAL_ALIGN_MIN:#x} (CONFIG_PHYSICAL_ALIGN): the core's "
                          "VMCOREINFO is inconsistent")


@check("cpu_init", "An online CPU has a ministack (espfix_stack set); offline "
       "initialised and never-online CPUs are reported as facts.",
       [ERROR, INFO], "arch/x86/kernel/espfix_64.c init_espfix_ap(), called as a CPU first "
       "comes online")
def check_cpu_init(ctx: Context) -> Iterable[Finding]:
    """Online CPUs must have a ministack; others are reported as facts."""
    never = []
    for cpu, st in ctx.state.cpus.items():
        if st.online and not st.initialised:
            # init_espfix_ap() sets both words; a set espfix_waddr means it ran
            why = (f"espfix_waddr is {st.espfix_waddr:#x}, so init_espfix_ap() ran and "
                   "espfix_stack was cleared since") if st.espfix_waddr \
                else "init_espfix_ap() never ran for it"
            yield Finding("cpu_init", ERROR, f"online but espfix_stack is 0: {why}", cpu)
        elif not st.online and st.initialised:
            yield Finding("cpu_init", INFO, "offline, initialised (the kernel never frees "
                          "espfix state)", cpu)
        elif not st.online:
            never.append(cpu)
    if never:
        yield Finding("cpu_init", INFO,
                      f"possible but never online, no ministack yet (espfix is set up on "
                      f"first online): CPUs {format_cpu_list(never)}",
                      None, {"cpus": format_cpu_list(never)})


@check("randomness", "page_random/slot_random are read from the statics when the "
       "symbols show them, else inferred from the CPUs; the statics agree with the CPUs.",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_random(), espfix_base_addr()")
def check_randomness(ctx: Context) -> Iterable[Finding]:
    """Reports the randomisation :class:`Context` worked out before the checks ran:
    statics out of range, or statics the CPUs' ``espfix_stack`` contradict."""
    info = ctx.state.info
    if ctx.rnd_statics_out_of_range:
        yield Finding("randomness", ERROR, f"page_random={info.page_random} "
                      f"slot_random={info.slot_random} are out of range")
    statics, inferred = ctx.rnd_statics, ctx.rnd_inferred
    if statics is not None and inferred is not None and inferred != statics:
        yield Finding("randomness", ERROR,
                      f"the statics say page_random={statics.page_random} "
                      f"slot_random={statics.slot_random} but most CPUs' espfix_stack "
                      f"imply {inferred.page_random}/{inferred.slot_random}")


def _uniform_randomness(ctx: Context) -> Randomness | None:
    """The randomness that *every* initialised CPU's ``espfix_stack`` follows, tried
    for the statics and for what the first CPU implies; None when the CPUs disagree
    (then each CPU votes).  When all follow one, every CPU's inversion gives it, so the
    vote would too: this is the vote without 131,072 inversions."""
    if not ctx.initialised:
        return None
    info = ctx.state.info
    candidates = []
    try:
        candidates.append(Randomness(info.page_random, info.slot_random))  # type: ignore[arg-type]  # None: TypeError
    except (TypeError, ValueError):
        pass
    try:
        candidates.append(Randomness(*invert_espfix_stack(ctx.initialised[0], ctx.stacks[0])))
    except ValueError:
        pass
    for rnd in candidates:
        if ctx.expected_stacks(rnd) == ctx.stacks:
            return rnd
    return None


@check("espfix_stack", "per_cpu(espfix_stack, n) == espfix_base_addr(n).",
       [ERROR], "arch/x86/kernel/espfix_64.c espfix_base_addr(), init_espfix_ap()")
def check_espfix_stack(ctx: Context) -> Iterable[Finding]:
    """``per_cpu(espfix_stack, cpu) == espfix_base_addr(cpu)``."""
    if ctx.rnd is None:
        return
    expected_all = ctx.expected_stacks(ctx.rnd)
    if expected_all == ctx.stacks:
        return
    for cpu, actual, expected in zip(ctx.initialised, ctx.stacks, expected_all):
        if actual != expected:
            yield Finding("espfix_stack", ERROR, f"espfix_stack is {actual:#x}, the kernel's "
                          f"formula gives {expected:#x}", cpu,
                          {"actual": f"{actual:#x}", "expected": f"{expected:#x}"})


@check("espfix_pages", "espfix_pages[n/64] is a page-aligned direct-map address, the "
       "page its CPUs use, for every page in use; an unused page's pointer is a warning.",
       [ERROR, WARNING], "arch/x86/kernel/espfix_64.c init_espfix_ap() (espfix_pages[])")
def check_espfix_pages(ctx: Context) -> Iterable[Finding]:
    """``espfix_pages[n/64]`` is set, page-aligned and in the direct map for
    every page in use; NULL for pages no CPU uses."""
    st = ctx.state
    used = ctx.used_pages
    in_use = _stack_pages_in_use(ctx)
    for idx, va in enumerate(st.espfix_pages):
        if idx in used:
            if not va:
                yield Finding("espfix_pages", ERROR, f"espfix_pages[{idx}] is NULL but CPUs "
                              f"{idx * 64}-{idx * 64 + 63} have a ministack", idx * 64)
            elif va & 0xFFF or st.direct_map_pa(va) is None:
                yield Finding("espfix_pages", ERROR, f"espfix_pages[{idx}] = {va:#x} is not a "
                              "page-aligned direct-map address", idx * 64)
            elif in_use.get(idx) not in (None, st.direct_map_pa(va)):
                yield Finding("espfix_pages", ERROR, f"espfix_pages[{idx}] = {va:#x} is page "
                              f"{st.direct_map_pa(va):#x}, but its CPUs' ministacks are on page "
                              f"{in_use[idx]:#x} (their espfix_stack maps it, their espfix_waddr "
                              "point into it): a CPU of this page brought online next would get "
                              "a wrong espfix_waddr", idx * 64, affects=_page_cpus(idx))
        elif va:
            yield Finding("espfix_pages", WARNING, f"espfix_pages[{idx}] = {va:#x} but no CPU "
                          f"of {idx * 64}-{idx * 64 + 63} has a ministack", idx * 64)


def _stack_pages_in_use(ctx: Context) -> dict[int, int]:
    """espfix_pages index -> the physical stack page its CPUs use, where the walks of
    their ``espfix_stack`` and their ``espfix_waddr`` all agree on one page (two
    independent records of where ``init_espfix_ap()`` put it)."""
    st = ctx.state
    seen: dict[int, set[int | None]] = {}
    for cpu in _initialised(ctx):
        c = st.cpus[cpu]
        w = st.walk(c.espfix_stack)
        waddr = st.direct_map_pa(c.espfix_waddr)
        pages = seen.setdefault(cpu // ESPFIX_STACKS_PER_PAGE, set())
        pages.add(None if w.phys is None else w.phys & ~0xFFF)
        pages.add(None if waddr is None else waddr & ~0xFFF)
    return {idx: p.pop() for idx, p in seen.items()     # type: ignore[misc]  # None not in p
            if len(p) == 1 and None not in p}


@check("espfix_waddr", "espfix_waddr == espfix_pages[n/64] + (espfix_stack & 0xfff).",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_ap()")
def check_espfix_waddr(ctx: Context) -> Iterable[Finding]:
    """``espfix_waddr = espfix_pages[n/64] + (espfix_stack & ~PAGE_MASK)``."""
    pages = ctx.state.espfix_pages
    for cpu, stack, waddr in zip(ctx.initialised, ctx.stacks, ctx.waddrs):
        idx = cpu // ESPFIX_STACKS_PER_PAGE
        page_va = pages[idx] if idx < len(pages) else 0
        expected = page_va + (stack & 0xFFF)
        if not page_va:
            continue                                    # reported by espfix_pages
        if waddr != expected:
            yield Finding("espfix_waddr", ERROR, f"espfix_waddr is {waddr:#x}, "
                          f"expected espfix_pages[{idx}] + {stack & 0xFFF:#x} = "
                          f"{expected:#x}", cpu,
                          {"actual": f"{waddr:#x}", "expected": f"{expected:#x}"})


@check("top_entry", "pgd[510] (4-level) or p4d[510] (5-level) of init_top_pgt points "
       "to espfix_pud_page.",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_bsp()")
def check_top_entry(ctx: Context) -> Iterable[Finding]:
    """The top-level entry for ESPFIX_BASE_ADDR points to ``espfix_pud_page``."""
    st = ctx.state
    top = st.top_entry()
    where = "p4d[510]" if st.info.levels == 5 else "pgd[510]"
    if top is None or not top.entry & PAGE_PRESENT:
        yield Finding("top_entry", ERROR, f"{where} for {ESPFIX_BASE_ADDR:#x} is not present: "
                      "espfix_pud_page is not installed in init_top_pgt")
    elif ctx.addr(top.entry) != st.info.pud_pa:
        yield Finding("top_entry", ERROR, f"{where} points to {ctx.addr(top.entry):#x}, not to "
                      f"espfix_pud_page at {st.info.pud_pa:#x}")


def _groups(ctx: Context) -> list[int]:
    return sorted(ctx.used_groups) if ctx.rnd is not None else []


@check("pud_clones", "4 identical present PUD entries per 1024-CPU group, flags "
       "PGTABLE_PROT (P|A|D|NX, read-only); no other present entry in espfix_pud_page.",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_ap() "
       "(ESPFIX_PUD_CLONES, PGTABLE_PROT)",
       also=("pud_prot", "stray_pud"))
def check_pud_clones(ctx: Context) -> Iterable[Finding]:
    """4 identical, present, read-only NX PUD entries per group in use, and
    nothing else present in ``espfix_pud_page``."""
    pud = ctx.state.pud_page
    want = expected_table_flags(ctx.ptemask)
    in_use: set[int] = set()
    for g in _groups(ctx):
        first = ctx.group_pud_index(g)
        slots = pud_slots(first)
        in_use.update(slots)
        entries = [pud[i] for i in slots]
        cpu = g * CPUS_PER_GROUP
        if not all(e & PAGE_PRESENT for e in entries):
            missing = [i for i in slots if not pud[i] & PAGE_PRESENT]
            yield Finding("pud_clones", ERROR, f"group {g}: PUD clone(s) {missing} not "
                          f"present (of {list(slots)})", cpu, affects=_group_cpus(g))
        elif len(set(entries)) != 1:
            yield Finding("pud_clones", ERROR, f"group {g}: the {ESPFIX_PUD_CLONES} PUD clones "
                          f"differ: {', '.join(f'{e:#x}' for e in entries)}",
                          cpu, affects=_group_cpus(g))
        for i in slots:
            if pud[i] & PAGE_PRESENT and ctx.flags(pud[i]) != want:
                yield Finding("pud_prot", ERROR, f"group {g}: pud[{i}] = {pud[i]:#x} has "
                              f"flags {decode_flags(pud[i])}, the kernel sets "
                              f"{decode_flags(want)}", cpu, affects=_group_cpus(g))
    if ctx.rnd is None:
        return
    for i, e in enumerate(pud):
        if e & PAGE_PRESENT and i not in in_use:
            yield Finding("stray_pud", ERROR, f"espfix_pud_page[{i}] = {e:#x} is present but no "
                          "CPU group in use maps there")


def _group_pmd(ctx: Context, g: int) -> int | None:
    e = ctx.state.pud_page[ctx.group_pud_index(g)]
    return ctx.addr(e) if e & PAGE_PRESENT else None


@check("pmd_clones", "All 512 PMD entries of a group's PMD page identical, present, "
       "flags PGTABLE_PROT.",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_ap() "
       "(ESPFIX_PMD_CLONES, PGTABLE_PROT)",
       also=("pmd_prot",))
def check_pmd_clones(ctx: Context) -> Iterable[Finding]:
    """All 512 PMD entries of a group's PMD page identical, present, RO, NX."""
    want = expected_table_flags(ctx.ptemask)
    for g in _groups(ctx):
        pmd_pa = _group_pmd(ctx, g)
        if pmd_pa is None:
            continue
        pmd = ctx.state.walker.table(pmd_pa)
        cpu = g * CPUS_PER_GROUP
        absent = [i for i, e in enumerate(pmd) if not e & PAGE_PRESENT]
        values = Counter(e for e in pmd if e & PAGE_PRESENT)
        if absent:
            yield Finding("pmd_clones", ERROR, f"group {g}: {len(absent)} of "
                          f"{ESPFIX_PMD_CLONES} PMD clones not present (first: pmd[{absent[0]}])",
                          cpu, affects=_group_cpus(g))
        if len(values) > 1:
            common = values.most_common(1)[0][0]
            odd = [i for i, e in enumerate(pmd) if e & PAGE_PRESENT and e != common]
            yield Finding("pmd_clones", ERROR, f"group {g}: PMD clones differ: pmd[{odd[0]}] = "
                          f"{pmd[odd[0]]:#x}, most are {common:#x}", cpu, affects=_group_cpus(g))
        for value in values:
            if ctx.flags(value) != want:
                i = pmd.index(value)
                yield Finding("pmd_prot", ERROR, f"group {g}: pmd[{i}] = {value:#x} has flags "
                              f"{decode_flags(value)}, the kernel sets {decode_flags(want)}",
                              cpu, affects=_group_cpus(g))


@check("pte_clones", "32 identical present PTEs every 16th entry per stack page, "
       "mapping espfix_pages[n], flags __PAGE_KERNEL_RO (P|A|D|G|NX, P|A|G|NX since v6.6; "
       "never RW or USER); no other present PTE in a group's PTE page.",
       [ERROR], "arch/x86/kernel/espfix_64.c init_espfix_ap() (ESPFIX_PTE_CLONES, "
       "__PAGE_KERNEL_RO); _PAGE_DIRTY left it in commit f788b71768ff (\"x86/mm: Remove "
       "_PAGE_DIRTY from kernel RO pages\") (in v6.6)",
       also=("pte_prot", "stray_pte"))
def check_pte_clones(ctx: Context) -> Iterable[Finding]:
    """Per stack page in use: 32 identical, present PTEs every 16th entry,
    pointing at ``espfix_pages[n]``, read-only, NX, global, not user; and no
    present PTE for a page no CPU uses."""
    st = ctx.state
    assert ctx.rnd is not None or not _groups(ctx)
    allowed = expected_pte_flags(ctx.ptemask)
    for g in _groups(ctx):
        pmd_pa = _group_pmd(ctx, g)
        if pmd_pa is None:
            continue
        pmd_e = st.walker.table(pmd_pa)[0]
        if not pmd_e & PAGE_PRESENT:
            continue
        pte = st.walker.table(ctx.addr(pmd_e))
        pages_in_group = {idx ^ ctx.rnd.page_random: idx for idx in ctx.used_pages  # type: ignore[union-attr]
                          if idx // PTE_STRIDE == g}
        used_slots: set[int] = set()
        for page, idx in sorted(pages_in_group.items()):
            slots = pte_slots(page)
            used_slots.update(slots)
            entries = [pte[i] for i in slots]
            cpu = idx * ESPFIX_STACKS_PER_PAGE
            va = st.espfix_pages[idx] if idx < len(st.espfix_pages) else 0
            want_pa = st.direct_map_pa(va) if va else None
            absent = [i for i in slots if not pte[i] & PAGE_PRESENT]
            if absent:
                yield Finding("pte_clones", ERROR, f"stack page {idx}: {len(absent)} of "
                              f"{ESPFIX_PTE_CLONES} PTE clones not present (first: pte[{absent[0]}])",
                              cpu, affects=_page_cpus(idx))
            present = [e for e in entries if e & PAGE_PRESENT]
            if len(set(present)) > 1:
                common = Counter(present).most_common(1)[0][0]
                odd = next(i for i in slots if pte[i] & PAGE_PRESENT and pte[i] != common)
                yield Finding("pte_clones", ERROR, f"stack page {idx}: PTE clones differ: "
                              f"pte[{odd}] = {pte[odd]:#x}, most are {common:#x}",
                              cpu, affects=_page_cpus(idx))
            for e in set(present):
                if want_pa is not None and ctx.addr(e) != want_pa:
                    i = next(j for j in slots if pte[j] == e)
                    yield Finding("pte_clones", ERROR, f"stack page {idx}: pte[{i}] maps "
                                  f"{ctx.addr(e):#x}, espfix_pages[{idx}] is {want_pa:#x}",
                                  cpu, affects=_page_cpus(idx))
                if ctx.flags(e) not in allowed:
                    i = next(j for j in slots if pte[j] == e)
                    yield Finding("pte_prot", ERROR, f"stack page {idx}: pte[{i}] = {e:#x} has "
                                  f"flags {decode_flags(e)}, the kernel sets "
                                  f"{' or '.join(decode_flags(a) for a in sorted(allowed))}"
                                  f"{_why(e)}", cpu, affects=_page_cpus(idx))
        for i, e in enumerate(pte):
            if e & PAGE_PRESENT and i not in used_slots:
                yield Finding("stray_pte", ERROR, f"group {g}: pte[{i}] = {e:#x} is present but "
                              "maps no stack page in use", g * CPUS_PER_GROUP,
                              affects=_group_cpus(g))


def _why(entry: int) -> str:
    bits = []
    if entry & PAGE_RW:
        bits.append("writable")
    if entry & PAGE_USER:
        bits.append("user-accessible")
    if not entry & PAGE_NX:
        bits.append("executable")
    if not entry & PAGE_GLOBAL:
        bits.append("not global")
    return f" ({', '.join(bits)})" if bits else ""


@check("walk", "Walking espfix_stack from init_top_pgt (pti_walk: from the PTI user "
       "PGD) reaches the physical page behind espfix_waddr.",
       [ERROR], "arch/x86/entry/entry_64.S (the espfix IRET path); "
       "arch/x86/kernel/espfix_64.c init_espfix_ap()",
       also=("pti_walk",))
def check_walk(ctx: Context) -> Iterable[Finding]:
    """The walk of ``espfix_stack`` from init_top_pgt (and from the PTI user
    PGD) reaches the physical page behind ``espfix_waddr``."""
    st = ctx.state
    roots = [False, True] if st.info.pti else [False]
    bases = [stack & ~0xFFF for stack in ctx.stacks]
    # per stack page: its 64 CPUs share a walk (made in the order the loop below would)
    walks = {(base, user): st.walk(base, user) for base in dict.fromkeys(bases) for user in roots}
    if bases and all(w.phys is not None for w in walks.values()):
        pob = st.info.page_offset_base
        offsets = [(waddr - pob) & MASK64 for waddr in ctx.waddrs]    # direct_map_pa()
        if max(offsets) < DIRECT_MAP_SIZE[st.info.levels]:
            want_pfns = list(map(operator.rshift, offsets, repeat(12)))
            if all(list(map({b: w.phys >> 12 for (b, u), w in walks.items()    # type: ignore
                             if u == user}.__getitem__, bases)) == want_pfns for user in roots):
                return              # every CPU reaches its espfix_waddr page: no finding
    for cpu, stack, waddr in zip(ctx.initialised, ctx.stacks, ctx.waddrs):
        want = st.direct_map_pa(waddr)
        for user in roots:
            w = walks.get((stack & ~0xFFF, user))
            if w is None:
                w = walks[stack & ~0xFFF, user] = st.walk(stack, user)
            if w.phys is None:
                name, tables = ("pti_walk", "PTI user page tables") if user else ("walk", "init_top_pgt")
                yield Finding(name, ERROR, f"{stack:#x} is not mapped in {tables}: "
                              f"{w.fault}", cpu)
            elif want is not None and w.phys >> 12 != want >> 12:
                name, tables = ("pti_walk", "PTI user page tables") if user else ("walk", "init_top_pgt")
                yield Finding(name, ERROR, f"{stack:#x} maps physical "
                              f"{w.phys & ~0xFFF:#x} through {tables}, espfix_waddr's page is "
                              f"{want & ~0xFFF:#x}", cpu)


@check("pti", "With PTI the user page tables carry the kernel's espfix top entry; a "
       "contradiction between sysfs and the tables is a warning.",
       [ERROR, WARNING], "arch/x86/mm/pti.c pti_setup_espfix64()")
def check_pti(ctx: Context) -> Iterable[Finding]:
    """With PTI the user tables carry the same espfix top entry
    (``pti_clone_p4d(ESPFIX_BASE_ADDR)``); sysfs and memory agree on PTI."""
    st = ctx.state
    meltdown = st.host.meltdown or ""
    # "Not affected" says nothing about PTI: pti=on forces it on unaffected
    # CPUs (seen on Debian 6.1, -cpu max + pti=on).  Only a contradiction counts.
    if ("Mitigation: PTI" in meltdown and not st.info.pti) or \
            (meltdown.startswith("Vulnerable") and st.info.pti):
        yield Finding("pti", WARNING, f"sysfs meltdown status is {meltdown!r} but the user "
                      f"half of init_top_pgt is {'populated' if st.info.pti else 'empty'}")
    if not st.info.pti:
        return
    k, u = st.top_entry(), st.top_entry(user=True)
    if u is None or not u.entry & PAGE_PRESENT:
        yield Finding("pti", ERROR, "PTI is on but the user page tables have no espfix entry "
                      "(pti_setup_espfix64() copies it at boot): every espfix IRET would fault")
    elif k is not None and u.entry != k.entry:
        yield Finding("pti", ERROR, f"PTI user espfix entry {u.entry:#x} differs from the "
                      f"kernel's {k.entry:#x}")


@check("numa", "Ministacks on another NUMA node than their CPU, with a count per "
       "node (a fact: the page is allocated on the node of the first CPU of its 64).",
       [INFO], "arch/x86/kernel/espfix_64.c init_espfix_ap() "
       "(alloc_pages_node(cpu_to_node(cpu)))")
def check_numa(ctx: Context) -> Iterable[Finding]:
    """Ministacks on another node than their CPU (a fact, not an error: the
    first CPU of a 64-group allocates the page on its own node)."""
    st = ctx.state
    host = st.host
    if not host.cpu_node or not host.block_size:
        return
    remote: dict[int, list[int]] = {}
    for cpu in _initialised(ctx):
        pa = st.direct_map_pa(st.cpus[cpu].espfix_waddr)
        node = host.node_of_phys(pa) if pa is not None else None
        cpu_node = host.cpu_node.get(cpu)
        if node is not None and cpu_node is not None and node != cpu_node:
            remote.setdefault(cpu_node, []).append(cpu)
            yield Finding("numa", INFO, f"ministack on node {node}, CPU on node {cpu_node}",
                          cpu, {"stack_node": node, "cpu_node": cpu_node})
    for node, cpus in sorted(remote.items()):
        yield Finding("numa", INFO, f"node {node}: {len(cpus)} CPU(s) use a remote ministack",
                      None, {"node": node, "cpus": format_cpu_list(cpus)})


def run_check(c: CheckInfo, ctx: Context) -> list[Finding]:
    """The findings of one check.  A crash dump that filtered out a page the check reads
    gives one info finding instead (any check can emit it)."""
    try:
        return list(c.fn(ctx))
    except PageFiltered as e:      # a crash dump without the page this check reads
        return [Finding(c.name, INFO, f"could not run: {e.cause}",
                        details={"filtered_page": f"{e.paddr:#x}"})]


def audit(state: EspfixState) -> AuditResult:
    ctx = Context(state)
    findings: list[Finding] = []
    for c in CHECKS:
        findings.extend(run_check(c, ctx))
    bad: set[int] = set()
    for f in findings:
        if f.severity == INFO:
            continue
        if f.cpu is not None:
            bad.add(f.cpu)
        if f.affects is not None:
            bad.update(c for c in f.affects if c in state.cpus and state.cpus[c].initialised)
    return AuditResult(findings, ctx.rnd, ctx.rnd_source, bad)


#: Every name a finding can carry, check by check in registry order (each check's own
#: name first): the ``check`` label of the ``espfix_inspect_findings`` metric.
FINDING_NAMES: tuple[str, ...] = tuple(n for c in CHECKS for n in c.names)
