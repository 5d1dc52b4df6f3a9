"""Read /proc/kallsyms on another thread while Python starts the live commands.

A live ``validate`` waits for the kernel to format /proc/kallsyms (``kernel/kallsyms.c``
``s_show()``, one line per symbol: 176,000 on Debian's 6.12) and, before that, imports
its modules and builds its argument parser.  The first is kernel time and the second
Python's; nothing orders them.  So ``python3 -m inspector`` (and ``cli.main``, a little
later) starts a thread that reads the file while the main thread imports: the
thread spends its time in ``read()`` with the GIL released.  Under QEMU/TCG both took
about 0.35 s of a 1.3 s live validate (README, Performance).

The bytes are handed to :func:`~inspector.symbols.load_symbols` once, in this
process, for the path they were read from (:func:`take`); nothing is kept across runs.
Reading stops at the first module line: /proc/kallsyms lists the kernel's own symbols
first and then, each with ``\\t[module]``, those of modules, BPF and ftrace
(``update_iter()``), which the inspector never uses.  If the thread cannot open or read
the file, it leaves nothing and the normal read reports the error.
"""

from __future__ import annotations

import os
import threading

__all__ = ["KALLSYMS", "live_argv", "start", "take"]

KALLSYMS = "/proc/kallsyms"
#: Commands that read /proc/kallsyms unless given --core/--symbols (or --no-kcore).
LIVE_COMMANDS = frozenset({"validate", "stacks", "snapshot", "watch", "exercise"})
CHUNK = 1 << 20
#: A kernel's own lines are ~10 MB; past this the thread gives up (the normal read decides).
LIMIT = 64 << 20

_pending: dict[str, tuple[threading.Thread, list[bytes]]] = {}


def live_argv(argv: list[str]) -> bool:
    """Does this command line read the live /proc/kallsyms?  A guess from the words
    alone (argparse has not run yet); a wrong guess only wastes or skips the head start."""
    if not argv or argv[0] not in LIVE_COMMANDS:
        return False
    return not any(a in ("-h", "--help", "--no-kcore") or a.startswith(("--core", "--symbols"))
                   for a in argv[1:])


def _read_vmlinux_lines(path: str, out: list[bytes]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    chunks = []
    size = 0
    try:
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if b"\t[" in chunk:          # the first module line: the kernel's own are done
                break
            if size > LIMIT:
                return
    except OSError:
        return
    finally:
        os.close(fd)
    out.append(b"".join(chunks))


def start(path: str = KALLSYMS) -> None:
    """Begin reading *path* on a daemon thread (once per path)."""
    if path in _pending:
        return
    out: list[bytes] = []
    thread = threading.Thread(target=_read_vmlinux_lines, args=(path, out),
                              name="kallsyms-prefetch", daemon=True)
    thread.start()
    _pending[path] = (thread, out)


def take(path: str) -> bytes | None:
    """The bytes a :func:`start` read from *path* (waiting for it), once; else None."""
    entry = _pending.pop(path, None)
    if entry is None:
        return None
    thread, out = entry
    thread.join()
    return out[0] if out else None
