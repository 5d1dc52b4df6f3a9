"""Rendering: readable tables (tabulate) and JSON documents.

Addresses are hex strings in JSON (64-bit values do not survive JSON numbers
in most consumers).  Every document starts with its ``schema`` (inspector/schema.py);
its shape is inspector/schemas/<document>.schema.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from . import jsonfmt
from .errors import InspectError, PageFiltered
from .journal import prefix
from .jsonfmt import Columns
from .model import (ESPFIX_STACKS_PER_PAGE, FRAME_WORDS, CpuLayout, GroupLayout, MemoryCost,
                    Randomness, format_cpu_list, group_layouts, layout_columns, memory_cost,
                    page_and_slot)
from .schema import schema_id
from .state import EspfixState, FrameUnreadable

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:         # types only: a --json run imports neither the audit nor ctypes
    from typing import IO

    from .audit import AuditResult, Finding
    from .crash import CrashContext
    from .exercise import RoundTrip

__all__ = ["layout_text", "layout_json", "validate_text", "validate_json",
           "stacks_text", "stacks_json", "exercise_text", "exercise_json", "snapshot_json", "dumps",
           "write_layout_json", "write_validate_json", "write_stacks_json"]

CPU_TABLE_LIMIT = 64

#: Text tables fit this many columns: a wider table is cut into panels (see :func:`table`).
WIDTH = 120
#: The one notation of a missing value in text tables (JSON keeps its nulls).
MISSING = "-"
#: The widest CPU list a table cell shows before it is abbreviated.
CPU_CELL = 24


def tabulate(*args, **kwargs) -> str:
    """``tabulate.tabulate``, imported when a table is first drawn (not for ``--json``)."""
    from tabulate import tabulate as draw
    return draw(*args, **kwargs)


def _cell(v: object) -> str:
    return MISSING if v is None or v == "" else str(v)


def _col_widths(rows: list[list[str]], headers: list[str]) -> list[int]:
    """The widths tabulate's "simple" format gives the columns (header + 2 at least)."""
    widths = [len(h) + 2 for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            if len(c) > widths[i]:
                widths[i] = len(c)
    return widths


def table(rows: Sequence[Sequence[object]], headers: list[str], keep: int = 1,
          width: int = WIDTH, sections: tuple[int, ...] = (), numparse: bool = False) -> str:
    """A "simple" table whose missing cells read :data:`MISSING`.  A table wider than
    *width* is cut into panels of whole columns, one after the other, each repeating
    the first *keep* (key) columns, as a wide data frame prints.  *sections*: the
    columns where a panel had better start (the columns between two stay together
    while they fit).  *numparse*: numbers right-aligned (tabulate's default)."""
    cells = [[_cell(c) for c in r] for r in rows]
    widths = _col_widths(cells, headers)
    starts = sorted({keep, *sections, len(headers)})
    units = [list(range(a, b)) for a, b in zip(starts, starts[1:]) if a < b]
    key = sum(widths[:keep]) + 2 * keep
    panels: list[list[int]] = []
    cols: list[int] = list(range(keep))
    used = key
    for unit in units:
        need = sum(widths[i] + 2 for i in unit)
        if len(cols) > keep and used + need > width:        # the section opens a panel
            panels.append(cols)
            cols, used = list(range(keep)), key
        for i in unit:                                      # a section too wide is cut
            if len(cols) > keep and used + widths[i] > width:
                panels.append(cols)
                cols, used = list(range(keep)), key
            cols.append(i)
            used += widths[i] + 2
    panels.append(cols)
    return "\n\n".join(
        tabulate([[r[i] for i in p] for r in cells], headers=[headers[i] for i in p],
                 tablefmt="simple", disable_numparse=not numparse) for p in panels)


def simple_table(rows: Iterable[list[str]], headers: list[str],
                 progress: Callable[[int], object] | None = None) -> str:
    """``tabulate(rows, headers, tablefmt="simple", disable_numparse=True)`` for cells
    that are already plain one-line strings, drawn here: 131,072 layout rows take
    tabulate 7 s and this 1 s, with *progress* called every 4096 rows
    (tests/test_textout.py checks it against tabulate)."""
    rows = list(rows)
    widths = _col_widths(rows, headers)
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
           line("-" * w for w in widths)]
    for n, r in enumerate(rows):
        if progress is not None and not n & 4095:
            progress(n)
        out.append(line(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def abbrev_cpus(cpus: Iterable[int], width: int = CPU_CELL) -> str:
    """The CPU list ("0-3,8"), cut at a comma to fit *width*: ``0,2,4,... (512 CPUs)``."""
    cpus = list(cpus)
    text = format_cpu_list(cpus)
    if len(text) <= width:
        return text
    tail = f",... ({len(cpus)} CPUs)"
    parts = text.split(",")
    kept = [parts[0]]
    for part in parts[1:]:
        if len(",".join(kept)) + 1 + len(part) + len(tail) > width:
            break
        kept.append(part)
    return ",".join(kept) + tail


def dumps(doc: dict) -> str:
    import json
    return json.dumps(doc, indent=2, sort_keys=False)


def _h(v: int | None) -> str:
    return "" if v is None else f"{v:#x}"


# -- layout -----------------------------------------------------------------

def layout_text(cpus: list[CpuLayout], groups: list[GroupLayout], cost: MemoryCost,
                rnd: Randomness, levels: int, show_cpus: bool = True,
                progress: Callable[[int], object] | None = None) -> str:
    """The layout; *progress* is called with the rows drawn so far (inspector.progress)."""
    out = [f"espfix layout: {cost.cpus} CPU(s), page_random={rnd.page_random} "
           f"slot_random={rnd.slot_random}, {levels}-level paging"]
    if show_cpus:
        idx_cols = ["pgd", "p4d", "pud", "pmd", "pte"] if levels == 5 else ["pgd", "pud", "pmd", "pte"]
        rows = ([str(c.cpu), f"{c.espfix_stack:#018x}", str(c.page), str(c.slot),
                 *[str(c.indices[k]) for k in idx_cols]] for c in cpus)
        out.append("")
        out.append(simple_table(rows, ["CPU", "ESPFIX_STACK", "PAGE", "SLOT",
                                       *[k.upper() for k in idx_cols]], progress))
    out.append("")
    grows = []
    for g in groups:
        pages = ", ".join(f"{i}->{p}" for i, p in g.stack_pages[:4])
        if len(g.stack_pages) > 4:
            pages += f", ... ({len(g.stack_pages)})"
        grows.append([g.group, abbrev_cpus(g.cpus),
                      f"{g.pud_slots.start}-{g.pud_slots.stop - 1}", pages])
    out.append(table(grows, ["GROUP", "CPUS", "PUD SLOTS", "STACK PAGES (n/64->page)"]))
    out.append("")
    out.append("each group: 1 PMD page (512 clones) and 1 PTE page (32 clones per stack page "
               "at pte index page%16)")
    out.append(f"memory: {cost.stack_pages} stack page(s) + {cost.pmd_pages} PMD + "
               f"{cost.pte_pages} PTE + 1 PUD (static) = {cost.pages} pages, "
               f"{cost.bytes} bytes ({cost.bytes / 1024:.0f} KiB)")
    return "\n".join(out)


def layout_json(cpus: list[CpuLayout], groups: list[GroupLayout], cost: MemoryCost,
                rnd: Randomness, levels: int) -> dict:
    return {"schema": schema_id("layout"), "page_random": rnd.page_random,
            "slot_random": rnd.slot_random, "levels": levels,
            "cpus": [c.as_dict() for c in cpus], "groups": [g.as_dict() for g in groups],
            "memory": cost.as_dict()}


def write_layout_json(fp: IO[str], cpus: list[int], rnd: Randomness, levels: int) -> None:
    """``print(dumps(layout_json(...)), file=fp)`` for *cpus*, from the per-field lists of
    :func:`~inspector.model.layout_columns` instead of one CpuLayout per CPU."""
    cols = layout_columns(cpus, rnd, levels)
    groups = [g.as_dict() for g in group_layouts(cpus, rnd)]
    for g in groups:
        pages = g["stack_pages"]
        keys = tuple(pages[0]) if pages else ()
        g["stack_pages"] = Columns(keys, [[p[k] for p in pages] for k in keys])
    jsonfmt.write(fp, {"schema": schema_id("layout"), "page_random": rnd.page_random,
                       "slot_random": rnd.slot_random, "levels": levels,
                       "cpus": Columns(tuple(cols), list(cols.values()), hex=("espfix_stack",)),
                       "groups": groups, "memory": memory_cost(cpus).as_dict()})


# -- validate ---------------------------------------------------------------

CPU_KEYS = ("cpu", "online", "initialised", "espfix_stack", "espfix_waddr", "phys", "node",
            "stack_node", "ok")


def _cpu_columns(state: EspfixState, result: AuditResult) -> Columns:
    """The ``cpus`` rows of ``validate --json``, built column by column."""
    cpus = list(state.cpus)
    sts = list(state.cpus.values())
    host = state.host
    stacks = [st.espfix_stack for st in sts]
    waddrs = [st.espfix_waddr if st.espfix_stack else None for st in sts]
    dm_pa = state.direct_map_pa
    pas = [None if w is None else dm_pa(w) for w in waddrs]
    node_of = host.node_of_phys
    bad = result.per_cpu_bad
    return Columns(CPU_KEYS, [
        cpus, [st.online for st in sts], [s != 0 for s in stacks],
        [s or None for s in stacks], waddrs, pas,
        list(map(host.cpu_node.get, cpus)) if host.cpu_node else [None] * len(cpus),
        [node_of(pa) if pa is not None else None for pa in pas] if host.block_size
        else [None] * len(cpus),
        [cpu not in bad for cpu in cpus]], hex=("espfix_stack", "espfix_waddr", "phys"))


def _cpu_rows(state: EspfixState, result: AuditResult) -> list[dict]:
    return _cpu_columns(state, result).rows()


def _summary(result: AuditResult) -> dict[str, int]:
    counts = {"error": 0, "warning": 0, "info": 0}
    for f in result.findings:
        counts[f.severity] += 1
    return counts


def validate_json(state: EspfixState, result: AuditResult) -> dict:
    return _validate_doc(state, result, _cpu_rows(state, result))


def write_validate_json(fp: IO[str], state: EspfixState, result: AuditResult) -> None:
    """``print(dumps(validate_json(state, result)), file=fp)``, written row block by
    row block (131,072 CPUs: docs/performance.md)."""
    jsonfmt.write(fp, _validate_doc(state, result, _cpu_columns(state, result)))


def _validate_doc(state: EspfixState, result: AuditResult, cpus: list | Columns) -> dict:
    kernel = state.info.as_dict()
    kernel["randomness_source"] = result.rnd_source
    if result.rnd is not None:
        kernel["page_random_effective"] = result.rnd.page_random
        kernel["slot_random_effective"] = result.rnd.slot_random
    kernel["cpus_possible"] = format_cpu_list(state.possible)
    kernel["cpus_online"] = format_cpu_list(state.online)
    kernel["cpus_initialised"] = format_cpu_list(c for c, s in state.cpus.items() if s.initialised)
    notes = _dump_notes(state)
    if notes:
        kernel["notes"] = notes
    return {"schema": schema_id("validate"), "ok": result.ok, "summary": _summary(result),
            "kernel": kernel,
            "findings": [f.as_dict() for f in result.findings],
            "cpus": cpus}


def _kernel_lines(state: EspfixState) -> list[str]:
    i = state.info
    return [f"kernel {i.osrelease}: {i.levels}-level paging, PTI {'on' if i.pti else 'off'}, "
            f"KASLR offset {i.kaslr_offset:#x}, per-CPU {i.percpu}",
            f"source: {i.core} with symbols from {i.symbols}",
            *[f"note: {n}" for n in _dump_notes(state)]]


def validate_text(state: EspfixState, result: AuditResult, verbose: bool = False,
                  journal: bool = False) -> str:
    """The readable report.  ``journal``: stdout is the systemd journal, so each
    error/warning finding row and the verdict line carry a ``<3>``/``<4>``
    priority prefix (inspector.journal)."""
    out = _kernel_lines(state)
    if result.rnd is not None:
        src = "the page_random/slot_random statics" if result.rnd_source == "statics" \
            else "inferred from the CPUs' espfix_stack"
        out.append(f"randomness: page_random={result.rnd.page_random} "
                   f"slot_random={result.rnd.slot_random} ({src})")
    init = [c for c, s in state.cpus.items() if s.initialised]
    out.append(f"CPUs: {len(state.possible)} possible ({format_cpu_list(state.possible)}), "
               f"{len(state.online)} online ({format_cpu_list(state.online)}), "
               f"{len(init)} with a ministack")
    rows = _cpu_rows(state, result)
    if verbose or len(rows) <= CPU_TABLE_LIMIT:
        cpu_table = [[r["cpu"], ("online" if r["online"] else "offline") +
                      ("" if r["initialised"] else ", no espfix"),
                      r["espfix_stack"], r["phys"], r["node"], r["stack_node"],
                      "ok" if r["ok"] else "BAD"] for r in rows]
        out.append("")
        out.append(table(cpu_table, ["CPU", "STATE", "ESPFIX_STACK", "STACK PHYS", "NODE",
                                     "PG NODE", "VERDICT"]))
    else:
        bad = [r["cpu"] for r in rows if not r["ok"]]
        out.append(f"bad CPUs: {len(bad)} of {len(rows)}"
                   + (f" ({abbrev_cpus(bad, WIDTH - 40)})" if bad else ""))
        out.append(f"(per-CPU table of {len(rows)} CPUs omitted: use -v or --json)")
    out.append("")
    worst = None
    if result.findings:
        ordered = _ordered(result.findings)
        worst = ordered[0].severity
        out.extend(_findings_table(ordered, set(state.cpus), journal))
        out.append("")
    c = _summary(result)
    verdict = "OK" if result.ok else "FINDINGS"
    out.append(f"{prefix(worst, journal)}result: {verdict} ({c['error']} error(s), "
               f"{c['warning']} warning(s), {c['info']} info)")
    return "\n".join(out)


def finding_cpus(f: Finding, possible: set[int]) -> str:
    """The CPUs a finding affects, as a CPU list: those of its group or stack page
    (``affects``) that are possible, else its one CPU, else the CPU list it names
    (``cpus``: CPUs outside the possible mask, or those using a remote ministack);
    :data:`MISSING` for a finding about no CPU in particular."""
    if f.affects is not None:
        cpus = [c for c in f.affects if c in possible]
        if cpus:
            return abbrev_cpus(cpus)
    if f.cpu is not None:
        return str(f.cpu)
    named = f.details.get("cpus")
    if isinstance(named, str) and named:
        return named if len(named) <= CPU_CELL else named[:CPU_CELL - 3] + "..."
    return MISSING


def _findings_table(ordered: list[Finding], possible: set[int], journal: bool) -> list[str]:
    """The findings, one row each, the message wrapped so that the table fits
    :data:`WIDTH`; with *journal* each line carries its finding's priority prefix."""
    import textwrap
    heads = ["SEVERITY", "CHECK", "CPUS"]
    cells = [[f.severity, f.check, finding_cpus(f, possible)] for f in ordered]
    widths = _col_widths(cells, heads)
    room = max(40, WIDTH - sum(widths) - 2 * len(widths))
    rows: list[list[str]] = []
    owner: list[Finding] = []
    for f, c in zip(ordered, cells):
        lines = textwrap.wrap(f.message, room, break_long_words=True,
                              break_on_hyphens=False) or [""]
        rows.append([*c, lines[0]])
        rows.extend(["", "", "", more] for more in lines[1:])
        owner.extend([f] * len(lines))
    text = tabulate(rows, headers=[*heads, "MESSAGE"], tablefmt="simple",
                    disable_numparse=True).split("\n")
    if journal and len(text) == len(rows) + 2:          # header, rule, one line per row
        text[2:] = [prefix(f.severity, True) + line for f, line in zip(owner, text[2:])]
    return text


def _ordered(findings: Iterable[Finding]) -> list[Finding]:
    rank = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: (rank[f.severity], f.check,
                                           -1 if f.cpu is None else f.cpu))


# -- stacks -----------------------------------------------------------------

STACK_KEYS = ("cpu", "online", "espfix_stack", "espfix_waddr", "phys", "page", "slot", "frame",
              "frame_error")


def _stack_columns(state: EspfixState, cpus: Iterable[int]) -> tuple[Columns, dict[int, str]]:
    """The ``cpus`` rows of ``stacks --json``, built column by column, and the rows
    whose ministack page a crash dump filtered out (their ``frame_state``)."""
    cpus = list(cpus)
    sts = [state.cpus[c] for c in cpus]
    n = len(cpus)
    stacks = [st.espfix_stack if st.initialised else None for st in sts]
    phys: list[str | None] = [None] * n
    pages: list[int | None] = [None] * n
    slots: list[int | None] = [None] * n
    frames: list[dict | None] = [None] * n
    errors: list[str | None] = [None] * n
    filtered: dict[int, str] = {}
    for i, (cpu, stack) in enumerate(zip(cpus, stacks)):
        if stack is None:
            continue
        pages[i], slots[i] = page_and_slot(stack)
        try:
            w = state.walk(stack)                   # memoised per page
        except InspectError as e:                   # a table page the core lacks
            errors[i] = e.cause
            continue
        phys[i] = _h(None if w.phys is None else w.phys | (stack & 0xFFF))
        try:
            frame = state.frame(cpu)
        except PageFiltered:
            # an in-use ministack page is neither cache, user nor free memory:
            # makedumpfile can only have dropped it as a zero page
            filtered[i] = "all zero, filtered"
        except FrameUnreadable as e:
            errors[i] = e.cause
        else:
            if frame is not None:
                frames[i] = {k: f"{v:#x}" for k, v in frame.items()}
    waddrs = [st.espfix_waddr if st.initialised else None for st in sts]
    return Columns(STACK_KEYS, [cpus, [st.online for st in sts], stacks, waddrs, phys, pages,
                                slots, frames, errors],
                   hex=("espfix_stack", "espfix_waddr")), filtered


def _stack_rows(state: EspfixState, cpus: Iterable[int]) -> list[dict]:
    cols, filtered = _stack_columns(state, cpus)
    return _rows_with_state(cols, filtered)


def _rows_with_state(cols: Columns, filtered: dict[int, str]) -> list[dict]:
    rows = cols.rows()
    for i, why in filtered.items():
        rows[i]["frame_state"] = why
    return rows


def stacks_json(state: EspfixState, cpus: Iterable[int]) -> dict:
    doc = _stacks_doc(state, *_stack_columns(state, cpus))
    if isinstance(doc["cpus"], Columns):
        doc["cpus"] = doc["cpus"].rows()
    return doc


def write_stacks_json(fp: IO[str], state: EspfixState, cpus: Iterable[int]) -> None:
    """``print(dumps(stacks_json(state, cpus)), file=fp)``, row block by row block."""
    jsonfmt.write(fp, _stacks_doc(state, *_stack_columns(state, cpus)))


def _stacks_doc(state: EspfixState, cols: Columns, filtered: dict[int, str]) -> dict:
    """The stacks document; its CPUs stay columns unless a crash dump adds to rows."""
    doc: dict = {"schema": schema_id("stacks"),
                 "kernel": {"osrelease": state.info.osrelease, "levels": state.info.levels,
                            "pti": state.info.pti},
                 "cpus": cols}
    crash = _crash_context(state)            # crash dumps only
    if crash is None and not filtered:
        return doc
    rows = doc["cpus"] = _rows_with_state(cols, filtered)
    if crash is not None:
        doc["kernel"]["notes"] = _dump_notes(state)
        doc["crash"] = {k: v for k, v in crash.as_dict().items() if k != "cpus"}
        for r in rows:
            cc = crash.cpus.get(r["cpu"])
            r["crash"] = cc.as_dict() if cc is not None else None
    return doc


def _dump_notes(state: EspfixState) -> list[str]:
    """What a dump target noted while opening ([] for /proc/kcore and snapshots)."""
    return list(getattr(state.reader.target, "notes", None) or [])


def _crash_context(state: EspfixState) -> CrashContext | None:
    """The crash context of a dump target; None, importing nothing, for the others."""
    if getattr(state.reader.target, "dump", None) is None:
        return None
    from .crash import dump_crash_context
    return dump_crash_context(state)


def stacks_text(state: EspfixState, cpus: Iterable[int]) -> str:
    rows = _stack_rows(state, cpus)
    cells: list[list[object]] = []
    for r in rows:
        f = r["frame"] or {}
        words = [f.get(k) for k in FRAME_WORDS]
        if r["frame_error"]:
            words[0] = "unreadable (see below)"
        cells.append([r["cpu"], r["espfix_stack"], r["espfix_waddr"], r["phys"],
                      None if r["page"] is None else f"{r['page']}/{r['slot']}", *words])
    head = _kernel_lines(state)
    head.append(f"ministacks: {sum(1 for r in rows if r['espfix_stack'])} of {len(rows)} "
                f"CPU(s) set up, {sum(1 for r in rows if r['frame'])} hold an IRET frame "
                f"(slot = last espfix return on that CPU; {ESPFIX_STACKS_PER_PAGE} slots/page)")
    filtered = [r["cpu"] for r in rows if r.get("frame_state")]
    if filtered:
        head.append(f"filtered: the ministack page of CPU(s) {format_cpu_list(filtered)} is "
                    "not in the dump (dropped as a zero page: all zero, filtered)")
    tail = [f"cpu {r['cpu']}: frame unreadable: {r['frame_error']}"
            for r in rows if r["frame_error"]]
    text = "\n".join(head) + "\n\n" + table(
        cells, ["CPU", "ESPFIX_STACK", "ESPFIX_WADDR", "PHYS", "PG/SLOT",
                *[k.upper() for k in FRAME_WORDS]], sections=(5,)) \
        + "".join("\n" + t for t in tail)
    crash = _crash_context(state)            # crash dumps only
    if crash is not None:
        text += "\n\n" + crash_text(crash, [r["cpu"] for r in rows])
    return text


def crash_text(crash: CrashContext, cpus: list[int]) -> str:
    """The crash-context table of ``stacks`` on a dump."""
    head = [f"registers at crash time: {crash.source}"]
    if crash.panic_cpu is not None:
        head.append(f"panic_cpu: {crash.panic_cpu}")
    head += [f"note: {n}" for n in crash.notes]
    rows = []
    for cpu in cpus:
        c = crash.cpus.get(cpu)
        if c is None:
            rows.append([cpu, None, None, None, None, "no registers"])
            continue
        r = c.regs
        rows.append([cpu, "user" if c.user_mode else "kernel",
                     f"{r.get('rip', 0):#x}", c.rip_symbol,
                     f"{r.get('rsp', 0):#x}", c.verdict()])
    return "\n".join(head) + "\n\n" + table(
        rows, ["CPU", "MODE", "RIP", "RIP SYMBOL", "RSP", "ESPFIX AT CRASH"])


# --------------------------------------------------------------------------- exercise

def exercise_json(rounds: list[RoundTrip], kcore_note: str | None) -> dict:
    from .exercise import COULD_NOT_RUN, FINDING_VERDICTS
    return {"schema": schema_id("exercise"), "ok": any(r.verdict == "ok" for r in rounds)
            and not any(r.verdict in FINDING_VERDICTS for r in rounds),
            "could_not_run": sum(r.verdict == COULD_NOT_RUN for r in rounds),
            "kcore_cross_check": kcore_note is None,
            "kcore_note": kcore_note,
            "rounds": [r.as_dict() for r in rounds]}


def snapshot_json(summary: dict) -> dict:
    """``snapshot --json``: what :func:`inspector.snapshot.take_snapshot` wrote."""
    return {"schema": schema_id("snapshot"), "file": summary["file"], "bytes": summary["bytes"],
            "segments": summary["segments"], "osrelease": summary["osrelease"],
            "nr_cpus": summary["cpus"]}


def _frame_cell(r: RoundTrip) -> str:
    if not r.frame_checked:
        return MISSING
    if r.frame is None:
        return "empty"
    f = r.frame
    return f"rip={f['rip']:#x} ss={f['ss']:#x} rsp={f['rsp']:#x}"


def exercise_text(rounds: list[RoundTrip], kcore_note: str | None) -> str:
    lines = ["espfix exercise: a child per CPU with SS = a 16-bit LDT data segment, "
             "spinning while interrupts return to it"]
    lines.append("ministack cross-check: " + ("on (/proc/kcore)" if kcore_note is None
                                               else f"off: {kcore_note}"))
    lines.append("")
    rows = [[r.cpu, r.mode, f"{r.cs:#x}:{r.ss:#x}", f"{r.rsp_set:#x}",
             None if r.rsp_back is None else f"{r.rsp_back:#x}", r.interruptions,
             r.timer_irqs, _frame_cell(r), r.verdict]
            for r in rounds]
    lines.append(table(rows, ["CPU", "MODE", "CS:SS", "RSP SET", "RSP BACK",
                              "INTERRUPTIONS", "TIMER IRQS", "MINISTACK FRAME", "VERDICT"],
                       keep=4, sections=(7,), numparse=True))
    notes = [(r, why) for r in rounds for why in r.reasons]
    if notes:
        lines.append("")
        seen: set[str] = set()
        for r, why in notes:
            key = f"{r.mode}: {why}" if r.verdict == "ok" else f"cpu {r.cpu} {r.mode}: {why}"
            if key not in seen:
                seen.add(key)
                lines.append(("note " if r.verdict == "ok" else f"{r.verdict} ") + key)
    from .exercise import COULD_NOT_RUN, FINDING_VERDICTS
    bad = [r for r in rounds if r.verdict in FINDING_VERDICTS]
    idle = [r for r in rounds if r.verdict == COULD_NOT_RUN]
    cpus = sorted({r.cpu for r in rounds})
    verdict = "FINDINGS" if bad else "OK" if len(idle) < len(rounds) else "COULD NOT RUN"
    lines.append("")
    lines.append("INTERRUPTIONS = gaps the child saw in its own TSC, each followed by an "
                 "RSP check")
    lines.append(f"result: {verdict} ({len(rounds)} round trip(s) on {len(cpus)} CPU(s), "
                 f"{len(bad)} not ok, {len(idle)} could not run)")
    return "\n".join(lines)
