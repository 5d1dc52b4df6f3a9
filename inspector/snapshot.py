"""``snapshot``: a small self-contained ELF core of just what the inspector reads.

The target is opened through :class:`~inspector.memory.RecordingMemory`; a full
``validate`` + ``stacks`` pass records every range it reads (kernel-image
words, per-CPU words, page-table pages, stack pages).  Those ranges become
``PT_LOAD`` segments at their real virtual addresses, with ``p_paddr`` for the
kernel-image and direct-map ones, exactly as in /proc/kcore.  The core's
VMCOREINFO note is copied, and an ``ESPFIX-INSPECT`` note carries the symbols
used (kallsyms format, already relocated) and the host facts (sysfs), so that
``validate --core SNAPSHOT`` needs nothing else and finds what the live run
found.
"""

from __future__ import annotations

import json
import time

from . import __version__
from .audit import audit
from .elfcore import NO_PADDR
from .elfwrite import LoadSegment, NoteEntry, write_core
from .errors import InspectError
from .hostfacts import target_host_facts
from .memory import RecordingMemory
from .state import EspfixState, load_state
from .target import NT_META, NT_SYMBOLS, SNAPSHOT_NOTE, Target, open_target
from .x86 import direct_map_pa, direct_map_va, is_image_address

__all__ = ["take_snapshot", "snapshot_segments"]

#: Always carried, so that the snapshot's symbols can be matched to its core.
ALWAYS = ("_text", "_stext", "linux_banner")


def snapshot_segments(state: EspfixState, rec: RecordingMemory) -> list[LoadSegment]:
    """Merge the recorded reads into segments, one per contiguous run of
    each linear mapping (kernel image, direct map, other)."""
    info = state.info
    target = state.reader.target
    pob = info.page_offset_base
    ranges: list[tuple[int, int, bytes]] = []       # (vaddr, paddr, data)
    for paddr, data in rec.phys.items():
        ranges.append((direct_map_va(paddr, pob), paddr, data))
    for vaddr, data in rec.virt.items():
        if is_image_address(vaddr):
            paddr = target.pa_symbol(vaddr)
        else:
            dm = direct_map_pa(vaddr, pob, info.levels)
            paddr = NO_PADDR if dm is None else dm
        ranges.append((vaddr, paddr, data))
    ranges.sort(key=lambda r: r[0])
    merged: list[tuple[int, int, bytearray]] = []
    for vaddr, paddr, data in ranges:
        if merged:
            mv, mp, md = merged[-1]
            same_map = (paddr == NO_PADDR) == (mp == NO_PADDR) and \
                (paddr == NO_PADDR or (paddr - mp) == (vaddr - mv))
            if same_map and vaddr <= mv + len(md):
                rel = vaddr - mv
                end = rel + len(data)
                if end > len(md):
                    md.extend(bytes(end - len(md)))
                md[rel:end] = data
                continue
        merged.append((vaddr, paddr, bytearray(data)))
    return [LoadSegment(v, bytes(d), p) for v, p, d in merged]


def _symbol_text(target: Target) -> str:
    syms = target.symbols
    names = set(syms.used) | set(ALWAYS)
    names |= {k[7:-1] for k in target.vmcoreinfo if k.startswith("SYMBOL(")}
    lines = []
    for name in sorted(n for n in names if n in syms.addresses):
        lines.append(f"{syms.addresses[name]:016x} {syms.types.get(name, 'D')} {name}")
    return "\n".join(lines) + "\n"


def take_snapshot(core: str, symbols: str | None, out: str) -> dict:
    """Capture a snapshot of *core* into *out*; returns a summary."""
    target = open_target(core, symbols, wrap=RecordingMemory)
    try:
        rec = target.mem
        assert isinstance(rec, RecordingMemory)
        state = load_state(target, target_host_facts(target))
        result = audit(state)
        for cpu in state.cpus:
            try:
                state.frame(cpu)
            except InspectError:
                pass                # recorded as far as it could be read; validate reports it
        # the banner, so the symbols can be verified offline
        state.reader.read(target.symbols["linux_banner"], 256)
        segments = snapshot_segments(state, rec)
        vmcoreinfo = target.core.note("VMCOREINFO")
        assert vmcoreinfo is not None
        meta = {"tool": f"espfix-inspect {__version__}", "captured": int(time.time()),
                "source_core": core, "source_symbols": target.symbols.source,
                "osrelease": target.osrelease, "host": state.host.as_dict(),
                "findings_at_capture": len([f for f in result.findings
                                            if f.severity != "info"])}
        notes = [NoteEntry("VMCOREINFO", 0, vmcoreinfo.desc),
                 NoteEntry(SNAPSHOT_NOTE, NT_SYMBOLS, _symbol_text(target).encode()),
                 NoteEntry(SNAPSHOT_NOTE, NT_META, json.dumps(meta, sort_keys=True).encode())]
        try:
            size = write_core(out, segments, notes)
        except OSError as e:
            raise InspectError(f"cannot write snapshot {out}: {e.strerror or e}",
                               "pick a writable -o path with free space") from None
        return {"file": out, "bytes": size, "segments": len(segments),
                "osrelease": target.osrelease, "cpus": len(state.cpus)}
    finally:
        target.close()
