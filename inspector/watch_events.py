"""``watch``'s events: one dataclass per kind, and their renderers.

The round loop (:mod:`inspector.watch`) only builds events; how they look is decided
here, once for text (one readable line each, the journal's view) and once for JSON (one
object per line).  ``--json`` objects are ``{"schema": "espfix-inspect/watch/1", "event":
KIND, "time": ..., FIELDS}`` (inspector/schemas/watch.schema.json); the fields are the
dataclass's, in order.  :func:`event_severity` ranks an event for the
journal (``<3>``/``<4>`` priority prefixes, ``inspector.journal``).

Kinds: ``start``, ``round`` (with its cost), ``finding`` (new/gone), ``hotplug`` (the
CPU's state and verdict, validated at once), ``espfix_frame`` (a new IRET frame in a
CPU's ministack: that CPU took the espfix return path since the last round),
``reload``, ``error``, ``stop``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from collections.abc import Callable
from typing import Any, ClassVar

from .schema import schema_id

__all__ = ["Event", "StartEvent", "RoundEvent", "FindingEvent", "HotplugEvent",
           "FrameEvent", "ReloadEvent", "ErrorEvent", "StopEvent", "event_json",
           "event_text", "event_severity", "now_iso"]


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


#: field metadata: left out of the JSON object when None (its absence is the fact)
OMIT_NONE = {"omit_none": True}


@dataclass
class Event:
    kind: ClassVar[str] = ""
    time: str


@dataclass
class StartEvent(Event):
    kind: ClassVar[str] = "start"
    version: str
    pid: int
    core: str
    symbols: str | None
    interval: float
    count: int | None
    hotplug: str
    textfile: str | None
    config: str | None
    frames: bool


@dataclass
class RoundEvent(Event):
    kind: ClassVar[str] = "round"
    round: int
    trigger: str                        # start, interval, hotplug ..., reload
    up: bool
    ok: bool
    #: {"written": bool, "error": str | None} when a textfile is configured
    textfile: dict | None = field(default=None, metadata=OMIT_NONE)
    # the rest only when the round could inspect (up)
    summary: dict | None = field(default=None, metadata=OMIT_NONE)
    osrelease: str | None = field(default=None, metadata=OMIT_NONE)
    cpus_possible: str | None = field(default=None, metadata=OMIT_NONE)
    cpus_online: str | None = field(default=None, metadata=OMIT_NONE)
    cpus_initialised: str | None = field(default=None, metadata=OMIT_NONE)
    #: CPU lists; None (and present) when frames are not tracked
    frames_held: str | None = None
    frames_new: str | None = None
    cost: dict = field(default_factory=dict)


@dataclass
class FindingEvent(Event):
    kind: ClassVar[str] = "finding"
    change: str                         # new, gone
    finding: dict                       # Finding.as_dict(), flattened into the object


@dataclass
class HotplugEvent(Event):
    kind: ClassVar[str] = "hotplug"
    cpu: int
    action: str                         # add, remove, online, offline
    source: str                         # uevent, sysfs, online mask, possible mask
    possible: bool
    online: bool
    initialised: bool
    espfix_stack: str | None
    ok: bool
    findings: list


@dataclass
class FrameEvent(Event):
    kind: ClassVar[str] = "espfix_frame"
    cpu: int
    frame: dict
    seen: int


@dataclass
class ReloadEvent(Event):
    kind: ClassVar[str] = "reload"
    config: str | None
    changed: dict


@dataclass
class ErrorEvent(Event):
    kind: ClassVar[str] = "error"
    round: int
    message: str


@dataclass
class StopEvent(Event):
    kind: ClassVar[str] = "stop"
    reason: str
    rounds: int
    wall_seconds: float
    cpu_seconds: float
    cpu_share: float | None
    output_failures: int
    exit: int


# ---------------------------------------------------------------------------- JSON

SCHEMA = schema_id("watch")


def event_json(ev: Event) -> dict[str, Any]:
    """The ``--json`` object of an event."""
    out: dict[str, Any] = {"schema": SCHEMA, "event": ev.kind}
    for f in fields(ev):
        value = getattr(ev, f.name)
        if value is None and f.metadata.get("omit_none"):
            continue
        if f.name == "finding":
            out.update(value)
        else:
            out[f.name] = value
    return out


# ---------------------------------------------------------------------------- text

def _cost(c: dict) -> str:
    return (f"{c['cpu_seconds'] * 1000:.1f} ms CPU ({c['cpu_share_of_interval'] * 100:.2f}% "
            f"of the interval), {c['wall_seconds'] * 1000:.1f} ms wall, "
            f"{c['pages_read']} pages read")


def _start(ev: StartEvent) -> str:
    return (f"start: watching {ev.core} every {ev.interval:g} s"
            + (f", {ev.count} round(s)" if ev.count else "")
            + f"; hotplug: {ev.hotplug}"
            + (f"; textfile {ev.textfile}" if ev.textfile else "")
            + ("" if ev.frames else "; frames not tracked"))


def _round(ev: RoundEvent) -> str:
    head = f"round {ev.round} ({ev.trigger}): "
    if not ev.up:
        return head + f"COULD NOT INSPECT; {_cost(ev.cost)}"
    s = ev.summary or {}
    frames = ""
    if ev.frames_held is not None:
        frames = f"; frames held {ev.frames_held or '-'}, new {ev.frames_new or '-'}"
    kernel = f"{ev.osrelease}, " if ev.trigger == "start" else ""
    text = (head + f"{'OK' if ev.ok else 'FINDINGS'} ({s.get('error', 0)} error(s), "
            f"{s.get('warning', 0)} warning(s), {s.get('info', 0)} info); {kernel}CPUs "
            f"online {ev.cpus_online or '-'}, initialised {ev.cpus_initialised or '-'} of "
            f"{ev.cpus_possible}{frames}; {_cost(ev.cost)}")
    if ev.textfile and not ev.textfile["written"]:
        text += "; TEXTFILE NOT WRITTEN"
    return text


def _hotplug(ev: HotplugEvent) -> str:
    if not ev.possible:
        return f"hotplug: cpu{ev.cpu} {ev.action} ({ev.source}): not possible"
    state = "online" if ev.online else "offline"
    stack = f"espfix_stack {ev.espfix_stack}" if ev.initialised \
        else "no ministack (espfix_stack 0)"
    return (f"hotplug: cpu{ev.cpu} {ev.action} ({ev.source}): now {state}, {stack}, "
            f"{'ok' if ev.ok else 'BAD'}")


def _finding(ev: FindingEvent) -> str:
    f = ev.finding
    cpu = "" if f.get("cpu") is None else f" cpu{f['cpu']}"
    return f"finding {ev.change}: {f['severity']} {f['check']}{cpu}: {f['message']}"


def _frame(ev: FrameEvent) -> str:
    f = ev.frame
    return (f"espfix frame cpu{ev.cpu} (new #{ev.seen}): rip={f['rip']} cs={f['cs']} "
            f"rflags={f['rflags']} rsp={f['rsp']} ss={f['ss']} rax={f['rax']}")


def _reload(ev: ReloadEvent) -> str:
    ch = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in ev.changed.items()) or "no change"
    return f"reload: {ev.config or 'command line'}: {ch}"


def _stop(ev: StopEvent) -> str:
    share = "" if ev.cpu_share is None else f" ({ev.cpu_share * 100:.3f}% of one CPU)"
    return (f"stop ({ev.reason}): {ev.rounds} round(s) in {ev.wall_seconds:.1f} s, "
            f"{ev.cpu_seconds:.3f} s CPU{share}, exit {ev.exit}")


_TEXT: dict[type, Callable[[Any], str]] = {StartEvent: _start, RoundEvent: _round, HotplugEvent: _hotplug,
         FindingEvent: _finding, FrameEvent: _frame, ReloadEvent: _reload,
         ErrorEvent: lambda ev: f"error: {ev.message}", StopEvent: _stop}


def event_text(ev: Event) -> str:
    """One readable line per event (the journal's view of ``watch``)."""
    return f"{ev.time} {_TEXT[type(ev)](ev)}"


def event_severity(ev: Event) -> str | None:
    """"error" or "warning" for an event the journal should rank above info, else None.

    A new finding keeps its own severity; a round that could not inspect and an
    error event are errors; a hotplugged CPU that failed its check is a warning
    (its findings follow as finding events).  ``watch`` turns this into a
    ``<3>``/``<4>`` prefix when stdout is the journal (inspector.journal).
    """
    if isinstance(ev, FindingEvent):
        return ev.finding.get("severity") if ev.change == "new" else None
    if isinstance(ev, ErrorEvent) or (isinstance(ev, RoundEvent) and not ev.up):
        return "error"
    if isinstance(ev, HotplugEvent) and ev.possible and not ev.ok:
        return "warning"
    return None
