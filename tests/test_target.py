"""inspector/target.py on its own: binding a symbol table to a core (the KASLR shift of a
System.map or vmlinux, none for kallsyms, another boot's kallsyms, another build, the
linux_banner proof read by virtual or physical address), live_symbol_names, is_live
and the Target's VMCOREINFO values.  The core and memory are small fakes holding
only what bind_symbols reads (``vmcoreinfo``, ``read_virt``, ``read_paddr``)."""

from __future__ import annotations

import pytest

from inspector.errors import InspectError
from inspector.symbols import SymbolKind, SymbolTable
from inspector.target import (KCORE_PATH, LIVE_SYMBOLS, Target, bind_symbols, is_live,
                              live_symbol_names)
from inspector.vmcoreinfo import VmcoreInfo

OFFSET = 0x1E000000                        # KERNELOFFSET: the image moved by 480 MiB
LINK = {"_text": 0xFFFFFFFF81000000, "init_top_pgt": 0xFFFFFFFF82A0A000,
        "linux_banner": 0xFFFFFFFF82200100, "espfix_stack": 0x1A008}
RUN = {n: a + OFFSET if a >= 0xFFFFFFFF80000000 else a for n, a in LINK.items()}
BANNER = b"Linux version 6.1.0-test (debian-kernel@lists.debian.org) #1 SMP\0"


def vmcoreinfo(**extra: str) -> VmcoreInfo:
    raw = {"OSRELEASE": "6.1.0-test", "KERNELOFFSET": f"{OFFSET:x}",
           "NUMBER(phys_base)": str(-OFFSET),                   # decimal
           "SYMBOL(init_top_pgt)": f"{RUN['init_top_pgt']:x}",
           "SYMBOL(_text)": f"{RUN['_text']:x}",
           "SYMBOL(mem_section)": "ff16e4633f81f000",          # a pointer's value
           **extra}
    return VmcoreInfo(raw, "core")


class FakeCore:
    path = "core"

    def __init__(self, info: VmcoreInfo, phys: dict[int, bytes] | None = None) -> None:
        self.vmcoreinfo = info
        self.phys = phys or {}
        self.paddr_reads: list[int] = []

    def read_paddr(self, paddr: int, size: int) -> bytes | None:
        self.paddr_reads.append(paddr)
        return self.phys.get(paddr)


class FakeMem:
    def __init__(self, virt: dict[int, bytes]) -> None:
        self.virt = virt

    def read_virt(self, addr: int, size: int) -> bytes | None:
        return self.virt.get(addr)


def table(kind: SymbolKind, addrs: dict[str, int], banner: bytes | None = None) -> SymbolTable:
    return SymbolTable(str(kind), kind, dict(addrs), banner=banner)


def mem_with_banner(text: bytes = BANNER) -> FakeMem:
    return FakeMem({RUN["linux_banner"]: text})


@pytest.mark.parametrize("kind", [SymbolKind.SYSTEM_MAP, SymbolKind.VMLINUX])
def test_link_time_tables_move_by_the_kaslr_offset(kind: SymbolKind) -> None:
    bound = bind_symbols(table(kind, LINK), FakeCore(vmcoreinfo()), mem_with_banner())
    assert bound.addresses == RUN and bound.shift == OFFSET
    assert bound["espfix_stack"] == 0x1A008                    # per-CPU offsets stay


def test_a_link_time_table_of_an_unrandomised_boot() -> None:
    info = vmcoreinfo(KERNELOFFSET="0", **{"SYMBOL(init_top_pgt)": f"{LINK['init_top_pgt']:x}",
                                          "SYMBOL(_text)": f"{LINK['_text']:x}"})
    bound = bind_symbols(table(SymbolKind.SYSTEM_MAP, LINK), FakeCore(info),
                         FakeMem({LINK["linux_banner"]: BANNER}))
    assert bound.addresses == LINK and bound.shift == 0


def test_kallsyms_is_taken_as_it_is() -> None:
    syms = table(SymbolKind.KALLSYMS, RUN)
    assert bind_symbols(syms, FakeCore(vmcoreinfo()), mem_with_banner()) is syms
    # kallsyms at link-time addresses is not shifted to fit: it is another boot's
    with pytest.raises(InspectError) as e:
        bind_symbols(table(SymbolKind.KALLSYMS, LINK), FakeCore(vmcoreinfo()),
                     mem_with_banner())
    assert "does not fit this boot" in e.value.cause
    assert f"off by {-OFFSET:+#x}, a KASLR slide" in e.value.cause


