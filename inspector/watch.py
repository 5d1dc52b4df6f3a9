"""``watch``: re-validate espfix on an interval, and at once when a CPU comes or goes.

One :class:`Watcher` keeps the target (``/proc/kcore`` + symbols) open across
rounds: parsing ``/proc/kallsyms`` is the expensive part of opening a live
target, reading the espfix state is not.  Every round gets a fresh
:class:`~inspector.memory.CoreMemory` on the open core, so no page-table or
stack page cached in an earlier round is ever served again (ministacks and
tables change while the kernel runs).  A core file that was replaced or
resized since it was opened (a new snapshot written over the old one; the
size of /proc/kcore changes with memory hotplug, ``fs/proc/kcore.c``
``kcore_update_ram()``) is reopened.

Each round reloads the state, runs every check, and compares it with the round
before (:mod:`inspector.watch_diff`: CPUs that came or went, findings that appeared
or went away, new ministack frames).  A hotplug event (:mod:`inspector.hotplug`:
kernel uevents, else a poll of ``/sys/devices/system/cpu/online``) triggers a round
at once; SIGHUP re-reads the configuration (:mod:`inspector.watch_config`).

Events are dataclasses (:mod:`inspector.watch_events`) handed to an ``emit``
callback, which renders them (text or JSON).  Rendering the Prometheus textfile is a layer
above (``inspector/prom.py``); it
receives each :class:`RoundResult` through the ``on_round`` callback.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections import Counter
from typing import Callable

from . import __version__
from .audit import audit
from .errors import EXIT_OK, InspectError
from .hostfacts import target_host_facts
from .hotplug import (SYSFS_ONLINE, UEVENT_SETTLE, CpuEvent, HotplugSource,
                      SysfsPollSource, open_hotplug_source)
from .model import format_cpu_list
from .state import load_state
from .target import Target, is_live, open_target
from .watch_config import WatchConfig, build_config
from .watch_diff import RoundDiff, RoundResult
from .watch_events import (ErrorEvent, Event, ReloadEvent, RoundEvent, StartEvent, StopEvent,
                           now_iso)

__all__ = ["RoundResult", "Watcher"]


# ---------------------------------------------------------------------------- rounds

def _core_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


Emit = Callable[[Event], None]


class Watcher:
    """The watch loop.  ``run()`` returns the exit status (see ``exit_status``)."""

    #: How error fixes name the core and symbols (:meth:`InspectError.line`); the CLI
    #: sets its own words (options and watch.conf keys).
    inputs: dict[str, str] | None = None

    def __init__(self, config: WatchConfig, emit: Emit,
                 on_round: Callable[[RoundResult], None] | None = None,
                 config_path: str | None = None, overrides: dict | None = None,
                 hotplug: HotplugSource | None | str = "config") -> None:
        self.config = config
        self.emit = emit
        self.on_round = on_round
        self.config_path = config_path
        self.overrides = dict(overrides or {})   # command-line values win over the file
        self._hotplug_arg = hotplug
        self.hotplug: HotplugSource | None = None
        self.hotplug_desc = "off"
        self.target: Target | None = None
        self._target_id: tuple | None = None
        self.rounds = 0                     # all rounds run
        self.interval_rounds = 0            # rounds counted against `count`
        self.diff = RoundDiff()
        self.last_error: InspectError | None = None
        self.worst = EXIT_OK
        self.output_failures = 0            # rounds whose textfile write failed
        self.last: RoundResult | None = None
        self._stop: str | None = None
        self._hup = False
        self._wake_r = self._wake_w = -1

    # -- control -------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Ask the loop to end after the current round (signal handlers, tests)."""
        self._stop = reason

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self._stop = signal.Signals(signum).name

    # -- target --------------------------------------------------------------
    def _close_target(self) -> None:
        if self.target is not None:
            self.target.close()
            self.target = None

    def _ensure_target(self) -> Target:
        cfg = self.config
        ident = _core_identity(cfg.core)
        if self.target is not None and ident != self._target_id:
            self._close_target()
        if self.target is None:
            self.target = open_target(cfg.core, cfg.symbols)
            self._target_id = _core_identity(cfg.core)
        self.target.fresh_memory()          # nothing read in an earlier round is reused
        return self.target

    def _setup_hotplug(self, live: bool) -> None:
        if self._hotplug_arg != "config":            # a source handed in (tests), or None
            self.hotplug = self._hotplug_arg          # type: ignore[assignment]
            self.hotplug_desc = self.hotplug.name if self.hotplug is not None else "off"
            return
        if self.hotplug is not None:
            self.hotplug.close()
            self.hotplug = None
        if not live:
            self.hotplug_desc = "off (not a live kernel)"
            return
        self.hotplug, self.hotplug_desc = open_hotplug_source(self.config.hotplug)

    # -- one round -------------------------------------------------------------
    def round(self, trigger: str, events: list[CpuEvent] | None = None) -> RoundResult:
        events = events or []
        self.rounds += 1
        res = RoundResult(self.rounds, trigger, time.time())
        t0, c0 = time.perf_counter(), time.process_time()
        out: list[Event] = []
        try:
            target = self._ensure_target()
            reads0, bytes0 = target.core.reads, target.core.bytes_read
            state = load_state(target, target_host_facts(target))
            result = audit(state)
            out = self.diff.compare(state, result, res, events, self.config.frames)
            res.pages_read = target.mem.stats.pages_read
            res.core_reads = target.core.reads - reads0
            res.bytes_read = target.core.bytes_read - bytes0
        except InspectError as e:
            res.error = e.line(self.inputs)
            self.last_error = e
            self._close_target()
        res.wall_seconds = time.perf_counter() - t0
        res.cpu_seconds = time.process_time() - c0
        for ev in out:
            self.emit(ev)
        if res.error is not None and trigger != "start":   # a failed start raises instead
            self.emit(ErrorEvent(now_iso(), res.number, res.error))
        if self.on_round is not None:       # the textfile is current when the event is out
            try:
                self.on_round(res)
            except InspectError as e:       # e.g. the textfile could not be written
                res.output_error = e.line(self.inputs)
                self.output_failures += 1
                self.emit(ErrorEvent(now_iso(), res.number, res.output_error))
        self.worst = max(self.worst, res.exit_status)
        self.last = res
        self.emit(self._round_event(res))
        return res

    def _round_event(self, res: RoundResult) -> RoundEvent:
        ev = RoundEvent(now_iso(), res.number, res.trigger, res.up, res.ok)
        if self.config.textfile:
            ev.textfile = {"written": res.output_error is None, "error": res.output_error}
        if res.up:
            counts: Counter[str] = Counter(f.severity for f in res.findings)
            ev.summary = {s: counts.get(s, 0) for s in ("error", "warning", "info")}
            ev.osrelease = res.osrelease
            ev.cpus_possible = format_cpu_list(res.possible)
            ev.cpus_online = format_cpu_list(res.online)
            ev.cpus_initialised = format_cpu_list(res.initialised)
            if self.config.frames:
                ev.frames_held = format_cpu_list(res.frames_held)
                ev.frames_new = format_cpu_list(res.frames_new)
        ev.cost = {"cpu_seconds": round(res.cpu_seconds, 6),
                   "wall_seconds": round(res.wall_seconds, 6),
                   "cpu_share_of_interval": round(res.cpu_seconds / self.config.interval, 6),
                   "pages_read": res.pages_read, "core_reads": res.core_reads,
                   "bytes_read": res.bytes_read}
        return ev

    # -- reload ----------------------------------------------------------------
    def load_config(self) -> WatchConfig:
        """The config file's values under the command-line overrides."""
        return build_config(self.config_path, self.overrides, self.config.count)

    def reload(self) -> bool:
        """SIGHUP: re-read the config file; keep the old one if it is bad."""
        try:
            new = self.load_config()
        except InspectError as e:
            self.emit(ErrorEvent(now_iso(), self.rounds,
                                 f"reload refused, old configuration kept: {e.line(self.inputs)}"))
            return False
        changes = self.config.changes(new)
        self.config = new
        if "core" in changes or "symbols" in changes:
            self._close_target()      # the next round opens the new core/symbols
            self.diff.forget_frames()
        if "hotplug" in changes or "core" in changes:
            self._setup_hotplug(is_live(self.config.core))
        self.emit(ReloadEvent(now_iso(), self.config_path, changes))
        return True

    # -- the loop ----------------------------------------------------------------
    def _wait(self, timeout: float) -> list[int]:
        fds = [self._wake_r]
        hp = self.hotplug.fileno() if self.hotplug is not None else None
        if hp is not None:
            fds.append(hp)
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:
            return []
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        return ready

    def _hotplug_events(self) -> list[CpuEvent]:
        assert self.hotplug is not None
        try:
            return self.hotplug.read_events()
        except OSError as e:
            self.emit(ErrorEvent(now_iso(), self.rounds,
                                 f"hotplug source failed ({e.strerror or e}): falling back "
                                 f"to polling {SYSFS_ONLINE}"))
            self.hotplug.close()
            self.hotplug, self.hotplug_desc = SysfsPollSource(), "sysfs poll"
            return []

    def run(self) -> int:
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old = {s: signal.getsignal(s) for s in sigs}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for s in sigs:
            signal.signal(s, self._on_signal)
        t_start, cpu_start = time.monotonic(), time.process_time()
        reason = "count"
        try:
            self._setup_hotplug(is_live(self.config.core))
            cfg = self.config
            self.emit(StartEvent(now_iso(), __version__, os.getpid(), cfg.core, cfg.symbols,
                                 cfg.interval, cfg.count, self.hotplug_desc, cfg.textfile,
                                 self.config_path, cfg.frames))
            first = self.round("start")
            if not first.up and self.last_error is not None:
                raise self.last_error      # nothing to watch: one line and exit 2
            self.interval_rounds = 1
            next_due = time.monotonic() + self.config.interval
            while self._stop is None and (self.config.count is None
                                          or self.interval_rounds < self.config.count):
                timeout = next_due - time.monotonic()
                if self.hotplug is not None and self.hotplug.fileno() is None:
                    timeout = min(timeout, self.hotplug.poll_interval)
                ready = self._wait(timeout)
                if self._stop is not None:
                    break
                if self._hup:
                    self._hup = False
                    if self.reload():
                        self.round("reload")
                        next_due = time.monotonic() + self.config.interval
                    continue
                hp = self.hotplug
                if hp is not None and (hp.fileno() is None or hp.fileno() in ready):
                    evs = self._hotplug_events()
                    if evs and hp.fileno() is not None:
                        time.sleep(UEVENT_SETTLE)        # let a burst (off+on) arrive
                        evs += self._hotplug_events()
                    if evs:
                        trig = "hotplug " + ",".join(
                            f"cpu{e.cpu} {e.action}" if e.cpu >= 0 else e.action for e in evs)
                        self.round(trig, evs)
                        continue
                if time.monotonic() >= next_due:
                    self.round("interval")
                    self.interval_rounds += 1
                    next_due += self.config.interval
                    if next_due < time.monotonic():          # fell behind (a slow round)
                        next_due = time.monotonic() + self.config.interval
            if self._stop is not None:
                reason = self._stop
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_wakeup)
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            if self.hotplug is not None:
                self.hotplug.close()
            self._close_target()
        # Stopped by a signal: 0, unless the last round's output could not be written
        # (a textfile nobody can read is a failure the service manager must see).
        if reason in ("SIGTERM", "SIGINT"):
            status = self.last.exit_status if self.last is not None and \
                self.last.output_error is not None else EXIT_OK
        else:
            status = self.worst
        cpu_total = time.process_time() - cpu_start
        wall = time.monotonic() - t_start
        self.emit(StopEvent(now_iso(), reason, self.rounds, round(wall, 3),
                            round(cpu_total, 6),
                            round(cpu_total / wall, 6) if wall > 0 else None,
                            self.output_failures, status))
        return status


