"""The layout model against the kernel's formula, written out independently."""

import pytest

from inspector import model
from inspector.model import (ESPFIX_BASE_ADDR, Randomness, cpu_layout, espfix_base_addr,
                             format_cpu_list, group_layouts, invert_espfix_stack,
                             memory_cost, parse_cpu_list, table_indices)


def kernel_formula(cpu, page_random, slot_random):
    # espfix_base_addr() from arch/x86/kernel/espfix_64.c, transcribed literally
    page = (cpu // 64) ^ page_random
    slot = (cpu + slot_random) % 64
    addr = (page << 12) + slot * 64
    addr = (addr & 0xffff) | ((addr & ~0xffff) << 16)
    return (addr + 0xffffff0000000000) & (2**64 - 1)


def test_constants_match_the_kernel():
    assert ESPFIX_BASE_ADDR == (-2 << 39) & (2**64 - 1)
    assert model.ESPFIX_MAX_CPUS == 131072
    assert (model.PTE_STRIDE, model.ESPFIX_PTE_CLONES, model.ESPFIX_PMD_CLONES,
            model.ESPFIX_PUD_CLONES) == (16, 32, 512, 4)
    assert model.ESPFIX_PTE_CLONES * model.ESPFIX_PMD_CLONES * model.ESPFIX_PUD_CLONES == 65536


@pytest.mark.parametrize("pr,sr", [(0, 0), (2047, 63), (687, 13), (1024, 1)])
def test_formula_and_inverse(pr, sr):
    for cpu in list(range(0, 200)) + [1023, 1024, 65535, 131071]:
        a = espfix_base_addr(cpu, pr, sr)
        assert a == kernel_formula(cpu, pr, sr)
        assert a & 0xFFFF0000 == 0, "RSP[31:16] must be free for the user's bits"
        assert invert_espfix_stack(cpu, a) == (pr, sr)


def test_every_cpu_gets_a_distinct_slot():
    rnd = Randomness(1234, 42)
    addrs = {espfix_base_addr(c, rnd.page_random, rnd.slot_random) for c in range(131072)}
    assert len(addrs) == 131072


def test_from_rand():
    rnd = Randomness.from_rand(0x5EED1234ABCD)
    assert rnd.slot_random == 0x5EED1234ABCD % 64
    assert rnd.page_random == (0x5EED1234ABCD // 64) & 2047


def test_invert_rejects_foreign_values():
    with pytest.raises(ValueError):
        invert_espfix_stack(0, 0xffff888000001000)
    with pytest.raises(ValueError):
        invert_espfix_stack(0, ESPFIX_BASE_ADDR + 0x10000)     # bits 16..31 set
    with pytest.raises(ValueError):
        invert_espfix_stack(0, ESPFIX_BASE_ADDR + 8)            # not slot aligned


def test_indices_4_and_5_level():
    a = espfix_base_addr(0, 687, 13)
    assert table_indices(a, 4) == {"pgd": 510, "pud": 168, "pmd": 0, "pte": 15}
    assert table_indices(a, 5) == {"pgd": 511, "p4d": 510, "pud": 168, "pmd": 0, "pte": 15}


def test_groups_share_pud_slots_pmd_and_pte():
    rnd = Randomness(687, 13)
    for cpu in range(0, 4096, 7):
        lay = cpu_layout(cpu, rnd)
        g = group_layouts([cpu], rnd)[0]
        assert lay.indices["pud"] == g.pud_index          # first of the 4 clones
        assert lay.indices["pte"] == lay.page % 16
    groups = group_layouts(range(4096), rnd)
    assert [len(g.cpus) for g in groups] == [1024] * 4
    assert len({g.pud_index for g in groups}) == 4


def test_memory_cost():
    c = memory_cost(range(131072))
    assert (c.stack_pages, c.pmd_pages, c.pte_pages) == (2048, 128, 128)
    assert c.bytes == (1 + 2048 + 256) * 4096
    assert memory_cost([0, 64, 2000]).stack_pages == 3
    assert memory_cost([0, 64, 2000]).pmd_pages == 2


def test_cpu_lists():
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert parse_cpu_list("") == []
    with pytest.raises(ValueError):
        parse_cpu_list("3-1")
