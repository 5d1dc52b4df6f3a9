"""espfix-inspect: inspect the x86-64 espfix64 ministacks of a kernel.

The CLI only parses, calls and prints.  Exit codes: 0 all good, 1 findings,
2 could not inspect (one line on stderr naming the cause and the fix).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from . import trace_cli, watch_cli
from .cliutil import INPUTS, PROG, HelpFormatter, Terminated
from .errors import EXIT_CANNOT_INSPECT, EXIT_FINDINGS, EXIT_OK, InspectError
from .journal import prefix, stream_is_journal
from .safetext import print_out
from .model import (ESPFIX_MAX_CPUS, Randomness, cpu_layout, format_cpu_list, group_layouts,
                    memory_cost, parse_cpu_list)
from .target import KCORE_PATH

EXAMPLES = """examples:
    espfix-inspect layout --cpus 8 --rand 0x5eed1234abcd   # expected layout, no kernel needed
    espfix-inspect layout --cpus 131072 --summary           # cost at the maximum
    espfix-inspect validate                 # live: /proc/kcore + /proc/kallsyms (root)
    espfix-inspect validate --json          # machine-readable findings
    espfix-inspect validate --core vmcore --symbols System.map-6.1.0-41-amd64
    espfix-inspect validate --core samples/bookworm-6.1-l5.core   # a shipped snapshot
    espfix-inspect stacks                   # each CPU's ministack and last IRET frame
    espfix-inspect stacks --cpu 0-3 --json
    espfix-inspect snapshot -o espfix.core  # save what validate reads, for offline use
    espfix-inspect exercise                 # run the 16-bit-SS return path on every CPU
    espfix-inspect exercise --cpu 1 --duration 1 --json
    espfix-inspect trace 30                 # BCC: init_espfix_ap, modify_ldt, espfix returns

