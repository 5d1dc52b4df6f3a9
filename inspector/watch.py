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

Each round reloads the state, runs every check, and compares with the round
before:

- CPUs that went online or offline (the kernel's ``__cpu_online_mask``), and
  the CPUs named by hotplug events: netlink kobject uevents
  (``NETLINK_KOBJECT_UEVENT``, multicast group 1), which ``device_online()`` /
  ``device_offline()`` in ``drivers/base/core.c`` send as
  ``online@/devices/system/cpu/cpuN`` / ``offline@...`` once the CPU changed
  state (``lib/kobject_uevent.c`` formats ``ACTION@DEVPATH`` then
  ``KEY=VALUE`` strings).  A uevent triggers a round at once.  Where the socket
  cannot be had, ``/sys/devices/system/cpu/online`` is polled each second.
- findings that appeared or went away;
- ministack frames: ``native_irq_return_ldt`` (``arch/x86/entry/entry_64.S``)
  copies the IRET frame to the CPU's ministack on every espfix return, so a
  slot that differs from the last look proves at least one espfix return on
  that CPU since then (a lower bound: identical frames are not told apart).

Events are dicts (``{"event": "round", ...}``) handed to an ``emit`` callback;
:func:`event_text` renders one as a readable line.  Rendering the Prometheus
textfile is a layer above (``inspector/prom.py``); it receives each
:class:`RoundResult` through the ``on_round`` callback.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Protocol

from . import __version__
from .audit import AuditResult, Finding, audit
from .errors import EXIT_CANNOT_INSPECT, EXIT_FINDINGS, EXIT_OK, InspectError
from .fileio import open_regular, read_bounded
from .model import ESPFIX_STACKS_PER_PAGE, format_cpu_list, parse_cpu_list
from .state import EspfixState, load_state
from .target import KCORE_PATH, Target, open_target

__all__ = ["event_severity", "WatchConfig", "read_config", "build_config", "CpuEvent", "parse_uevent", "UeventSource",
           "SysfsPollSource", "RoundResult", "Watcher", "event_text", "DEFAULT_CONFIG"]

DEFAULT_CONFIG = "/etc/espfix-inspect/watch.conf"
#: watch.conf is a handful of key = value lines.
MAX_CONFIG = 1 << 20
SYSFS_ONLINE = "/sys/devices/system/cpu/online"
#: NETLINK_KOBJECT_UEVENT (include/uapi/linux/netlink.h) and its kernel group.
NETLINK_KOBJECT_UEVENT = 15
UEVENT_KERNEL_GROUP = 1
CPU_DEVPATH = re.compile(r"^/devices/system/cpu/cpu(\d+)$")
#: kobject actions that change a CPU's presence or state (lib/kobject_uevent.c kobject_actions[]).
CPU_ACTIONS = ("add", "remove", "online", "offline")
#: uevents arriving together (offline then online) are handled in one round.
UEVENT_SETTLE = 0.05


# ---------------------------------------------------------------------------- config

@dataclass
class WatchConfig:
    """What one watch runs with.  Keys of the config file are these field names."""
    interval: float = 10.0
    count: int | None = None            # rounds to run (interval rounds; None = forever)
    core: str = KCORE_PATH
    symbols: str | None = None
    textfile: str | None = None         # node_exporter textfile-collector directory
    json: bool = False
    frames: bool = True                 # compare ministack frames between rounds
    hotplug: str = "auto"               # auto (uevents, else poll), poll, off

    def changes(self, other: "WatchConfig") -> dict[str, list]:
        return {f.name: [getattr(self, f.name), getattr(other, f.name)] for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}


FILE_KEYS = ("interval", "core", "symbols", "textfile", "json", "frames", "hotplug")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def _check_value(key: str, value: str, where: str):
    if key == "interval":
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if not 0.1 <= v <= 86400:
            raise InspectError(f"{where}: interval = {value!r} is not a number of seconds "
                               "in 0.1..86400", "fix the value")
        return v
    if key in ("json", "frames"):
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise InspectError(f"{where}: {key} = {value!r} is not yes or no", "fix the value")
    if key == "hotplug":
        if value not in ("auto", "poll", "off"):
            raise InspectError(f"{where}: hotplug = {value!r}", "use auto, poll or off")
        return value
    if key in ("symbols", "textfile"):
        return value or None
    if key == "core":
        if not value:
            raise InspectError(f"{where}: core is empty", "give a path, e.g. /proc/kcore")
        return value
    raise InspectError(f"{where}: unknown key {key!r}", f"use {', '.join(FILE_KEYS)}")


def build_config(config_path: str | None, overrides: dict, count: int | None = None) -> WatchConfig:
    """The config file's values (if any) under *overrides* (the command line's)."""
    values = read_config(config_path) if config_path is not None else {}
    values.update(overrides)
    return replace(WatchConfig(count=count), **values)


def read_config(path: str) -> dict:
    """Parse a ``key = value`` file (``#`` comments, blank lines ignored) into
    checked values.  Raises InspectError naming the file and line."""
    fix = "create it (see contrib/watch.conf) or drop --config"
    try:
        with open_regular(path, "config file", fix) as f:
            lines = read_bounded(f, path, "config file", MAX_CONFIG).decode("utf-8").splitlines()
    except PermissionError:
        raise InspectError(f"permission denied reading config file {path}",
                           "make it readable for this user") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InspectError(f"cannot read config file {path}: {getattr(e, 'strerror', e)}",
                           "make it a readable UTF-8 text file") from None
    out: dict = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InspectError(f"{path}:{n}: expected key = value, got {raw.strip()!r}",
                               "fix the line")
        out[key] = _check_value(key, value, f"{path}:{n}")
    return out


# ---------------------------------------------------------------------------- hotplug

@dataclass(frozen=True)
class CpuEvent:
    action: str             # add, remove, online, offline
    cpu: int
    source: str             # uevent, sysfs


def parse_uevent(data: bytes) -> CpuEvent | None:
    """A kernel uevent datagram -> a CPU event, or None for any other device.

    The kernel's format (``lib/kobject_uevent.c``): ``ACTION@DEVPATH\\0`` then
    ``ACTION=..\\0DEVPATH=..\\0SUBSYSTEM=..\\0SEQNUM=..\\0``.  udev's own
    re-broadcasts start with ``libudev`` and go to group 2; they are ignored.
    """
    parts = data.split(b"\0")
    if not parts or b"@" not in parts[0]:
        return None
    env = {}
    for p in parts[1:]:
        k, sep, v = p.partition(b"=")
        if sep:
            env[k.decode("latin-1")] = v.decode("latin-1")
    head_action, _, head_path = parts[0].decode("latin-1").partition("@")
    action = env.get("ACTION", head_action)
    devpath = env.get("DEVPATH", head_path)
    if env.get("SUBSYSTEM", "cpu") != "cpu" or action not in CPU_ACTIONS:
        return None
    m = CPU_DEVPATH.match(devpath)
    if m is None:
        return None
    return CpuEvent(action, int(m.group(1)), "uevent")


class HotplugSource(Protocol):
    name: str
    #: seconds between polls when fileno() is None
    poll_interval: float

    def fileno(self) -> int | None: ...

    def read_events(self) -> list[CpuEvent]: ...

    def close(self) -> None: ...


class UeventSource:
    """Kernel uevents from a ``NETLINK_KOBJECT_UEVENT`` socket bound to group 1.

    Any user may listen (the kernel creates the socket with
    ``NL_CFG_F_NONROOT_RECV``, ``lib/kobject_uevent.c``), but only in the
    initial network namespace.  Datagrams not sent by the kernel (netlink
    port id 0) are dropped.  *sock* is for tests (any datagram socket).
    """

    name = "uevent"
    poll_interval = 0.0

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_KOBJECT_UEVENT)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, UEVENT_KERNEL_GROUP))
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self.overruns = 0

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def read_events(self) -> list[CpuEvent]:
        out: list[CpuEvent] = []
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:     # the kernel dropped uevents: rescan
                    self.overruns += 1
                    out.append(CpuEvent("overrun", -1, "uevent"))
                    continue
                raise
            if self.sock.family == socket.AF_NETLINK and addr and addr[0] != 0:
                continue
            ev = parse_uevent(data)
            if ev is not None:
                out.append(ev)

    def close(self) -> None:
        self.sock.close()


