"""validate on synthetic kernels: clean images pass in every mode, and each
corruption is caught by its own named check."""

from __future__ import annotations

import pytest

from tests.conftest import kernel
from tests.helpers.synthcore import RW
from tests.helpers.faults import (f_bad_pages, f_bad_stack, f_bad_waddr, f_cleared_stack,
                          f_missing_pmd, f_missing_pte,
                          f_missing_pti, f_missing_pud, f_not_initialised, f_null_pages,
                          f_nx_pte, f_nx_pud, f_statics, f_stray_pte, f_stray_pud,
                          f_top_entry, f_user_pte, f_walk, f_writable_pmd, f_writable_pte,
                          f_wrong_pmd, f_wrong_pte)

MODES = [
    dict(levels=5), dict(levels=4), dict(levels=5, pti=True), dict(levels=4, pti=True),
    dict(levels=5, percpu="relative", pte_dirty=False, osrelease="7.2.13+deb14-amd64"),
    dict(levels=4, pti=True, percpu="relative", pte_dirty=False),
    dict(levels=5, sme_mask=1 << 51), dict(levels=4, sme_mask=1 << 47, pti=True),
    dict(nr_cpus=8, online=[0, 1]), dict(nr_cpus=3000), dict(statics=False),
    dict(phys_base=0x3000000, kaslr_offset=0), dict(nx=False),
]


def errors(result):
    return [(f.check, f.severity, f.cpu) for f in result.findings if f.severity != "info"]