exit status: 0 all good, 1 findings (errors or warnings), 2 could not inspect
"""


def _cpu_list(text: str) -> list[int]:
    try:
        cpus = parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad CPU list {text[:40]!r}: {e} (use e.g. 0-3,8; "
                                         f"CPUs 0..{ESPFIX_MAX_CPUS - 1})") from None
    if not cpus:
        raise argparse.ArgumentTypeError("the CPU list is empty (use e.g. 0-3,8)")
    return cpus


def _cpu_count(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus takes a number, got {text!r}") from None
    if not 1 <= n <= ESPFIX_MAX_CPUS:
        raise argparse.ArgumentTypeError(f"--cpus must be 1..{ESPFIX_MAX_CPUS}")
    return n


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--core", default=KCORE_PATH, metavar="FILE",
                   help="ELF core: /proc/kcore (default), a kdump vmcore or a snapshot")
    p.add_argument("--symbols", metavar="FILE",
                   help="kallsyms/System.map text or a vmlinux (default: /proc/kallsyms for "
                        "/proc/kcore, the embedded symbols of a snapshot)")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Inspect the Linux x86-64 espfix64 ministacks: expected layout, live "
                    "state from /proc/kcore or a saved core, and the difference.",
        epilog=EXAMPLES)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show a traceback for internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("layout", help="the expected layout from the kernel's formula",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n    espfix-inspect layout --cpus 4 --page-random 687 "
                              "--slot-random 13\n    espfix-inspect layout --cpu-list 0-3,64 "
                              "--levels 4 --json\n")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cpus", type=_cpu_count, metavar="N", help="CPUs 0..N-1 (default 4)")
    g.add_argument("--cpu-list", type=_cpu_list, metavar="LIST", help="CPUs, e.g. 0-3,64")
    p.add_argument("--page-random", type=_int, metavar="P", help="page_random (0..2047)")
    p.add_argument("--slot-random", type=_int, metavar="S", help="slot_random (0..63)")
    p.add_argument("--rand", type=_int, metavar="R",
                   help="the boot-time random number init_espfix_random() drew")
    p.add_argument("--levels", type=int, choices=(4, 5), default=5, help="paging levels")
    p.add_argument("--summary", action="store_true", help="groups and cost only, no CPU rows")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("validate", help="check the live state against the kernel's rules",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n    espfix-inspect validate\n    espfix-inspect "
                              "validate --core vmcore --symbols vmlinux --json\n")
    _source_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="always print the CPU table")

    p = sub.add_parser("stacks", help="each CPU's ministack and the IRET frame it holds",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n    espfix-inspect stacks\n    espfix-inspect stacks "
                              "--cpu 1 --json\n")
    _source_args(p)
    p.add_argument("--cpu", type=_cpu_list, metavar="LIST", help="only these CPUs")

    p = sub.add_parser("snapshot", help="save what the inspector reads as a small ELF core",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n    espfix-inspect snapshot -o espfix.core\n"
                              "    espfix-inspect validate --core espfix.core\n")
    _source_args(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="snapshot file")

    p = sub.add_parser("exercise", help="run the 16-bit-SS return path on each CPU (ptrace + "
                       "modify_ldt) and check nothing leaks",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n    espfix-inspect exercise\n    espfix-inspect "
                              "exercise --cpu 0,2 --duration 1\n    espfix-inspect exercise "
                              "--no-kcore --json      # round trips only\n\nexit status: 0 "
                              "every round trip ok, 1 a leak, a missing ministack frame or "
                              "no progress, 2 could not exercise\n")
    p.add_argument("--cpu", type=_cpu_list, metavar="LIST",
                   help="CPUs to exercise (default: every CPU this process may run on)")
    p.add_argument("--duration", type=float, default=0.25, metavar="S",
                   help="seconds per round trip (default 0.25; 4 rounds per CPU)")
    p.add_argument("--no-kcore", action="store_true",
                   help="skip the ministack cross-check through /proc/kcore")
    p.add_argument("--control", action="store_true",
                   help="add a negative control: a flat-SS round that must leave no "
                        "ministack frame (needs /proc/kcore)")
    p.add_argument("--json", action="store_true", help="print JSON")
    for mod in EXTENSIONS:
        mod.add_parser(sub)
    return parser


#: Command families kept in their own modules (each has add_parser(sub) and COMMANDS).
EXTENSIONS = (trace_cli, watch_cli)


def _randomness(args: argparse.Namespace) -> Randomness:
    if args.rand is not None:
        if args.page_random is not None or args.slot_random is not None:
            raise InspectError("--rand and --page-random/--slot-random exclude each other",
                               "give one form")
        return Randomness.from_rand(args.rand)
    try:
        return Randomness(args.page_random or 0, args.slot_random or 0)
    except ValueError as e:
        raise InspectError(str(e), "page_random is 0..2047, slot_random 0..63") from None


def cmd_layout(args: argparse.Namespace) -> int:
    from .report import layout_text, write_layout_json
    cpus = args.cpu_list if args.cpu_list is not None else list(range(args.cpus or 4))
    if not cpus:
        raise InspectError("the CPU list is empty", "give --cpus N or a non-empty --cpu-list")
    rnd = _randomness(args)
    if args.json:
        write_layout_json(sys.stdout, cpus, rnd, args.levels)
        return EXIT_OK
    from .progress import Progress
    with Progress("layout: cpu", len(cpus)) as progress:    # stderr, a terminal only
        layouts = []
        for n, c in enumerate(cpus, 1):
            if not n & 1023:
                progress.update(n)
            layouts.append(cpu_layout(c, rnd, args.levels))
        progress.update(len(cpus))
        groups = group_layouts(cpus, rnd)
        cost = memory_cost(cpus)
        text = layout_text(layouts, groups, cost, rnd, args.levels, not args.summary,
                           progress=lambda n: progress.update(n, "layout: table row"))
    print_out(text)
    return EXIT_OK


def _open(args: argparse.Namespace):
    from .hostfacts import target_host_facts
    from .state import load_state
    from .target import open_target
    target = open_target(args.core, args.symbols)
    try:
        return target, load_state(target, target_host_facts(target))
    except BaseException:
        target.close()
        raise


def cmd_validate(args: argparse.Namespace) -> int:
    from .audit import audit
    from .report import validate_text, write_validate_json
    target, state = _open(args)
    with target.core:
        result = audit(state)
        if args.json:
            write_validate_json(sys.stdout, state, result)     # ASCII JSON: nothing to escape
        else:
            print_out(validate_text(state, result, args.verbose,
                                    journal=stream_is_journal(1)))
    return EXIT_OK if result.ok else EXIT_FINDINGS


def cmd_stacks(args: argparse.Namespace) -> int:
    from .report import stacks_text, write_stacks_json
    target, state = _open(args)
    with target.core:
        cpus = list(state.cpus) if args.cpu is None else args.cpu
        missing = [c for c in cpus if c not in state.cpus]
        if missing:
            raise InspectError(f"CPU {missing[0]} is not possible on this kernel "
                               f"(possible: {len(state.cpus)} CPUs)", "pick CPUs from --cpu 0-"
                               f"{max(state.cpus)}")
        if args.json:
            write_stacks_json(sys.stdout, state, cpus)
        else:
            print_out(stacks_text(state, cpus))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .report import dumps, snapshot_json
    from .snapshot import take_snapshot
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise InspectError(f"directory {out_dir} does not exist", "create it or pick another -o")
    summary = take_snapshot(args.core, args.symbols, args.output)
    if args.json:
        print_out(dumps(snapshot_json(summary)))
    else:
        print_out(f"wrote {summary['file']}: {summary['bytes']} bytes, {summary['segments']} "
              f"segments, {summary['cpus']} CPUs of {summary['osrelease']}")
    return EXIT_OK


def _live_state_or_note(args: argparse.Namespace):
    """(target, state, None) when /proc/kcore can be read, else (None, None, why not)."""
    if args.no_kcore:
        return None, None, "--no-kcore"
    try:
        target, state = _open(argparse.Namespace(core=KCORE_PATH, symbols=None))
    except InspectError as e:
        return None, None, e.cause
    return target, state, None


def cmd_exercise(args: argparse.Namespace) -> int:
    from .exercise import FINDING_VERDICTS, exercise
    from .report import dumps, exercise_json, exercise_text
    if not 0.01 <= args.duration <= 60:
        raise InspectError(f"--duration {args.duration} is out of range", "use 0.01..60 s")
    allowed = sorted(os.sched_getaffinity(0))
    cpus = args.cpu if args.cpu is not None else allowed
    if not cpus:
        raise InspectError("no CPU to exercise: this process's CPU affinity is empty",
                           "pick CPUs with --cpu")
    refused = [c for c in cpus if c not in allowed]
    if refused:
        raise InspectError(f"CPU {refused[0]} is not online or not in this process's "
                           f"affinity ({format_cpu_list(allowed)})",
                           f"pick CPUs from {format_cpu_list(allowed)}")
    target, state, note = _live_state_or_note(args)
    if args.control and state is None:
        raise InspectError(f"--control needs the ministack cross-check, which is off: {note}",
                           "run as root where /proc/kcore is readable")
    from .progress import Progress
    try:
        with Progress("cpu", len(cpus)) as progress:     # stderr, a terminal only
            rounds = exercise(cpus, args.duration, state, args.control, progress=progress.update)
    finally:
        if target is not None:
            target.close()
    findings = any(r.verdict in FINDING_VERDICTS for r in rounds)
    none_ran = not findings and not any(r.verdict == "ok" for r in rounds)
    if not (args.json and none_ran):        # --json: the error document says it instead
        print_out(dumps(exercise_json(rounds, note)) if args.json
                  else exercise_text(rounds, note))
    if findings:
        return EXIT_FINDINGS
    if none_ran:
        raise InspectError("no exercise round could run: the children never got a CPU",
                           "run again on a less busy machine, or with a longer --duration")
    return EXIT_OK


COMMANDS = {"layout": cmd_layout, "validate": cmd_validate, "stacks": cmd_stacks,
            "snapshot": cmd_snapshot, "exercise": cmd_exercise}


def _terminated(*_: object) -> None:
    raise Terminated()


def _fail(args: argparse.Namespace | None, line: str, cause: str, fix: str = "") -> int:
    """Exit 2: the one line on stderr and, when the command was given ``--json``, the
    error document (inspector/schemas/error.schema.json) on stdout, so that a consumer
    of the JSON learns why there is no document."""
    if args is not None and getattr(args, "json", None):
        import json

        from .schema import error_doc
        try:
            print_out(json.dumps(error_doc(args.command, cause, fix)), flush=True)
        except OSError:             # stdout is gone: the line on stderr still says it
            pass
    print_out(line, err=True)
    return EXIT_CANNOT_INSPECT


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args: argparse.Namespace | None = None
    inputs: dict[str, dict[str, str]] = {}
    try:
        parser = build_parser()
        args = parser.parse_args(argv)     # usage errors: argparse's message, exit 2
        signal.signal(signal.SIGTERM, _terminated)
        commands = dict(COMMANDS)
        for mod in EXTENSIONS:
            commands.update(mod.COMMANDS)
            inputs.update(getattr(mod, "COMMAND_INPUTS", {}))
        return commands[args.command](args)
    except Terminated:
        return _fail(args, f"{PROG}: terminated by SIGTERM (children killed, nothing left "
                     "behind)", "terminated by SIGTERM")
    except InspectError as e:
        words = inputs.get(args.command, INPUTS) if args is not None else INPUTS
        return _fail(args, f"{prefix('error', stream_is_journal(2))}{PROG}: {e.line(words)}",
                     e.cause, e.advice(words))
    except KeyboardInterrupt:
        return _fail(args, f"{PROG}: interrupted", "interrupted")
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except MemoryError:
        return _fail(args, f"{PROG}: out of memory: the input is far larger than any real "
                     "kernel's (or the memory limit is too low)", "out of memory",
                     "the input is far larger than any real kernel's (or the memory limit "
                     "is too low)")
    except Exception as e:  # a bug, or input no check anticipated
        if debug:
            import traceback            # only here: it imports _colorize (and dataclasses on 3.14)
            traceback.print_exc()
        cause = f"internal error: {type(e).__name__}: {e}"
        return _fail(args, f"{PROG}: {cause} (rerun with --debug and report it)", cause,
                     "rerun with --debug and report it")


if __name__ == "__main__":
    sys.exit(main())