class SysfsPollSource:
    """Fallback: poll ``/sys/devices/system/cpu/online`` (one small read)."""

    name = "sysfs poll"
    poll_interval = 1.0

    def __init__(self, path: str = SYSFS_ONLINE) -> None:
        self.path = path
        self.last = self._read()

    def _read(self) -> set[int] | None:
        try:
            with open(self.path) as f:
                return set(parse_cpu_list(f.read().strip()))
        except (OSError, ValueError):
            return None

    def fileno(self) -> int | None:
        return None

    def read_events(self) -> list[CpuEvent]:
        now = self._read()
        if now is None or self.last is None:
            self.last = now
            return []
        evs = [CpuEvent("offline", c, "sysfs") for c in sorted(self.last - now)]
        evs += [CpuEvent("online", c, "sysfs") for c in sorted(now - self.last)]
        self.last = now
        return evs

    def close(self) -> None:
        pass


def open_hotplug_source(mode: str) -> tuple[HotplugSource | None, str]:
    """(source, description) for *mode* auto/poll/off."""
    if mode == "off":
        return None, "off"
    if mode == "auto":
        try:
            return UeventSource(), "uevents (NETLINK_KOBJECT_UEVENT)"
        except OSError as e:
            why = e.strerror or str(e)
            return SysfsPollSource(), f"polling {SYSFS_ONLINE} each second (no uevent socket: {why})"
    return SysfsPollSource(), f"polling {SYSFS_ONLINE} each second"


