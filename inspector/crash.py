"""The crash context: every CPU's registers at crash time, against espfix.

Where the registers come from, best first:

1. ``crash_notes`` in the dump's memory: ``crash_save_cpu()``
   (kernel/crash_core.c) writes each CPU's NT_PRSTATUS note into its per-CPU
   ``note_buf_t`` when kdump runs (the panicking CPU from ``crash_setup_regs()``,
   the others from the NMI that stops them).  Indexed by CPU number, so exact.
2. the dump's own NT_PRSTATUS notes (libkdumpfile: ELF notes, or the
   kdump-compressed header's note section), in note order.  A hypervisor dump
   (QEMU's dump-guest-memory) has one per vCPU, in vCPU order, and no
   ``crash_notes``: the kernel did not crash.  A CPU in kernel mode confirms the
   pairing: its GS base is ``__per_cpu_offset[cpu]`` (``cpu_kernelmode_gs_base()``,
   arch/x86/include/asm/processor.h).

For each CPU the report answers the two espfix questions:

- was RSP in the espfix area (the 512 GiB slot of ``ESPFIX_BASE_ADDR``, pgd[510]
  or p4d[510]), and on which CPU's ministack alias?  The entry code runs on the
  alias ``espfix_stack | (user RSP & 0xffff0000)`` (``native_irq_return_ldt``,
  arch/x86/entry/entry_64.S): any value of bits 16..31 maps the same 64 bytes;
- was RIP in the espfix return path: ``native_irq_return_ldt`` (the copy to the
  ministack and the stack switch, up to the next symbol), the IRET itself at
  ``native_irq_return_iret``, or the double-fault fixup espfix64 relies on:
  ``exc_double_fault()`` (arch/x86/kernel/traps.c) turns a #DF whose RIP is
  ``native_irq_return_iret`` with RSP in the espfix area into a #GP at
  ``asm_exc_general_protection``; the entry stub is ``asm_exc_double_fault``.
  (Before 5.8 these were ``do_double_fault``/``double_fault``/``general_protection``.)
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

from .errors import InspectError
from .kdump import CpuRegisters, parse_prstatus
from .model import ESPFIX_BASE_ADDR, ESPFIX_STACK_SIZE
from .state import EspfixState
from .x86 import MASK64, P4D_SIZE

__all__ = ["CpuCrash", "CrashContext", "crash_context", "ESPFIX_AREA_SIZE"]

#: The espfix area: one top-level slot, 512 GiB from ESPFIX_BASE_ADDR (P4D_SHIFT 39).
ESPFIX_AREA_SIZE = P4D_SIZE
#: Bits 16..31 of a ministack address select one of the 65,536 aliases.
ALIAS_BITS = 0xFFFF0000
NT_PRSTATUS = 1

#: (role, symbol names newest first, how far the region reaches)
RIP_REGIONS = (
    ("espfix IRET", ("native_irq_return_iret",), "insn"),
    ("espfix return path", ("native_irq_return_ldt",), "next"),
    ("double-fault entry", ("asm_exc_double_fault", "double_fault"), "next"),
    ("double-fault handler (espfix64 fixup)", ("exc_double_fault", "do_double_fault"), "next"),
    ("#GP entry (espfix64 #DF fixup target)", ("asm_exc_general_protection",
                                                "general_protection"), "next"),
)
IRETQ_LEN = 2                          # 48 cf


@dataclass
class CpuCrash:
    cpu: int
    source: str                        # "crash_notes", "dump note N (vCPU order)"
    regs: dict[str, int]
    pid: int | None = None
    rip_symbol: str | None = None      # "sym+0x12"
    rip_role: str | None = None        # one of RIP_REGIONS' roles
    rsp_area: bool = False             # RSP in the espfix area
    rsp_ministack_cpu: int | None = None   # whose ministack alias RSP is on
    confirmed: bool | None = None      # GS base == __per_cpu_offset[cpu]

    @property
    def user_mode(self) -> bool:
        return bool(self.regs.get("cs", 0) & 3)

    def verdict(self) -> str:
        if self.rip_role or self.rsp_area:
            parts = []
            if self.rip_role:
                parts.append(f"RIP in {self.rip_role}")
            if self.rsp_ministack_cpu is not None:
                own = "its own" if self.rsp_ministack_cpu == self.cpu else \
                    f"CPU {self.rsp_ministack_cpu}'s"
                parts.append(f"RSP on {own} ministack alias")
            elif self.rsp_area:
                parts.append("RSP in the espfix area, on no CPU's ministack")
            return "; ".join(parts)
        return "not in espfix"

    def as_dict(self) -> dict:
        r = self.regs
        return {"cpu": self.cpu, "source": self.source, "pid": self.pid,
                "mode": "user" if self.user_mode else "kernel",
                "rip": _h(r.get("rip")), "rip_symbol": self.rip_symbol,
                "rsp": _h(r.get("rsp")), "cs": _h(r.get("cs")), "ss": _h(r.get("ss")),
                "rflags": _h(r.get("rflags")), "gs_base": _h(r.get("gs_base")),
                "rip_espfix": self.rip_role, "rsp_espfix_area": self.rsp_area,
                "rsp_ministack_cpu": self.rsp_ministack_cpu,
                "percpu_confirmed": self.confirmed, "verdict": self.verdict()}


@dataclass
class CrashContext:
    cpus: dict[int, CpuCrash] = field(default_factory=dict)
    source: str = ""                   # where the registers came from, for the header
    panic_cpu: int | None = None
    crashtime: int | None = None
    unmatched: list[CpuRegisters] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"source": self.source, "panic_cpu": self.panic_cpu,
                "crashtime": self.crashtime, "notes": self.notes,
                "cpus": [c.as_dict() for _, c in sorted(self.cpus.items())]}


def _h(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


class _Symbolizer:
    def __init__(self, state: EspfixState) -> None:
        syms = state.reader.target.symbols
        types = syms.types
        pairs = sorted((a, n) for n, a in syms.addresses.items()
                       if types.get(n, "t") in "TtWw" and a)
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]
        self.syms = syms

    def __call__(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or addr - self.addrs[i] > 1 << 20:
            return None
        off = addr - self.addrs[i]
        return f"{self.names[i]}+{off:#x}" if off else self.names[i]

    def region(self, names: tuple[str, ...], reach: str) -> tuple[int, int] | None:
        for n in names:
            a = self.syms.addresses.get(n)
            if a is None:
                continue
            if reach == "insn":
                return a, a + IRETQ_LEN
            j = bisect.bisect_right(self.addrs, a)
            end = self.addrs[j] if j < len(self.addrs) else a + 1
            return a, max(end, a + 1)
        return None


def _crash_notes(state: EspfixState) -> dict[int, CpuRegisters]:
    """Per-CPU ``crash_notes`` buffers that hold an NT_PRSTATUS (crash time)."""
    syms = state.reader.target.symbols
    sym = syms.get("crash_notes")
    off_sym = syms.get("__per_cpu_offset")
    if sym is None or off_sym is None:
        return {}
    reader = state.reader
    try:
        ptr = reader.u64(sym)
        if not ptr:
            return {}
        offsets = reader.u64s(off_sym, state.info.nr_cpu_ids)
    except InspectError:
        return {}
    out: dict[int, CpuRegisters] = {}
    for cpu in state.possible:
        try:
            raw = reader.read((ptr + offsets[cpu]) & MASK64, 12 + 8 + 336)
        except InspectError:
            continue
        namesz, descsz, ntype = struct.unpack_from("<III", raw)
        if ntype != NT_PRSTATUS or namesz != 5 or raw[12:16] != b"CORE" or descsz < 328:
            continue
        regs = parse_prstatus(raw[20:20 + descsz], cpu)
        if regs is not None and any(regs.regs.values()):
            out[cpu] = regs
    return out


def _pair_notes(state: EspfixState, notes: list[CpuRegisters],
                ctx: CrashContext) -> dict[int, tuple[CpuRegisters, str, bool | None]]:
    """Dump notes -> CPUs: in order over the online CPUs, then confirmed by GS base."""
    syms = state.reader.target.symbols
    off_sym = syms.get("__per_cpu_offset")
    offsets: tuple[int, ...] = ()
    if off_sym is not None:
        try:
            offsets = state.reader.u64s(off_sym, state.info.nr_cpu_ids)
        except InspectError:
            offsets = ()
    by_gs = {o: c for c, o in enumerate(offsets)}
    cpus = state.online or state.possible
    out: dict[int, tuple[CpuRegisters, str, bool | None]] = {}
    confirmed: bool | None
    for i, regs in enumerate(notes):
        gs = regs.get("gs_base")
        kernel = not (regs.get("cs") or 0) & 3
        if kernel and gs in by_gs:
            cpu, confirmed = by_gs[gs], True
        elif i < len(cpus):
            cpu = cpus[i]
            confirmed = (gs == offsets[cpu]) if kernel and offsets else None
            if confirmed is False:
                ctx.notes.append(f"dump note {i}: GS base {gs:#x} is no CPU's per-CPU base; "
                                 f"paired with CPU {cpu} by order")
                confirmed = None
        else:
            ctx.unmatched.append(regs)
            continue
        if cpu in out:
            ctx.unmatched.append(regs)
            continue
        out[cpu] = (regs, f"dump note {i}", confirmed)
    return out


def crash_context(state: EspfixState, registers: list[CpuRegisters]) -> CrashContext:
    """Pair the dump's registers with CPUs and place RSP and RIP against espfix."""
    ctx = CrashContext()
    info = state.reader.target.vmcoreinfo
    if "CRASHTIME" in info:
        try:
            ctx.crashtime = int(info["CRASHTIME"])
        except ValueError:
            pass
    panic = state.reader.target.symbols.get("panic_cpu")
    if panic is not None:
        try:
            v = struct.unpack("<i", state.reader.read(panic, 4))[0]
            ctx.panic_cpu = v if v >= 0 else None
        except InspectError:
            pass
    saved = _crash_notes(state)
    paired: dict[int, tuple[CpuRegisters, str, bool | None]]
    if saved:
        ctx.source = ("crash_notes: the NT_PRSTATUS each CPU saved when the kernel "
                      "crashed (per-CPU, exact)")
        paired = {c: (r, "crash_notes", None) for c, r in saved.items()}
    elif registers:
        ctx.source = ("the dump's NT_PRSTATUS notes, one per vCPU in order (no crash_notes "
                      "saved: a hypervisor dump of a running kernel)")
        paired = _pair_notes(state, registers, ctx)
    else:
        ctx.source = "none: the dump carries no CPU registers"
        paired = {}
    sym = _Symbolizer(state)
    regions = [(role, sym.region(names, reach)) for role, names, reach in RIP_REGIONS]
    stacks = {c: s.espfix_stack for c, s in state.cpus.items() if s.initialised}
    for cpu, (regs, source, confirmed) in sorted(paired.items()):
        r = regs.regs
        rip, rsp = r.get("rip", 0), r.get("rsp", 0)
        cc = CpuCrash(cpu, source, dict(r), regs.pid, confirmed=confirmed)
        if not cc.user_mode:
            cc.rip_symbol = sym(rip)
            for role, reg in regions:
                if reg is not None and reg[0] <= rip < reg[1]:
                    cc.rip_role = role
                    break
        if ESPFIX_BASE_ADDR <= rsp < ESPFIX_BASE_ADDR + ESPFIX_AREA_SIZE:
            cc.rsp_area = True
            base = rsp & ~ALIAS_BITS & MASK64
            for owner, stack in stacks.items():
                if stack <= base <= stack + ESPFIX_STACK_SIZE:
                    cc.rsp_ministack_cpu = owner
                    break
        ctx.cpus[cpu] = cc
    return ctx


def dump_crash_context(state: EspfixState) -> CrashContext | None:
    """The crash context of a dump target, None for /proc/kcore and snapshots."""
    dump = getattr(state.reader.target, "dump", None)
    if dump is None:
        return None
    return crash_context(state, dump.registers())
