"""Prometheus metrics for node_exporter's textfile collector.

``watch --textfile DIR`` renders each :class:`~inspector.watch.RoundResult` in
the Prometheus text exposition format (version 0.0.4: ``# HELP``/``# TYPE``
lines, then samples, no timestamps) and writes ``DIR/espfix_inspect.prom``
atomically: a temporary file in the same directory (``.espfix_inspect.prom.*``,
which the collector's ``*.prom`` glob skips), fsync, rename.  node_exporter
never reads half a file.

The kernel's randomisation (``page_random``/``slot_random``) and addresses are
deliberately not exported: metrics are readable by far more people than
/proc/kcore is.
"""

from __future__ import annotations

import os

from .audit import FINDING_NAMES, SEVERITIES
from .fileio import atomic_output
from .errors import InspectError
from .watch import RoundResult

__all__ = ["METRICS", "TEXTFILE_NAME", "render", "write_textfile", "check_textfile_dir"]

TEXTFILE_NAME = "espfix_inspect.prom"

P = "espfix_inspect_"
#: name as written in the file -> (type, help, label names).  docs/metrics.md is generated
#: from this dict (``python3 -m tests.helpers.gendocs``); tests/test_prom.py holds the textfile to it.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    P + "up": ("gauge", "1 if the last round could read the kernel's espfix state, 0 if it "
                        "could not (see the watch log for the cause).", ()),
    P + "validation_ok": ("gauge", "1 if the last validation found no error and no warning.",
                          ()),
    P + "findings": ("gauge", "Findings of the last validation, by check and severity.",
                     ("check", "severity")),
    P + "cpus_possible": ("gauge", "Possible CPUs (the kernel's __cpu_possible_mask).", ()),
    P + "cpus_online": ("gauge", "Online CPUs (the kernel's __cpu_online_mask).", ()),
    P + "cpus_initialised": ("gauge", "CPUs with a ministack (per-CPU espfix_stack set by "
                                      "init_espfix_ap()).", ()),
    P + "cpus_bad": ("gauge", "CPUs whose ministack failed a check in the last validation.",
                     ()),
    P + "ministack_frame_held": ("gauge", "1 if the CPU's ministack holds an IRET frame: the "
                                          "CPU took the espfix return path since boot.",
                                 ("cpu",)),
    P + "espfix_frames_seen_total": ("counter", "Rounds in which the CPU's ministack held a new "
                                                "IRET frame since watch started; each proves at "
                                                "least one espfix return on that CPU.",
                                     ("cpu",)),
    P + "hotplug_events_total": ("counter", "CPU hotplug events seen since watch started, by "
                                            "action (uevents or changes of the online mask).",
                                 ("action",)),
    P + "kernel_info": ("gauge", "The inspected kernel: release, paging levels, PTI (value 1).",
                        ("osrelease", "levels", "pti")),
    P + "rounds_total": ("counter", "Validation rounds run since watch started.", ()),
    P + "last_run_timestamp_seconds": ("gauge", "Unix time the last round started.", ()),
    P + "last_run_duration_seconds": ("gauge", "Wall-clock seconds the last round took.", ()),
    P + "last_run_cpu_seconds": ("gauge", "CPU seconds (user + system) the last round took.",
                                 ()),
}


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float | int | bool) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _Doc:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, samples: list[tuple[dict[str, str], float | int | bool]]) -> None:
        mtype, text, _ = METRICS[name]
        if not samples:
            return
        self.lines.append(f"# HELP {name} {_escape_help(text)}")
        self.lines.append(f"# TYPE {name} {mtype}")
        sample = name              # counters: TYPE names the sample, "_total" included
        for labels, value in samples:
            lab = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            self.lines.append(f"{sample}{{{lab}}} {_num(value)}" if lab
                              else f"{sample} {_num(value)}")


def render(res: RoundResult, frames: bool = True) -> str:
    """The textfile for one round (families with no known value are left out)."""
    d = _Doc()
    d.family(P + "up", [({}, res.up)])
    d.family(P + "validation_ok", [({}, res.ok)])
    if res.up:
        counts: dict[tuple[str, str], int] = {}
        for f in res.findings:
            counts[(f.check, f.severity)] = counts.get((f.check, f.severity), 0) + 1
        # every finding name the checks declare (inspector/audit.py FINDING_NAMES) gets
        # a zero series per severity, so that alerts on "> 0" see a value, not an absence
        names = list(FINDING_NAMES) + sorted({c for c, _ in counts} - set(FINDING_NAMES))
        d.family(P + "findings", [({"check": c, "severity": s}, counts.get((c, s), 0))
                                  for c in names for s in SEVERITIES])
        d.family(P + "cpus_possible", [({}, len(res.possible))])
        d.family(P + "cpus_online", [({}, len(res.online))])
        d.family(P + "cpus_initialised", [({}, len(res.initialised))])
        d.family(P + "cpus_bad", [({}, len(res.bad_cpus))])
        d.family(P + "kernel_info", [({"osrelease": res.osrelease or "", "levels": str(res.levels),
                                       "pti": "on" if res.pti else "off"}, 1)])
        if frames:
            held = set(res.frames_held)
            d.family(P + "ministack_frame_held",
                     [({"cpu": str(c)}, c in held) for c in res.initialised])
            d.family(P + "espfix_frames_seen_total",
                     [({"cpu": str(c)}, res.frames_seen.get(c, 0))
                      for c in sorted(set(res.initialised) | set(res.frames_seen))])
    d.family(P + "hotplug_events_total", [({"action": a}, res.hotplug_events.get(a, 0))
                                    for a in sorted({"online", "offline", "add", "remove"}
                                                    | set(res.hotplug_events))])
    d.family(P + "rounds_total", [({}, res.number)])
    d.family(P + "last_run_timestamp_seconds", [({}, round(res.started, 3))])
    d.family(P + "last_run_duration_seconds", [({}, round(res.wall_seconds, 6))])
    d.family(P + "last_run_cpu_seconds", [({}, round(res.cpu_seconds, 6))])
    return "\n".join(d.lines) + "\n"


def check_textfile_dir(directory: str) -> None:
    if not os.path.isdir(directory):
        raise InspectError(f"textfile directory {directory} does not exist",
                           "create it, or point --textfile at node_exporter's "
                           "--collector.textfile.directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InspectError(f"textfile directory {directory} is not writable",
                           "run as root or make the directory writable for this user")


def write_textfile(directory: str, text: str) -> str:
    """Write *text* to ``directory/espfix_inspect.prom`` atomically; returns the path.

    The file is 0644 whatever the umask: node_exporter reads it as its own user, and
    the units run with ``UMask=0077``.  It holds no address and no randomisation."""
    path = os.path.join(directory, TEXTFILE_NAME)
    try:
        with atomic_output(path, 0o644, honour_umask=False) as fh:
            fh.write(text.encode())
    except OSError as e:
        raise InspectError(f"cannot write {path}: {e.strerror or e}",
                           "check the directory's permissions and free space") from None
    return path