# ---------------------------------------------------------------------------- rounds

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


def _now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def _core_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


Emit = Callable[[dict], None]


class Watcher:
    """The watch loop.  ``run()`` returns the exit status (see ``exit_status``)."""

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
        self.prev_online: set[int] | None = None
        self.prev_possible: set[int] | None = None
        self.prev_findings: dict[tuple, Finding] = {}
        self.prev_frames: dict[int, tuple] = {}
        self._frames_base = False           # a first look at the frames has been taken
        self.last_error: InspectError | None = None
        self.frames_seen: Counter = Counter()
        self.hotplug_total: Counter = Counter()
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
        out: list[dict] = []
        try:
            target = self._ensure_target()
            reads0, bytes0 = target.core.reads, target.core.bytes_read
            state = load_state(target)
            result = audit(state)
            self._compare(state, result, res, events, out)
            res.pages_read = target.mem.stats.pages_read
            res.core_reads = target.core.reads - reads0
            res.bytes_read = target.core.bytes_read - bytes0
        except InspectError as e:
            res.error = e.line()
            self.last_error = e
            self._close_target()
        res.wall_seconds = time.perf_counter() - t0
        res.cpu_seconds = time.process_time() - c0
        res.frames_seen = dict(self.frames_seen)
        res.hotplug_events = dict(self.hotplug_total)
        for ev in out:
            self.emit(ev)
        if res.error is not None and trigger != "start":   # a failed start raises instead
            self.emit({"event": "error", "time": _now_iso(), "round": res.number,
                       "message": res.error})
        if self.on_round is not None:       # the textfile is current when the event is out
            try:
                self.on_round(res)
            except InspectError as e:       # e.g. the textfile could not be written
                res.output_error = e.line()
                self.output_failures += 1
                self.emit({"event": "error", "time": _now_iso(), "round": res.number,
                           "message": res.output_error})
        self.worst = max(self.worst, res.exit_status)
        self.last = res
        self.emit(self._round_event(res))
        return res

    def _compare(self, state: EspfixState, result: AuditResult, res: RoundResult,
                 events: list[CpuEvent], out: list[dict]) -> None:
        now = _now_iso()
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
                out.append({"event": "finding", "time": now, "change": "new", **f.as_dict()})
        for key, f in self.prev_findings.items():
            if key not in cur:
                out.append({"event": "finding", "time": now, "change": "gone", **f.as_dict()})
        self.prev_findings = cur

        if self.config.frames:
            self._frames(state, res, now, out)

    def _frames(self, state: EspfixState, res: RoundResult, now: str, out: list[dict]) -> None:
        first_look = not self._frames_base
        self._frames_base = True
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
                out.append({"event": "espfix_frame", "time": now, "cpu": cpu,
                            "frame": _hexed(frame), "seen": self.frames_seen[cpu]})
        res.frames_held = sorted(frames)
        self.prev_frames = frames

    def _hotplug_event(self, now: str, cpu: int, action: str, source: str,
                       state: EspfixState, result: AuditResult) -> dict:
        st = state.cpus.get(cpu)
        mine = [f.as_dict() for f in result.findings
                if f.cpu == cpu or (f.affects is not None and cpu in f.affects)]
        ev = {"event": "hotplug", "time": now, "cpu": cpu, "action": action, "source": source,
              "possible": st is not None, "online": st.online if st else False,
              "initialised": st.initialised if st else False,
              "espfix_stack": f"{st.espfix_stack:#x}" if st and st.initialised else None,
              "ok": cpu not in result.per_cpu_bad, "findings": mine}
        return ev

    def _round_event(self, res: RoundResult) -> dict:
        ev: dict = {"event": "round", "time": _now_iso(), "round": res.number,
                    "trigger": res.trigger, "up": res.up, "ok": res.ok}
        if self.config.textfile:
            ev["textfile"] = {"written": res.output_error is None, "error": res.output_error}
        if res.up:
            counts = Counter(f.severity for f in res.findings)
            ev.update({"summary": {s: counts.get(s, 0) for s in ("error", "warning", "info")},
                       "osrelease": res.osrelease,
                       "cpus_possible": format_cpu_list(res.possible),
                       "cpus_online": format_cpu_list(res.online),
                       "cpus_initialised": format_cpu_list(res.initialised),
                       "frames_held": format_cpu_list(res.frames_held) if self.config.frames
                       else None,
                       "frames_new": format_cpu_list(res.frames_new) if self.config.frames
                       else None})
        ev["cost"] = {"cpu_seconds": round(res.cpu_seconds, 6),
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
            self.emit({"event": "error", "time": _now_iso(), "round": self.rounds,
                       "message": f"reload refused, old configuration kept: {e.line()}"})
            return False
        changes = self.config.changes(new)
        self.config = new
        if "core" in changes or "symbols" in changes:
            self._close_target()      # the next round opens the new core/symbols
            self.prev_frames.clear()
            self._frames_base = False
        if "hotplug" in changes or "core" in changes:
            self._setup_hotplug(self.config.core == KCORE_PATH)
        self.emit({"event": "reload", "time": _now_iso(), "config": self.config_path,
                   "changed": changes})
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
            self.emit({"event": "error", "time": _now_iso(), "round": self.rounds,
                       "message": f"hotplug source failed ({e.strerror or e}): falling back "
                                  f"to polling {SYSFS_ONLINE}"})
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
            self._setup_hotplug(self.config.core == KCORE_PATH)
            cfg = self.config
            self.emit({"event": "start", "time": _now_iso(), "version": __version__,
                       "pid": os.getpid(), "core": cfg.core, "symbols": cfg.symbols,
                       "interval": cfg.interval, "count": cfg.count, "hotplug": self.hotplug_desc,
                       "textfile": cfg.textfile, "config": self.config_path,
                       "frames": cfg.frames})
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
        self.emit({"event": "stop", "time": _now_iso(), "reason": reason,
                   "rounds": self.rounds, "wall_seconds": round(wall, 3),
                   "cpu_seconds": round(cpu_total, 6),
                   "cpu_share": round(cpu_total / wall, 6) if wall > 0 else None,
                   "output_failures": self.output_failures, "exit": status})
        return status


# ---------------------------------------------------------------------------- text

def _cost(c: dict) -> str:
    return (f"{c['cpu_seconds'] * 1000:.1f} ms CPU ({c['cpu_share_of_interval'] * 100:.2f}% "
            f"of the interval), {c['wall_seconds'] * 1000:.1f} ms wall, "
            f"{c['pages_read']} pages read")


def event_text(ev: dict) -> str:
    """One readable line per event (the journal's view of ``watch``)."""
    t = ev.get("time", "")
    kind = ev["event"]
    if kind == "start":
        text = (f"start: watching {ev['core']} every {ev['interval']:g} s"
                + (f", {ev['count']} round(s)" if ev["count"] else "")
                + f"; hotplug: {ev['hotplug']}"
                + (f"; textfile {ev['textfile']}" if ev["textfile"] else "")
                + ("" if ev["frames"] else "; frames not tracked"))
    elif kind == "round":
        head = f"round {ev['round']} ({ev['trigger']}): "
        if not ev["up"]:
            text = head + f"COULD NOT INSPECT; {_cost(ev['cost'])}"
        else:
            s = ev["summary"]
            frames = ""
            if ev["frames_held"] is not None:
                frames = (f"; frames held {ev['frames_held'] or '-'}, new "
                          f"{ev['frames_new'] or '-'}")
            kernel = f"{ev['osrelease']}, " if ev["trigger"] == "start" else ""
            text = (head + f"{'OK' if ev['ok'] else 'FINDINGS'} ({s['error']} error(s), "
                    f"{s['warning']} warning(s), {s['info']} info); {kernel}CPUs "
                    f"online {ev['cpus_online'] or '-'}, initialised "
                    f"{ev['cpus_initialised'] or '-'} of {ev['cpus_possible']}{frames}; "
                    f"{_cost(ev['cost'])}")
        if ev.get("textfile") and not ev["textfile"]["written"]:
            text += "; TEXTFILE NOT WRITTEN"
    elif kind == "hotplug":
        state = "online" if ev["online"] else "offline"
        stack = f"espfix_stack {ev['espfix_stack']}" if ev["initialised"] \
            else "no ministack (espfix_stack 0)"
        text = (f"hotplug: cpu{ev['cpu']} {ev['action']} ({ev['source']}): now {state}, "
                f"{stack}, {'ok' if ev['ok'] else 'BAD'}")
        if not ev["possible"]:
            text = f"hotplug: cpu{ev['cpu']} {ev['action']} ({ev['source']}): not possible"
    elif kind == "finding":
        cpu = "" if ev.get("cpu") is None else f" cpu{ev['cpu']}"
        text = f"finding {ev['change']}: {ev['severity']} {ev['check']}{cpu}: {ev['message']}"
    elif kind == "espfix_frame":
        f = ev["frame"]
        text = (f"espfix frame cpu{ev['cpu']} (new #{ev['seen']}): rip={f['rip']} "
                f"cs={f['cs']} rflags={f['rflags']} rsp={f['rsp']} ss={f['ss']} rax={f['rax']}")
    elif kind == "reload":
        ch = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in ev["changed"].items()) or "no change"
        text = f"reload: {ev['config'] or 'command line'}: {ch}"
    elif kind == "error":
        text = f"error: {ev['message']}"
    elif kind == "stop":
        share = "" if ev["cpu_share"] is None else f" ({ev['cpu_share'] * 100:.3f}% of one CPU)"
        text = (f"stop ({ev['reason']}): {ev['rounds']} round(s) in {ev['wall_seconds']:.1f} s, "
                f"{ev['cpu_seconds']:.3f} s CPU{share}, exit {ev['exit']}")
    else:
        text = f"{kind}: {ev}"
    return f"{t} {text}".strip()


def event_severity(ev: dict) -> str | None:
    """"error" or "warning" for an event the journal should rank above info, else None.

    A new finding keeps its own severity; a round that could not inspect and an
    error event are errors; a hotplugged CPU that failed its check is a warning
    (its findings follow as finding events).  ``watch`` turns this into a
    ``<3>``/``<4>`` prefix when stdout is the journal (inspector.journal).
    """
    kind = ev.get("event")
    if kind == "finding":
        return ev.get("severity") if ev.get("change") == "new" else None
    if kind == "error" or (kind == "round" and not ev.get("up", True)):
        return "error"
    if kind == "hotplug" and ev.get("possible") and not ev.get("ok", True):
        return "warning"
    return None
