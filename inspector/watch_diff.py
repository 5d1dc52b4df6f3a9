"""What changed between two ``watch`` rounds: CPUs, findings and ministack frames.

:class:`RoundDiff` keeps what the last round saw and turns the next one into events
(:mod:`inspector.watch_events`):

- CPUs that went online or offline (the kernel's ``__cpu_online_mask``), and the CPUs
  named by hotplug events (:mod:`inspector.hotplug`), each with its state and verdict;
- findings that appeared or went away;
- ministack frames: ``native_irq_return_ldt`` (``arch/x86/entry/entry_64.S``) copies the
  IRET frame to the CPU's ministack on every espfix return, so a slot that differs from
  the last look proves at least one espfix return on that CPU since then (a lower
  bound: identical frames are not told apart).  Each stack page is re-read once per
  round (``EspfixState.frame(fresh=True)``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .audit import AuditResult, Finding
from .errors import EXIT_CANNOT_INSPECT, EXIT_FINDINGS, EXIT_OK, InspectError
from .hotplug import CpuEvent
from .model import ESPFIX_STACKS_PER_PAGE
from .state import EspfixState
from .watch_events import Event, FindingEvent, FrameEvent, HotplugEvent, now_iso

__all__ = ["RoundDiff", "RoundResult"]


@dataclass
class RoundResult:
    """One validation round, for the textfile writer and the tests."""
    number: int
    trigger: str                        # start, interval, hotplug, reload
    started: float                      # epoch seconds
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    error: str | None = None            # the one-line cause when the round could not inspect
    output_error: str | None = None     # the round's output (the textfile) could not be written
    osrelease: str | None = None
    levels: int | None = None
    pti: bool | None = None
    possible: list[int] = field(default_factory=list)
    online: list[int] = field(default_factory=list)
    initialised: list[int] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    bad_cpus: set[int] = field(default_factory=set)
    frames_held: list[int] = field(default_factory=list)
    frames_new: list[int] = field(default_factory=list)
    frames_seen: dict[int, int] = field(default_factory=dict)   # cumulative, per CPU
    hotplug_events: dict[str, int] = field(default_factory=dict)  # cumulative, per action
    pages_read: int = 0
    core_reads: int = 0
    bytes_read: int = 0

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def ok(self) -> bool:
        return self.up and not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def exit_status(self) -> int:
        if not self.up or self.output_error is not None:
            return EXIT_CANNOT_INSPECT
        return EXIT_OK if self.ok else EXIT_FINDINGS


def _finding_key(f: Finding) -> tuple:
    aff = None if f.affects is None else (f.affects.start, f.affects.stop)
    return (f.check, f.severity, f.cpu, aff, f.message)


def _hexed(frame: dict[str, int]) -> dict[str, str]:
    return {k: f"{v:#x}" for k, v in frame.items()}


class RoundDiff:
    """The previous round, and the running counts (per-CPU frames seen, hotplug
    events by action) that the Prometheus counters report."""

    def __init__(self) -> None:
        self.prev_online: set[int] | None = None
        self.prev_possible: set[int] | None = None
        self.prev_findings: dict[tuple, Finding] = {}
        self.prev_frames: dict[int, tuple] = {}
        self.frames_base = False            # a first look at the frames has been taken
        self.frames_seen: Counter = Counter()
        self.hotplug_total: Counter = Counter()

    def forget_frames(self) -> None:
        """Another core (a reload): the next look at the frames is a first look."""
        self.prev_frames.clear()
        self.frames_base = False

    def compare(self, state: EspfixState, result: AuditResult, res: RoundResult,
                events: list[CpuEvent], frames: bool) -> list[Event]:
        """Fill *res* from this round's state and return the events of what changed."""
        now = now_iso()
        out: list[Event] = []
        res.osrelease, res.levels, res.pti = state.info.osrelease, state.info.levels, state.info.pti
        res.possible, res.online = list(state.possible), list(state.online)
        res.initialised = [c for c, s in state.cpus.items() if s.initialised]
        res.findings, res.bad_cpus = result.findings, set(result.per_cpu_bad)

        # hotplug: CPUs named by events, then any the kernel's masks show changed
        online, possible = set(state.online), set(state.possible)
        changed: dict[int, tuple[str, str]] = {}
        for ev in events:
            if ev.cpu >= 0:
                changed[ev.cpu] = (ev.action, ev.source)
        if self.prev_online is not None:
            for cpu in sorted(possible | (self.prev_possible or set())):
                if cpu in changed:
                    continue
                if cpu in possible and self.prev_possible is not None \
                        and cpu not in self.prev_possible:
                    changed[cpu] = ("add", "possible mask")
                elif cpu not in possible and self.prev_possible and cpu in self.prev_possible:
                    changed[cpu] = ("remove", "possible mask")
                elif (cpu in online) != (cpu in self.prev_online):
                    changed[cpu] = ("online" if cpu in online else "offline", "online mask")
        for cpu, (action, source) in sorted(changed.items()):
            self.hotplug_total[action] += 1
            out.append(self._hotplug_event(now, cpu, action, source, state, result))
        self.prev_online, self.prev_possible = online, possible

        # findings that appeared or went away
        cur = {_finding_key(f): f for f in result.findings}
        for key, f in cur.items():
            if key not in self.prev_findings:
                out.append(FindingEvent(now, "new", f.as_dict()))
        for key, f in self.prev_findings.items():
            if key not in cur:
                out.append(FindingEvent(now, "gone", f.as_dict()))
        self.prev_findings = cur

        if frames:
            self._frames(state, res, now, out)
        res.frames_seen = dict(self.frames_seen)
        res.hotplug_events = dict(self.hotplug_total)
        return out

    def _frames(self, state: EspfixState, res: RoundResult, now: str,
                out: list[Event]) -> None:
        first_look = not self.frames_base
        self.frames_base = True
        seen_pages: set[int] = set()
        frames: dict[int, tuple] = {}
        for cpu, st in state.cpus.items():
            if not st.initialised:
                continue
            page = cpu // ESPFIX_STACKS_PER_PAGE
            try:
                frame = state.frame(cpu, fresh=page not in seen_pages)   # one re-read per page
            except InspectError:
                continue        # the walk leads outside the core: the audit reports that
            seen_pages.add(page)
            if frame is None:
                continue
            words = tuple(frame.values())
            frames[cpu] = words
            if not first_look and self.prev_frames.get(cpu) != words:
                self.frames_seen[cpu] += 1
                res.frames_new.append(cpu)
                out.append(FrameEvent(now, cpu, _hexed(frame), self.frames_seen[cpu]))
        res.frames_held = sorted(frames)
        self.prev_frames = frames

    def _hotplug_event(self, now: str, cpu: int, action: str, source: str,
                       state: EspfixState, result: AuditResult) -> HotplugEvent:
        st = state.cpus.get(cpu)
        mine = [f.as_dict() for f in result.findings
                if f.cpu == cpu or (f.affects is not None and cpu in f.affects)]
        return HotplugEvent(now, cpu, action, source, possible=st is not None,
                            online=st.online if st else False,
                            initialised=st.initialised if st else False,
                            espfix_stack=f"{st.espfix_stack:#x}" if st and st.initialised
                            else None,
                            ok=cpu not in result.per_cpu_bad, findings=mine)
