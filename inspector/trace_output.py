"""What ``trace`` prints: one renderer for text, one for JSON lines, the same calls.

``cmd_trace`` (:mod:`inspector.trace_cli`) runs the loop and hands each part of a trace
to a :class:`TraceOutput`: the start (what is traced, what is not), the LDT holders,
each INIT and LDT event, the returns through espfix, the init summary
(:mod:`inspector.trace_summary`) and the end.  :class:`TextTrace` prints lines as bcc's
tools do (a header, then one line per event); :class:`JsonTrace` prints one JSON object
per line.  Events are the dicts :mod:`probes.trace` decodes from the BPF ring buffers.

The JSON lines speak ``watch``'s vocabulary (inspector/schema.py): each is
``{"schema": "espfix-inspect/trace/1", "event": KIND, "time": ISO-8601 UTC, FIELDS}``
with KIND one of ``start``, ``holder``, ``init``, ``ldt``, ``returns``, ``summary`` and
``stop`` (the last line); ``init`` and ``ldt`` carry ``elapsed``, the seconds since the
trace began (inspector/schemas/trace.schema.json).  The probes' own dicts name the kind
``type``: it becomes ``event`` here, at the JSON boundary.
"""

from __future__ import annotations

import json
from typing import Callable

from .schema import schema_id
from .trace_summary import InitSummary, render_text, summary_json
from .watch_events import now_iso

__all__ = ["TraceOutput", "TextTrace", "JsonTrace", "init_line", "ldt_line"]

Write = Callable[[str], None]


def init_line(ev: dict) -> str:
    """An INIT event: who brought the CPU up, how long it took, what it allocated, and
    the validate of that CPU that followed."""
    alloc = f"; allocated: {', '.join(ev['allocated'])}" if ev["allocated"] else ""
    v = ev.get("validate")
    ver = ""
    if v is not None:
        ver = f"; validate cpu {ev['target_cpu']}: {v['verdict']}"
        if v["verdict"] == "not checked":
            ver += f" ({v['why']})"
        for f in v.get("findings", []):
            ver += f"\n          {f['severity']} {f['check']}: {f['message']}"
    return (f"cpu {ev['target_cpu']} brought up by cpu {ev['cpu']} (pid {ev['pid']} "
            f"{ev['comm']}), {ev['latency_us']} us: {ev['outcome']}{alloc}{ver}")


def ldt_line(ev: dict) -> str:
    """A modify_ldt(2) call with the struct user_desc it installs."""
    head = f"pid {ev['pid']} ({ev['comm']}) modify_ldt({ev['func']:#x})"
    if "entry" in ev:
        bits = "16-bit" if ev["sixteen_bit"] else ("64-bit" if ev["lm"] else
                                                    "32-bit" if ev["seg_32bit"] else "empty")
        head += (f": entry {ev['entry']} (selector {ev['selector']}), {bits} {ev['kind']}, "
                 f"base {ev['base']} limit {ev['limit']}")
    return f"{head} -> {ev['ret']}"


class TraceOutput:
    """The parts of a trace, in the order cmd_trace produces them."""

    def __init__(self, write: Write, events: bool = True) -> None:
        self.write = write
        self.events = events            # False: --summary, no per-event output

    def start(self, tracing: str, missing: list[str], pid: int | None,
              duration: float | None) -> None: ...

    def holders(self, holders: list[dict], walked: int, cut: bool) -> None: ...

    def ready(self) -> None:
        """The probes are live: per-event output follows."""

    def event(self, ev: dict, elapsed: float) -> None: ...

    def returns(self, rows: list[dict], looked: int, counted: int, elapsed: float) -> None: ...

    def summary(self, s: InitSummary) -> None: ...

    def end(self, reason: str, elapsed: float, looked: int, counted: int) -> None: ...


class TextTrace(TraceOutput):
    def start(self, tracing: str, missing: list[str], pid: int | None,
              duration: float | None) -> None:
        self.write(f"Tracing {tracing}" + (f" for pid {pid}" if pid else "")
                   + (f" for {duration:g} s" if duration else "") + ". Ctrl-C to end.")
        for m in missing:
            self.write(f"not traced: {m}")

    def holders(self, holders: list[dict], walked: int, cut: bool) -> None:
        names = ", ".join(f"{h['pid']} ({h['comm']}, {h['nr_entries']} entries)"
                          for h in holders) or "none"
        self.write(f"LDT holders now ({walked} processes walked"
                   f"{', cut short' if cut else ''}): {names}")

    def ready(self) -> None:
        if self.events:
            self.write(f"{'TIME(s)':>9}  {'EVENT':6} DETAILS")

    def event(self, ev: dict, elapsed: float) -> None:
        if not self.events:
            return
        if ev["type"] == "init":
            self.write(f"{elapsed:9.3f}  INIT   {init_line(ev)}")
        else:
            self.write(f"{elapsed:9.3f}  LDT    {ldt_line(ev)}")

    def returns(self, rows: list[dict], looked: int, counted: int, elapsed: float) -> None:
        from tabulate import tabulate
        self.write(f"\nreturns through espfix: {counted} counted of {looked} "
                   f"return-to-user events seen in {elapsed:.1f} s")
        if rows:
            self.write(tabulate([[r["cpu"], r["pid"], r["comm"], r["ss"], r["cs"],
                                  r["source"], r["count"]] for r in rows],
                                headers=["CPU", "PID", "COMM", "SS", "CS", "SOURCE", "COUNT"]))

    def summary(self, s: InitSummary) -> None:
        self.write("\n" + "\n".join(render_text(s)))

    def end(self, reason: str, elapsed: float, looked: int, counted: int) -> None:
        self.write(f"ended ({reason}) after {elapsed:.1f} s; probes detached")


SCHEMA = schema_id("trace")


class JsonTrace(TraceOutput):
    def _doc(self, event: str, fields: dict) -> None:
        """One line: schema, event and time first, then *fields* (a probe dict's own
        ``type`` is the event, not a field)."""
        self.write(json.dumps({"schema": SCHEMA, "event": event, "time": now_iso(),
                               **{k: v for k, v in fields.items() if k != "type"}}))

    def start(self, tracing: str, missing: list[str], pid: int | None,
              duration: float | None) -> None:
        self._doc("start", {"tracing": tracing, "missing": missing})

    def holders(self, holders: list[dict], walked: int, cut: bool) -> None:
        for h in holders:
            self._doc("holder", h)

    def event(self, ev: dict, elapsed: float) -> None:
        if self.events:
            self._doc(ev["type"], {**{k: v for k, v in ev.items() if k != "ts_ns"},
                                   "elapsed": round(elapsed, 3)})

    def returns(self, rows: list[dict], looked: int, counted: int, elapsed: float) -> None:
        for r in rows:
            self._doc("returns", r)

    def summary(self, s: InitSummary) -> None:
        self._doc("summary", summary_json(s))

    def end(self, reason: str, elapsed: float, looked: int, counted: int) -> None:
        self._doc("stop", {"reason": reason, "wall_seconds": round(elapsed, 3),
                           "looked": looked, "counted": counted})
