"""The ``watch`` and ``diff`` commands (registered through ``cli.EXTENSIONS``).

watch: re-validate espfix every INTERVAL seconds (and at once on CPU hotplug),
report new findings and new ministack frames, optionally keep a node_exporter
textfile up to date.  diff: explain how two snapshots or validate --json
documents differ.
"""

from __future__ import annotations

import argparse

from .cliutil import PROG, HelpFormatter, reword
from .errors import EXIT_FINDINGS, EXIT_OK, InspectError
from .safetext import print_out
from .target import KCORE_PATH

__all__ = ["add_parser", "COMMANDS"]

#: watch takes its inputs as options or as watch.conf keys.
WATCH_INPUTS = {"core": "--core (or core = in the --config file)",
                "symbols": "--symbols (or symbols = in the --config file)"}
#: diff's inputs: the sides A and B, with their own symbols options.
DIFF_INPUTS = {"a": {"core": "A", "symbols": "--symbols-a"},
               "b": {"core": "B", "symbols": "--symbols-b"}}

WATCH_EXAMPLES = """examples:
    espfix-inspect watch                  # every 10 s until SIGTERM/SIGINT
    espfix-inspect watch 1 5              # every second, 5 rounds (the first at once)
    espfix-inspect watch --json 10        # one JSON object per line per event
    espfix-inspect watch --textfile /var/lib/prometheus/node-exporter 10
    espfix-inspect watch --config /etc/espfix-inspect/watch.conf   # SIGHUP re-reads it
    espfix-inspect watch --core snap.core 1 3                     # a file, re-read each round

events: start, round (with its cost), finding (new/gone), hotplug (the CPU's state
and verdict, validated at once), espfix_frame (a new IRET frame in a CPU's
ministack: that CPU took the espfix return path since the last round), reload,
error, stop.

signals: SIGTERM/SIGINT end the loop after the current round (exit 0);
SIGHUP re-reads --config (command-line options still win) and runs a round.

exit status (when COUNT rounds are done): 0 every round ok, 1 findings in some
round, 2 could not inspect (at start: one line on stderr; later: error events)
"""

DIFF_EXAMPLES = """examples:
    espfix-inspect diff samples/bookworm-6.1-l5.core samples/sid-7.x-l5.core
    espfix-inspect validate --json > host1.json   # on each machine
    espfix-inspect diff host1.json host2.json --json
    espfix-inspect diff vmcore snap.core --symbols-a System.map-6.1.0-41-amd64

exit status: 0 no difference, 1 differences, 2 could not read a side
"""


def _interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"interval must be seconds, got {text!r}") from None
    if not 0.1 <= v <= 86400:
        raise argparse.ArgumentTypeError("interval must be 0.1..86400 seconds")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"count must be a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("count must be at least 1")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("watch", help="re-validate on an interval and on CPU hotplug; report "
                       "findings and new ministack frames; Prometheus textfile",
                       formatter_class=HelpFormatter,
                       epilog=WATCH_EXAMPLES)
    p.add_argument("interval", nargs="?", type=_interval, default=None,
                   help="seconds between rounds (default 10, or the config file's)")
    p.add_argument("count", nargs="?", type=_count, default=None,
                   help="rounds to run, the first at once (default: until stopped)")
    p.add_argument("--core", default=None, metavar="FILE",
                   help=f"ELF core to watch (default {KCORE_PATH})")
    p.add_argument("--symbols", default=None, metavar="FILE",
                   help="kallsyms/System.map/vmlinux (default as for validate)")
    p.add_argument("--json", action="store_true", default=None,
                   help="one JSON object per line per event")
    p.add_argument("--textfile", metavar="DIR", default=None,
                   help="write DIR/espfix_inspect.prom after each round (node_exporter "
                        "textfile collector), atomically")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="key = value file (interval, core, symbols, textfile, json, frames, "
                        "hotplug); SIGHUP re-reads it")
    p.add_argument("--no-frames", dest="frames", action="store_false", default=None,
                   help="do not compare ministack frames between rounds")
    p.add_argument("--hotplug", choices=("auto", "poll", "off"), default=None,
                   help="auto: kernel uevents, else poll /sys/devices/system/cpu/online "
                        "(default); poll; off")

    p = sub.add_parser("diff", help="explain how two snapshots or validate --json documents "
                       "differ (kernel, randomisation, CPUs, findings)",
                       formatter_class=HelpFormatter,
                       epilog=DIFF_EXAMPLES)
    p.add_argument("a", metavar="A", help="a snapshot/core or a validate --json file")
    p.add_argument("b", metavar="B", help="the same, for the other machine or boot")
    p.add_argument("--symbols-a", metavar="FILE", help="symbols for A when it is a core "
                   "without embedded symbols")
    p.add_argument("--symbols-b", metavar="FILE", help="the same for B")
    p.add_argument("--json", action="store_true", help="print JSON")


def _print(line: str) -> None:
    print_out(line, flush=True)     # one line at a time into the journal or a pipe


def cmd_watch(args: argparse.Namespace) -> int:
    from .journal import prefix, stream_is_journal
    from .prom import check_textfile_dir, render, write_textfile
    import json

    from .watch import Watcher
    from .watch_config import build_config
    from .watch_events import ErrorEvent, Event, event_json, event_severity, event_text
    overrides = {k: v for k, v in (("interval", args.interval), ("core", args.core),
                                   ("symbols", args.symbols), ("json", args.json),
                                   ("textfile", args.textfile), ("frames", args.frames),
                                   ("hotplug", args.hotplug)) if v is not None}
    config = build_config(args.config, overrides, args.count)
    if config.textfile:
        check_textfile_dir(config.textfile)

    watcher: Watcher
    journal_out, journal_err = stream_is_journal(1), stream_is_journal(2)

    def emit(ev: Event) -> None:
        mark = prefix(event_severity(ev), journal_out)     # <3>/<4> for journalctl -p
        if watcher.config.json:
            _print(mark + json.dumps(event_json(ev), separators=(",", ":")))
        else:
            _print(mark + event_text(ev))
        if isinstance(ev, ErrorEvent):
            print_out(f"{prefix('error', journal_err)}{PROG}: watch: {ev.message}", err=True)

    def on_round(res) -> None:
        directory = watcher.config.textfile
        if directory:       # a failed write raises: the watcher reports it and fails the exit
            write_textfile(directory, render(res, watcher.config.frames))

    watcher = Watcher(config, emit, on_round, config_path=args.config, overrides=overrides)
    watcher.inputs = WATCH_INPUTS
    return watcher.run()


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_docs, diff_json, diff_text, load_side
    from .report import dumps
    sides = []
    for side, path, symbols in (("a", args.a, args.symbols_a), ("b", args.b, args.symbols_b)):
        try:
            sides.append(load_side(path, symbols))
        except InspectError as e:
            raise reword(e, DIFF_INPUTS[side]) from None
    a, b = sides
    res = diff_docs(a, b)
    print_out(dumps(diff_json(res)) if args.json else diff_text(res))
    return EXIT_OK if res.same else EXIT_FINDINGS


COMMANDS = {"watch": cmd_watch, "diff": cmd_diff}
#: How each command's errors name its inputs (cli.main words the fix with it).
COMMAND_INPUTS = {"watch": WATCH_INPUTS}