def test_another_build_names_the_first_symbol_that_differs() -> None:
    other = dict(RUN, init_top_pgt=RUN["init_top_pgt"] + 0x3000)
    with pytest.raises(InspectError) as e:
        bind_symbols(table(SymbolKind.KALLSYMS, other), FakeCore(vmcoreinfo()),
                     mem_with_banner())
    assert e.value.cause == (f"kallsyms is from another kernel build: init_top_pgt is "
                             f"{other['init_top_pgt']:#x} there but "
                             f"{RUN['init_top_pgt']:#x} in the core")
    assert "6.1.0-test" in e.value.fix


def test_the_banner_decides_when_nothing_else_can() -> None:
    info = VmcoreInfo({"OSRELEASE": "6.1.0-test", "NUMBER(phys_base)": "0"}, "core")
    syms = table(SymbolKind.KALLSYMS, RUN)
    assert bind_symbols(syms, FakeCore(info), mem_with_banner()) is syms
    with pytest.raises(InspectError) as e:
        bind_symbols(syms, FakeCore(info), mem_with_banner(b"Linux version 6.12.0 (x)\0"))
    assert "its linux_banner address shows 'Linux version 6.12.0 (x)'" in e.value.cause
    # the release must be followed by a space: 6.1.0-test is not 6.1.0-test2
    with pytest.raises(InspectError):
        bind_symbols(syms, FakeCore(info), mem_with_banner(b"Linux version 6.1.0-test2 x\0"))
    with pytest.raises(InspectError) as e:
        bind_symbols(syms, FakeCore(info), FakeMem({}))
    assert "'nothing readable'" in e.value.cause


def test_the_banner_is_read_through_its_physical_alias_when_not_mapped() -> None:
    # __pa_symbol(x) = x - __START_KERNEL_map + phys_base
    pa = RUN["linux_banner"] - 0xFFFFFFFF80000000 - OFFSET
    core = FakeCore(vmcoreinfo(), {pa: BANNER})
    bound = bind_symbols(table(SymbolKind.SYSTEM_MAP, LINK), core, FakeMem({}))
    assert bound.addresses == RUN and core.paddr_reads == [pa]


def test_a_vmlinux_banner_must_be_the_running_one() -> None:
    own = BANNER.split(b"\0")[0]
    ok = table(SymbolKind.VMLINUX, LINK, banner=own)
    assert bind_symbols(ok, FakeCore(vmcoreinfo()), mem_with_banner()).banner == own
    rebuilt = table(SymbolKind.VMLINUX, LINK, banner=own.replace(b"#1", b"#2"))
    with pytest.raises(InspectError) as e:
        bind_symbols(rebuilt, FakeCore(vmcoreinfo()), mem_with_banner())
    assert "another build of 6.1.0-test" in e.value.cause


def test_live_symbol_names() -> None:
    names = live_symbol_names(vmcoreinfo(**{"SYMBOL(swapper_pg_dir)": "ffffffff82a0a000"}))
    assert names[:len(LIVE_SYMBOLS)] == list(LIVE_SYMBOLS)
    assert names[len(LIVE_SYMBOLS):] == ["mem_section", "swapper_pg_dir"]   # no repeats
    assert len(names) == len(set(names))


def test_is_live() -> None:
    assert is_live(KCORE_PATH) and not is_live("/tmp/vmcore") and not is_live("/proc/kcore2")


def test_target_values_from_vmcoreinfo() -> None:
    t = Target(FakeCore(vmcoreinfo()), FakeMem({}), table(SymbolKind.KALLSYMS, RUN),  # type: ignore[arg-type]
               vmcoreinfo(), live=False)
    assert (t.osrelease, t.kaslr_offset, t.phys_base, t.sme_mask) == (
        "6.1.0-test", OFFSET, -OFFSET, 0)
    assert t.pa_symbol(0xFFFFFFFF80000000 + OFFSET + 0x1000) == 0x1000
    bare = Target(FakeCore(VmcoreInfo({}, "core")), FakeMem({}),  # type: ignore[arg-type]
                  table(SymbolKind.KALLSYMS, RUN), VmcoreInfo({}, "core"), live=False)
    assert (bare.osrelease, bare.kaslr_offset, bare.sme_mask) == ("unknown", 0, 0)
    with pytest.raises(InspectError) as e:
        _ = bare.phys_base
    assert "lacks NUMBER(phys_base)" in e.value.cause
