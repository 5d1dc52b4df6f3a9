"""Corruptions of a synthetic kernel, one per function: each mutates a SynthKernel the way
a broken espfix setup would look.  Used by tests/test_audit.py and `python3 -m tests.helpers.mkcore`.
"""

from __future__ import annotations

from tests.helpers.synthcore import NX, RW, USER, SynthKernel


def pte_entry_pa(k: SynthKernel, cpu: int, clone: int = 0) -> int:
    lay_page = (k.get_percpu(cpu, "espfix_stack") >> 12) & 511
    pte_page = k.pte_pa[k.group_pud_index(cpu) & ~3]
    return pte_page + 8 * ((lay_page % 16) + 16 * clone)


def f_writable_pte(k: SynthKernel) -> None:
    pa = pte_entry_pa(k, 0, 5)
    k.write_u64(pa, k.read_u64(pa) | RW)


def f_user_pte(k: SynthKernel) -> None:
    for clone in range(32):
        pa = pte_entry_pa(k, 0, clone)
        k.write_u64(pa, k.read_u64(pa) | USER)


def f_missing_pte(k: SynthKernel) -> None:
    k.write_u64(pte_entry_pa(k, 0, 31), 0)


def f_wrong_pte(k: SynthKernel) -> None:
    pa = pte_entry_pa(k, 0, 7)
    k.write_u64(pa, (k.read_u64(pa) & ~0xFFFFFFFFFF000) | 0x7770000)


def f_nx_pte(k: SynthKernel) -> None:
    for clone in range(32):
        pa = pte_entry_pa(k, 0, clone)
        k.write_u64(pa, k.read_u64(pa) & ~NX)


def f_missing_pmd(k: SynthKernel) -> None:
    k.write_u64(k.pmd_pa[k.group_pud_index(0)] + 8 * 300, 0)


def f_wrong_pmd(k: SynthKernel) -> None:
    pa = k.pmd_pa[k.group_pud_index(0)] + 8 * 17
    k.write_u64(pa, k.read_u64(pa) + 0x1000)


def f_writable_pmd(k: SynthKernel) -> None:
    base = k.pmd_pa[k.group_pud_index(0)]
    for i in range(512):
        k.write_u64(base + 8 * i, k.read_u64(base + 8 * i) | RW)


def f_missing_pud(k: SynthKernel) -> None:
    k.write_u64(k.pud_pa + 8 * (k.group_pud_index(0) + 2), 0)


def f_nx_pud(k: SynthKernel) -> None:
    for i in range(4):
        pa = k.pud_pa + 8 * (k.group_pud_index(0) + i)
        k.write_u64(pa, k.read_u64(pa) & ~NX)


def f_stray_pud(k: SynthKernel) -> None:
    k.write_u64(k.pud_pa + 8 * ((k.group_pud_index(0) + 8) % 512), k.pmd_pa[k.group_pud_index(0)] | 0x61)


def f_stray_pte(k: SynthKernel) -> None:
    page = (k.get_percpu(0, "espfix_stack") >> 12) & 511
    free = (page + 1) % 16
    pte_page = k.pte_pa[k.group_pud_index(0) & ~3]
    k.write_u64(pte_page + 8 * free, k.read_u64(pte_entry_pa(k, 0)))


def f_bad_stack(k: SynthKernel) -> None:
    k.set_percpu(1, "espfix_stack", k.get_percpu(1, "espfix_stack") + 64)


def f_bad_waddr(k: SynthKernel) -> None:
    k.set_percpu(2, "espfix_waddr", k.get_percpu(2, "espfix_waddr") + 0x1000)


def f_null_pages(k: SynthKernel) -> None:
    k.put_u64(k.syms["espfix_pages"], 0)


def f_bad_pages(k: SynthKernel) -> None:
    k.put_u64(k.syms["espfix_pages"], k.get_u64(k.syms["espfix_pages"]) + 0x2000)


def f_not_initialised(k: SynthKernel) -> None:
    k.set_percpu(3, "espfix_stack", 0)
    k.set_percpu(3, "espfix_waddr", 0)


def f_cleared_stack(k: SynthKernel) -> None:
    # espfix_stack zeroed after init_espfix_ap(): espfix_waddr still set (seen live, issue 11)
    k.set_percpu(3, "espfix_stack", 0)


def f_missing_pti(k: SynthKernel) -> None:
    k.write_u64(k.espfix_top_entry_pa(user=True), 0)


def f_top_entry(k: SynthKernel) -> None:
    pa = k.espfix_top_entry_pa()
    k.write_u64(pa, k.read_u64(pa) + 0x1000)


def f_statics(k: SynthKernel) -> None:
    k.put_u32(k.syms["page_random"], (k.rnd.page_random + 1) % 2048)


def f_walk(k: SynthKernel) -> None:
    # all 32 clones agree but point at a page that is not espfix_pages[0]
    for clone in range(32):
        pa = pte_entry_pa(k, 0, clone)
        k.write_u64(pa, (k.read_u64(pa) & ~0xFFFFFFFFFF000) | 0x7770000)



# command-line names for `python3 -m tests.helpers.mkcore --fault NAME`
BY_NAME = {name[2:].replace("_", "-"): fn for name, fn in list(globals().items())
           if name.startswith("f_") and callable(fn)}