@pytest.mark.parametrize("spec", MODES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_clean_kernel_passes(inspect, spec):
    k = kernel(**spec)
    state, result = inspect(k)
    assert errors(result) == []
    assert result.ok
    assert result.rnd == k.rnd
    assert result.rnd_source == ("statics" if spec.get("statics", True) else "inferred")
    assert state.info.levels == spec.get("levels", 5)
    assert state.info.pti == spec.get("pti", False)
    assert state.info.percpu == spec.get("percpu", "zero-based")
    for cpu in k.online:
        assert state.cpus[cpu].espfix_stack == k.get_percpu(cpu, "espfix_stack")
        # the walk ends on the page the builder allocated, found independently
        assert state.walk(state.cpus[cpu].espfix_stack).phys == k.stack_pa[cpu // 64]


def test_possible_never_online_and_offline_initialised(inspect):
    k = kernel(nr_cpus=8, online=[0, 1, 3], brought_up=[0, 1, 2, 3])
    _, result = inspect(k)
    assert result.ok
    info = {(f.check, f.cpu): f.message for f in result.findings if f.severity == "info"}
    assert "offline, initialised" in info[("cpu_init", 2)]
    assert "4-7" in info[("cpu_init", None)]


def find(result, check, cpu="any", severity="error"):
    return [f for f in result.findings if f.check == check and f.severity == severity
            and (cpu == "any" or f.cpu == cpu)]


FAULTS = [
    ("writable PTE clone", {}, f_writable_pte, "pte_prot", 0),
    ("writable PTE clone differs", {}, f_writable_pte, "pte_clones", 0),
    ("user-accessible PTE", {}, f_user_pte, "pte_prot", 0),
    ("missing PTE clone", {}, f_missing_pte, "pte_clones", 0),
    ("wrong PTE clone", {}, f_wrong_pte, "pte_clones", 0),
    ("PTE without NX", {}, f_nx_pte, "pte_prot", 0),
    ("missing PMD clone", {}, f_missing_pmd, "pmd_clones", 0),
    ("wrong PMD clone", {}, f_wrong_pmd, "pmd_clones", 0),
    ("writable PMD", {}, f_writable_pmd, "pmd_prot", 0),
    ("missing PUD clone", {}, f_missing_pud, "pud_clones", 0),
    ("PUD without NX", {}, f_nx_pud, "pud_prot", 0),
    ("stray PUD entry", {}, f_stray_pud, "stray_pud", "any"),
    ("stray PTE entry", {}, f_stray_pte, "stray_pte", 0),
    ("wrong espfix_stack", {}, f_bad_stack, "espfix_stack", 1),
    ("wrong espfix_waddr", {}, f_bad_waddr, "espfix_waddr", 2),
    ("NULL espfix_pages", {}, f_null_pages, "espfix_pages", 0),
    ("wrong espfix_pages", {}, f_bad_pages, "espfix_waddr", 0),
    ("wrong espfix_pages is named", {}, f_bad_pages, "espfix_pages", 0),
    ("online CPU not initialised", {}, f_not_initialised, "cpu_init", 3),
    ("espfix_stack cleared after init", {}, f_cleared_stack, "cpu_init", 3),
    ("missing PTI clone 5-level", dict(pti=True), f_missing_pti, "pti", "any"),
    ("missing PTI clone 4-level", dict(pti=True, levels=4), f_missing_pti, "pti_walk", 0),
    ("top entry elsewhere", {}, f_top_entry, "top_entry", "any"),
    ("statics disagree", {}, f_statics, "randomness", "any"),
    ("walk to a foreign page", {}, f_walk, "walk", 0),
]


@pytest.mark.parametrize("name,spec,mutate,check,cpu", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_caught(inspect, name, spec, mutate, check, cpu):
    k = kernel(**spec)
    _, clean = inspect(k)
    assert clean.ok, "the image must be clean before the fault"
    mutate(k)
    _, result = inspect(k)
    assert not result.ok
    assert find(result, check, cpu), f"{check} did not fire: {errors(result)}"


def test_fault_in_second_group_names_that_group(inspect):
    k = kernel(nr_cpus=2048)
    cpu = 1500
    pa = k.pud_pa + 8 * k.group_pud_index(cpu)
    k.write_u64(pa, k.read_u64(pa) | RW)
    _, result = inspect(k)
    hits = find(result, "pud_prot", 1024)
    assert hits and "group 1" in hits[0].message
    assert not find(result, "pud_prot", 0)


def test_numa_remote_ministack(inspect):
    # CPU 0 (node 0) allocates the page CPU 1 (node 1) also uses
    k = kernel(nodes=2)
    state, result = inspect(k, host=k.host_facts())
    remote = [f for f in result.findings if f.check == "numa" and f.cpu is not None]
    assert {f.cpu for f in remote} == {1, 3}
    assert all(f.details["stack_node"] == 0 for f in remote)
    summary = [f for f in result.findings if f.check == "numa" and f.cpu is None]
    assert summary[0].details == {"node": 1, "cpus": "1,3"}
    assert result.ok


def test_pages_read_at_most_once(inspect):
    k = kernel(nr_cpus=4096, pti=True)
    state, result = inspect(k)
    for cpu in state.cpus:
        state.frame(cpu)
    stats = state.reader.mem.stats
    assert result.ok
    assert stats.max_fetches_per_page() == 1
    # 4 groups: 4 PMD + 4 PTE + 64 stack pages + PUD + the PGD/P4D tables
    assert stats.pages_read <= 4 + 4 + 64 + 1 + 6


@pytest.mark.parametrize("meltdown,pti,warns", [
    ("Not affected", True, False),           # pti=on on an unaffected CPU (seen on 6.1)
    ("Not affected", False, False),
    ("Mitigation: PTI", True, False),
    ("Mitigation: PTI", False, True),
    ("Vulnerable", True, True),
    ("Vulnerable", False, False),
])
def test_pti_sysfs_consistency(inspect, meltdown, pti, warns):
    _, result = inspect(kernel(pti=pti), host={"meltdown": meltdown})
    assert bool(find(result, "pti", severity="warning")) == warns


def test_page_fault_marks_every_cpu_on_that_page(inspect):
    """A bad PTE of stack page 0 concerns CPUs 0-63, not only the first one."""
    k = kernel(nr_cpus=130)
    f_writable_pte(k)
    _, result = inspect(k)
    assert result.per_cpu_bad == set(range(64))
    hit = find(result, "pte_prot", 0)[0]
    assert hit.as_dict()["cpus"] == "0-63"


def test_group_fault_marks_the_initialised_cpus_of_the_group(inspect):
    k = kernel(nr_cpus=1100)
    f_nx_pud(k)
    _, result = inspect(k)
    assert result.per_cpu_bad == set(range(1024))


def test_espfix_pages_blamed_only_when_walks_and_waddrs_agree(inspect):
    """Issue 11, seen live: espfix_pages[0] pointed at another page while every CPU's
    espfix_stack mapped, and espfix_waddr pointed into, the real one.  Then espfix_pages
    is named (not only the CPUs' espfix_waddr).  When the walks or the waddrs disagree
    among themselves, espfix_pages is not blamed."""
    k = kernel()
    f_bad_pages(k)
    _, result = inspect(k)
    hit = find(result, "espfix_pages", 0)
    assert len(hit) == 1 and "a CPU of this page brought online next" in hit[0].message
    assert hit[0].as_dict()["cpus"] == "0-63"
    for mutate in (f_bad_waddr, f_walk, f_wrong_pte, f_bad_stack):
        k = kernel()
        mutate(k)
        _, result = inspect(k)
        assert not find(result, "espfix_pages"), (mutate.__name__, errors(result))


def test_cleared_espfix_stack_is_not_called_never_initialised(inspect):
    """init_espfix_ap() sets espfix_stack and espfix_waddr: with espfix_waddr still set,
    the cause is a cleared word, not an init that never ran (seen live, issue 11)."""
    k = kernel()
    f_cleared_stack(k)
    _, result = inspect(k)
    msg = find(result, "cpu_init", 3)[0].message
    assert "init_espfix_ap() ran" in msg and "never ran" not in msg
    k = kernel()
    f_not_initialised(k)
    _, result = inspect(k)
    assert "never ran" in find(result, "cpu_init", 3)[0].message


# -- the check registry, and checks that do not depend on each other's order ----------

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

from inspector.audit import (CHECKS, FINDING_NAMES, SEVERITIES, Context, Severity,  # noqa: E402
                             audit, check, run_check)
from inspector.hostfacts import HostFacts, target_host_facts  # noqa: E402
from inspector.state import load_state  # noqa: E402
from inspector.target import open_target  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.helpers.faults import BY_NAME  # noqa: E402

SAMPLES = sorted(glob.glob(os.path.join(ROOT, "samples", "*.core")))
#: kernel source files a check may cite (paths as in torvalds/linux)
KERNEL_SOURCE = re.compile(r"\b(?:arch/x86|kernel|mm|include)/[\w/.-]+\.[chS]\b|arch/x86/Kconfig")


def test_registry_declares_every_check_once():
    names = [c.name for c in CHECKS]
    assert len(CHECKS) >= 14 and len(set(names)) == len(names)
    assert FINDING_NAMES == tuple(n for c in CHECKS for n in c.names)
    assert len(set(FINDING_NAMES)) == len(FINDING_NAMES)
    for c in CHECKS:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", c.name) and c.fn.__name__ == f"check_{c.name}"
        assert c.summary and "\n" not in c.summary and c.summary.endswith("."), c.name
        assert c.severities and set(c.severities) <= set(Severity), c.name
        assert all(type(s) is Severity for s in c.severities)
        assert KERNEL_SOURCE.search(c.source), (c.name, c.source)
    assert SEVERITIES == (Severity.ERROR, Severity.WARNING, Severity.INFO)


def test_registry_refuses_a_name_declared_twice():
    before = list(CHECKS)
    for name, also in (("walk", ()), ("brand_new", ("pud_prot",)), ("brand_new", ("brand_new",))):
        with pytest.raises(ValueError, match="declared twice"):
            check(name, "A rule.", [Severity.ERROR], "arch/x86/kernel/espfix_64.c",
                  also)(lambda ctx: iter(()))
    assert CHECKS == before


def fault_kernels():
    """(id, SynthKernel, host facts): a clean kernel of three groups, each fault of
    tests/helpers/faults.py alone, a misaligned KASLR offset, corrupt CPU masks, remote-node
    ministacks, and several faults at once in a 3000-CPU kernel (findings of several
    checks, in several groups)."""
    out = [("clean-3000", kernel(nr_cpus=3000, pti=True), {})]
    for name, fault in sorted(BY_NAME.items()):
        k = kernel(nr_cpus=4, pti=name == "missing-pti")
        fault(k)
        out.append((name, k, {}))
    out.append(("misaligned-kaslr", kernel(kaslr_offset=0x2A401000), {}))
    k = kernel(nr_cpus=4)
    k.write_mask("__cpu_possible_mask", [1, 2, 3])
    out.append(("online-not-possible", k, {}))
    k = kernel(nodes=2)
    out.append(("numa", k, k.host_facts()))
    k = kernel(nr_cpus=3000, pti=True, levels=4, nodes=2)
    for name in ("stray-pud", "writable-pte", "bad-stack", "statics", "missing-pmd",
                 "not-initialised", "bad-waddr", "stray-pte", "missing-pti", "walk"):
        BY_NAME[name](k)
    out.append(("many-faults", k, k.host_facts()))
    return out


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """(id, EspfixState) of every shipped sample and every synthetic fault kernel."""
    opened, out = [], []
    for core in SAMPLES:
        target = open_target(core, None)
        opened.append(target)
        out.append((os.path.basename(core), load_state(target, target_host_facts(target))))
    d = tmp_path_factory.mktemp("faults")
    for name, k, host in fault_kernels():
        core, syms = str(d / f"{name}.core"), str(d / f"{name}.syms")
        k.write(core, syms, "kallsyms")
        target = open_target(core, syms)
        opened.append(target)
        out.append((name, load_state(target, HostFacts.from_dict(host))))
    yield out
    for t in opened:
        t.close()


def by_check(state, order):
    """Run the checks in *order* on one Context; their findings, by check."""
    ctx = Context(state)
    return {c.name: [f.as_dict() for f in run_check(c, ctx)] for c in order}, ctx


def test_shuffled_check_order_gives_the_same_findings(states):
    """The randomisation is worked out in Context before any check runs, so no check
    depends on another having run first: any order (reversed, shuffled) gives each
    check the same findings, hence audit() the same report.  With the randomisation
    worked out inside check_randomness, the checks before it saw no randomness and
    espfix_stack, the clones and the strays found nothing."""
    rng = random.Random(10)
    for name, state in states:
        result = audit(state)
        want = [f.as_dict() for f in result.findings]
        orders = [list(reversed(CHECKS))] + [rng.sample(CHECKS, len(CHECKS)) for _ in range(4)]
        for order in orders:
            got, ctx = by_check(state, order)
            assert [f for c in CHECKS for f in got[c.name]] == want, \
                (name, [c.name for c in order])
            assert (ctx.rnd, ctx.rnd_source) == (result.rnd, result.rnd_source)
        # each check alone, on a fresh Context, finds what it finds among the others
        for c in CHECKS:
            alone, _ = by_check(state, [c])
            assert alone[c.name] == got[c.name], (name, c.name)


def test_findings_carry_declared_names_and_severities(states):
    """Every finding on the samples and fault kernels is named and graded as its check
    declared (a crash dump's filtered page gives an info "could not run" from any
    check), and between them they use every declared finding name."""
    seen = set()
    for name, state in states:
        ctx = Context(state)
        for c in CHECKS:
            for f in run_check(c, ctx):
                assert type(f.severity) is Severity, (name, f)
                assert f.check in c.names, (name, c.name, f.check)
                assert f.severity in c.severities or (
                    f.severity is Severity.INFO and "filtered_page" in f.details), (name, f)
                seen.add(f.check)
                json.dumps(f.as_dict())
    assert seen == set(FINDING_NAMES), set(FINDING_NAMES) - seen
