"""Deterministic mutation fuzzing of espfix-inspect's input boundary.

    python3 -m tests.helpers.fuzz --count 1500 --seed 1          # what tests/test_fuzz.py runs
    python3 -m tests.helpers.fuzz --count 20000 --seed 7 --save tests/data/fuzz   # a long run

Bases: the real snapshots in samples/, snapshots of synthetic kernels (small and dense:
nearly every byte is one the inspector reads), a raw synthetic core with its kallsyms,
System.map and vmlinux, and a ``validate --json`` document (for ``diff``).  Each mutant
is one operator applied to one base (seeded: the same seed gives the same mutants):

  ehdr      an ELF header field (offsets, counts, sizes, class, type)
  phdr      a program-header field (type, offset, addresses, sizes)
  nhdr      a note header (namesz, descsz, type)
  vmcinfo   one VMCOREINFO line: blank, NUL, non-ASCII, not a number, huge,
            negative, misaligned, duplicated or dropped
  meta      the snapshot's metadata JSON: a field given a wrong type or range
  syms      the snapshot's embedded symbols: an address or a line damaged
  truncate  the file cut short
  zero      a range of bytes zeroed
  overlap   one PT_LOAD moved onto another
  word      a 64-bit word of segment data (page-table entries, per-CPU words,
            ministacks) replaced by a value chosen to hurt
  symfile   a kallsyms/System.map line or a vmlinux header/string-table byte damaged
  json      a validate --json document with a field of the wrong type (diff's input)

Each mutant runs through ``validate``, ``stacks`` and, for some, ``diff`` in this process
(``inspector.cli.main``).  The oracle: exit 0 or 1, or exit 2 with exactly one line on
stderr that names a cause (never "internal error", never a traceback, never "out of
memory"); within TIME_LIMIT seconds; the process's peak RSS below RSS_LIMIT; no file
descriptor left open; no raw control character in text output.  A failing mutant is
written to ``--save DIR`` with a JSON sidecar, and tests/test_fuzz.py replays every
saved one as a regression.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from inspector.cli import main as cli_main  # noqa: E402
from inspector.elfcore import ElfCore  # noqa: E402
from inspector.elfwrite import LoadSegment, NoteEntry, write_core  # noqa: E402
from tests.helpers.jsonschemas import loads as checked_loads  # noqa: E402

TIME_LIMIT = 10.0            # seconds per command
RSS_LIMIT = 1 << 30          # peak resident set of the whole fuzzing process
AS_LIMIT = 6 << 30           # address-space backstop, so a runaway cannot take the host
REGRESSIONS = os.path.join(ROOT, "tests", "data", "fuzz")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

INTERESTING64 = (0, 1, 0x1000, 0xFE0, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000,
                 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_F000, 1 << 32, 1 << 52, 0x40,
                 0xFFFFFF0000000FE0, 0xFFFFFF4A0000DFE0, 0xFFFFFFFF80000000)


class Timeout(BaseException):
    """Raised by SIGALRM: a BaseException, so main()'s `except Exception` cannot eat it."""


@dataclass
class Base:
    name: str
    core: bytes
    symbols: bytes | None = None          # a separate symbol file, if the base needs one
    symbols_kind: str = ""                # kallsyms, system.map, vmlinux
    segments: list[LoadSegment] = field(default_factory=list)
    notes: list[NoteEntry] = field(default_factory=list)
    doc: dict | None = None               # validate --json of the base


@dataclass
class Mutant:
    base: Base
    op: str
    core: bytes
    symbols: bytes | None
    json_doc: bytes | None = None         # a diff input instead of a core


# ---------------------------------------------------------------------------- bases

def _decompose(path: str) -> tuple[list[LoadSegment], list[NoteEntry]]:
    core = ElfCore(path)
    try:
        segs = []
        for s in core.segments:
            data = core._read_in(s, 0, s.filesz) if s.filesz else b""
            segs.append(LoadSegment(s.vaddr, data, s.paddr, s.memsz))
        notes = [NoteEntry(n.name, n.type, n.desc) for n in core.notes]
        return segs, notes
    finally:
        core.close()


def make_bases(workdir: str) -> list[Base]:
    """The real samples, synthetic snapshots and a raw synthetic core with symbols."""
    from inspector.snapshot import take_snapshot
    from tests.helpers.synthcore import SynthKernel, SynthSpec
    bases: list[Base] = []
    samples = os.path.join(ROOT, "samples")
    for name in sorted(os.listdir(samples)):
        if name.endswith(".core"):
            path = os.path.join(samples, name)
            segs, notes = _decompose(path)
            bases.append(Base(name, open(path, "rb").read(), segments=segs, notes=notes))
    specs = {
        "synth-l4-pti-frames": SynthSpec(levels=4, pti=True, nr_cpus=6,
                                         frames={1: (0, 0x401000, 0x33, 0x202,
                                                     0x7A5EC0DE1230, 0x7)}),
        "synth-l5-relative-70cpus": SynthSpec(levels=5, percpu="relative", nr_cpus=70,
                                              online=list(range(66))),
        "synth-l5-numa2": SynthSpec(nodes=2, nr_cpus=8),
    }
    for name, spec in specs.items():
        k = SynthKernel(spec)
        core, syms, snap = (os.path.join(workdir, f"{name}.{ext}")
                            for ext in ("core", "syms", "snap"))
        k.write(core, syms, "kallsyms")
        take_snapshot(core, syms, snap)
        segs, notes = _decompose(snap)
        bases.append(Base(name + ".snap", open(snap, "rb").read(), segments=segs,
                          notes=notes))
    k = SynthKernel(SynthSpec(levels=4, nr_cpus=4))
    for kind in ("kallsyms", "system.map", "vmlinux"):
        core, syms = (os.path.join(workdir, f"raw-{kind}.{ext}") for ext in ("core", "syms"))
        k.write(core, syms, kind)
        bases.append(Base(f"raw-synth+{kind}", open(core, "rb").read(),
                          open(syms, "rb").read(), kind))
    for b in bases:
        b.doc = _validate_doc(b, workdir)
    return bases


def _validate_doc(b: Base, workdir: str) -> dict | None:
    core, syms = _write_inputs(workdir, "doc", b.core, b.symbols, b.symbols_kind)
    argv = ["validate", "--json", "--core", core] + (["--symbols", syms] if syms else [])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli_main(argv)
    return checked_loads(out.getvalue(), "validate") if rc in (0, 1) else None


def _write_inputs(workdir: str, tag: str, core: bytes, symbols: bytes | None,
                  kind: str) -> tuple[str, str | None]:
    cpath = os.path.join(workdir, f"{tag}.core")
    with open(cpath, "wb") as f:
        f.write(core)
    spath = None
    if symbols is not None:
        # a kallsyms must be called "kallsyms" to be read as one (symbols.load_symbols)
        spath = os.path.join(workdir, "kallsyms" if kind == "kallsyms" else f"{tag}.syms")
        with open(spath, "wb") as f:
            f.write(symbols)
    return cpath, spath


# ---------------------------------------------------------------------------- operators

EHDR_FIELDS = ((4, "B"), (5, "B"), (16, "H"), (18, "H"), (32, "Q"), (40, "Q"), (52, "H"),
               (54, "H"), (56, "H"), (58, "H"), (60, "H"), (62, "H"))
PHDR_FIELDS = ((0, "I"), (4, "I"), (8, "Q"), (16, "Q"), (24, "Q"), (32, "Q"), (40, "Q"),
               (48, "Q"))


def _interesting(rng: random.Random, fmt: str, old: int) -> int:
    bits = struct.calcsize(fmt) * 8
    mask = (1 << bits) - 1
    choice = rng.randrange(9)
    if choice == 0:
        return 0
    if choice == 1:
        return mask
    if choice == 2:
        return 1 << (bits - 1)
    if choice == 3:
        return (old + rng.choice((1, -1, 8, 4096, -4096))) & mask
    if choice == 4:
        return (old << rng.randrange(1, 8)) & mask
    if choice == 5:
        return rng.getrandbits(bits)
    if choice == 6:
        return (old | 1 << rng.randrange(bits)) & mask
    if choice == 7:
        return rng.choice(INTERESTING64) & mask
    return old >> rng.randrange(1, bits)


def _patch(data: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, off, value)
    return bytes(b)


def op_ehdr(rng: random.Random, b: Base) -> Mutant | None:
    off, fmt = rng.choice(EHDR_FIELDS)
    old = struct.unpack_from("<" + fmt, b.core, off)[0]
    return Mutant(b, "ehdr", _patch(b.core, off, fmt, _interesting(rng, fmt, old)), b.symbols)


def _phdrs(core: bytes) -> tuple[int, int]:
    return struct.unpack_from("<Q", core, 32)[0], struct.unpack_from("<H", core, 56)[0]


def op_phdr(rng: random.Random, b: Base) -> Mutant | None:
    phoff, phnum = _phdrs(b.core)
    i = rng.randrange(phnum)
    off, fmt = rng.choice(PHDR_FIELDS)
    at = phoff + 56 * i + off
    old = struct.unpack_from("<" + fmt, b.core, at)[0]
    return Mutant(b, "phdr", _patch(b.core, at, fmt, _interesting(rng, fmt, old)), b.symbols)


def _note_segment(core: bytes) -> tuple[int, int] | None:
    phoff, phnum = _phdrs(core)
    for i in range(phnum):
        ptype, _, off, _, _, filesz = struct.unpack_from("<IIQQQQ", core, phoff + 56 * i)
        if ptype == 4:
            return off, filesz
    return None


def op_nhdr(rng: random.Random, b: Base) -> Mutant | None:
    seg = _note_segment(b.core)
    if seg is None:
        return None
    off, size = seg
    heads = []
    pos = off
    while pos + 12 <= off + size:
        namesz, descsz, _ = struct.unpack_from("<III", b.core, pos)
        heads.append(pos)
        pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    at = rng.choice(heads) + 4 * rng.randrange(3)
    old = struct.unpack_from("<I", b.core, at)[0]
    return Mutant(b, "nhdr", _patch(b.core, at, "I", _interesting(rng, "I", old)), b.symbols)


def _rebuild(b: Base, notes: list[NoteEntry], workdir: str) -> bytes:
    path = os.path.join(workdir, "rebuild.core")
    write_core(path, b.segments, notes)
    with open(path, "rb") as f:
        return f.read()


VMCI_VALUES = ("", " ", "\0", "0\0", "\xff\xfe", "zz", "0x", "-", "1" * 30, "-1",
               "18446744073709551616", "ffffffffffffffff", "123abc", "0x1000", "1001",
               "201000", "-200001", "2", "7fffffff")


def op_vmcinfo(rng: random.Random, b: Base, workdir: str) -> Mutant | None:
    notes = list(b.notes)
    idx = [i for i, n in enumerate(notes) if n.name == "VMCOREINFO"]
    if not idx:
        return None
    i = idx[0]
    lines = notes[i].desc.rstrip(b"\0").decode("latin-1").split("\n")
    lines = [ln for ln in lines if ln]
    j = rng.randrange(len(lines))
    key, _, value = lines[j].partition("=")
    how = rng.randrange(4)
    if how == 0:
        lines[j] = f"{key}={rng.choice(VMCI_VALUES)}"
    elif how == 1:
        lines.pop(j)
    elif how == 2:
        lines.insert(j, f"{key}={rng.choice(VMCI_VALUES)}")
    else:
        lines[j] = f"{key}={value}{rng.choice(VMCI_VALUES)}"
    notes[i] = NoteEntry("VMCOREINFO", notes[i].type, ("\n".join(lines) + "\n").encode("latin-1"))
    return Mutant(b, "vmcinfo", _rebuild(b, notes, workdir), b.symbols)


WRONG_JSON = ([], {}, "", "x", -1, 1 << 70, 3.5, None, True, [[[]]], {"0": "a"},
              {"x": 1}, "0-100000000", [1, "2"], {"1": 99999}, 0, 4097)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(rng: random.Random, doc: object) -> object:
    doc = json.loads(json.dumps(doc))
    path = rng.choice(_paths(doc))
    if not path:
        return rng.choice(WRONG_JSON)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]                      # type: ignore[index]
    if rng.randrange(5) == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(WRONG_JSON)   # type: ignore[index]
    return doc


def op_meta(rng: random.Random, b: Base, workdir: str) -> Mutant | None:
    notes = list(b.notes)
    idx = [i for i, n in enumerate(notes) if n.name == "ESPFIX-INSPECT" and n.type == 2]
    if not idx:
        return None
    i = idx[0]
    if rng.randrange(6) == 0:
        desc = rng.choice((b"{", b"[]", b"\xff", b"{\"host\": []}", b"null", b"1e999999"))
    else:
        desc = json.dumps(_mutate_json(rng, json.loads(notes[i].desc))).encode()
    notes[i] = NoteEntry(notes[i].name, 2, desc)
    return Mutant(b, "meta", _rebuild(b, notes, workdir), b.symbols)


def _damage_symbol_lines(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    j = rng.randrange(len(lines))
    parts = lines[j].split()
    how = rng.randrange(6)
    if how == 0 and parts:
        parts[0] = rng.choice(("", "zz", "1" * 40, "ffffffffffffffff", "0", "-1",
                               f"{rng.getrandbits(64):x}"))
    elif how == 1 and len(parts) > 1:
        parts[1] = rng.choice(("", "TT", "\x1b", "?"))
    elif how == 2 and len(parts) > 2:
        parts[2] = rng.choice(("", "\x1b[2J", "x" * 300, parts[2] + "\x00"))
    elif how == 3:
        lines.pop(j)
        return "\n".join(lines) + "\n"
    elif how == 4:
        lines.insert(j, lines[j])
    else:
        parts = parts[:1]
    lines[j] = " ".join(parts)
    return "\n".join(lines) + "\n"


def op_syms(rng: random.Random, b: Base, workdir: str) -> Mutant | None:
    notes = list(b.notes)
    idx = [i for i, n in enumerate(notes) if n.name == "ESPFIX-INSPECT" and n.type == 1]
    if not idx:
        return None
    i = idx[0]
    text = _damage_symbol_lines(rng, notes[i].desc.decode("latin-1"))
    notes[i] = NoteEntry(notes[i].name, 1, text.encode("latin-1"))
    return Mutant(b, "syms", _rebuild(b, notes, workdir), b.symbols)


def op_truncate(rng: random.Random, b: Base) -> Mutant | None:
    n = len(b.core)
    cut = rng.choice((rng.randrange(0, 64), rng.randrange(64, 1024), rng.randrange(n),
                      n - rng.randrange(1, 4096)))
    return Mutant(b, "truncate", b.core[:max(0, cut)], b.symbols)


def op_zero(rng: random.Random, b: Base) -> Mutant | None:
    n = len(b.core)
    start = rng.randrange(n)
    length = rng.choice((8, 64, 512, 4096, rng.randrange(1, n)))
    data = bytearray(b.core)
    data[start:start + length] = bytes(min(length, n - start))
    return Mutant(b, "zero", bytes(data), b.symbols)


def op_overlap(rng: random.Random, b: Base) -> Mutant | None:
    phoff, phnum = _phdrs(b.core)
    loads = [i for i in range(phnum)
             if struct.unpack_from("<I", b.core, phoff + 56 * i)[0] == 1]
    if len(loads) < 2:
        return None
    src, dst = rng.sample(loads, 2)
    data = bytearray(b.core)
    for off in (16, 24) if rng.randrange(2) else (rng.choice((16, 24)),):
        v = struct.unpack_from("<Q", data, phoff + 56 * src + off)[0]
        v = (v + rng.choice((0, 8, 4096, 0x800))) & ((1 << 64) - 1)
        struct.pack_into("<Q", data, phoff + 56 * dst + off, v)
    return Mutant(b, "overlap", bytes(data), b.symbols)


def op_word(rng: random.Random, b: Base) -> Mutant | None:
    phoff, phnum = _phdrs(b.core)
    loads = []
    for i in range(phnum):
        ptype, _, off, _, _, filesz = struct.unpack_from("<IIQQQQ", b.core, phoff + 56 * i)
        if ptype == 1 and filesz >= 8:
            loads.append((off, filesz))
    if not loads:
        return None
    off, size = rng.choice(loads)
    at = off + 8 * rng.randrange(size // 8)
    old = struct.unpack_from("<Q", b.core, at)[0]
    how = rng.randrange(4)
    if how == 0:
        new = old ^ rng.choice((0x2, 0x4, 1 << 63, 0x1, 0x80, 0x100))   # RW USER NX P PSE G
    elif how == 1:
        new = (old & ~0xFFF) ^ (rng.randrange(1, 1 << 20) << 12) | (old & 0xFFF)
    else:
        new = _interesting(rng, "Q", old)
    return Mutant(b, "word", _patch(b.core, at, "Q", new & ((1 << 64) - 1)), b.symbols)


def op_symfile(rng: random.Random, b: Base) -> Mutant | None:
    if b.symbols is None:
        return None
    if b.symbols_kind != "vmlinux":
        text = _damage_symbol_lines(rng, b.symbols.decode("latin-1"))
        return Mutant(b, "symfile", b.core, text.encode("latin-1"))
    data = b.symbols
    shoff = struct.unpack_from("<Q", data, 40)[0]
    shnum = struct.unpack_from("<H", data, 60)[0]
    if rng.randrange(2):          # a section header field (sizes, offsets, links)
        i = rng.randrange(shnum)
        off, fmt = rng.choice(((0, "I"), (4, "I"), (24, "Q"), (32, "Q"), (40, "I"),
                               (44, "I"), (56, "Q")))
        at = shoff + 64 * i + off
        if at + struct.calcsize(fmt) > len(data):
            return None
        old = struct.unpack_from("<" + fmt, data, at)[0]
        return Mutant(b, "symfile", b.core, _patch(data, at, fmt, _interesting(rng, fmt, old)))
    # a byte of the string tables (the last 2 KiB before the section headers)
    at = rng.randrange(max(0, shoff - 2048), shoff)
    out = bytearray(data)
    out[at] = rng.choice((0, 0xFF, 0x1B, ord("A")))
    return Mutant(b, "symfile", b.core, bytes(out))


def op_json(rng: random.Random, b: Base) -> Mutant | None:
    if b.doc is None:
        return None
    return Mutant(b, "json", b.core, b.symbols,
                  json.dumps(_mutate_json(rng, b.doc)).encode())


Operator = Callable[..., "Mutant | None"]
OPERATORS: dict[str, tuple[Operator, bool]] = {      # name -> (function, needs workdir)
    "ehdr": (op_ehdr, False), "phdr": (op_phdr, False), "nhdr": (op_nhdr, False),
    "vmcinfo": (op_vmcinfo, True), "meta": (op_meta, True), "syms": (op_syms, True),
    "truncate": (op_truncate, False), "zero": (op_zero, False),
    "overlap": (op_overlap, False), "word": (op_word, False),
    "symfile": (op_symfile, False), "json": (op_json, False),
}
#: "word" hits the data the checks read; it gets more of the budget.
WEIGHTS = {"word": 4, "vmcinfo": 2, "phdr": 2, "meta": 2, "syms": 2, "json": 2}


# ---------------------------------------------------------------------------- oracle

def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _on_alarm(*_: object) -> None:
    raise Timeout()


def run_cli(argv: list[str]) -> tuple[int, str, str, float, str | None]:
    """(exit status, stdout, stderr, seconds, failure or None) of one in-process run."""
    out, err = io.StringIO(), io.StringIO()
    fds = _open_fds()
    t0 = time.monotonic()
    failure = None
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main(argv)
    except Timeout:
        rc, failure = -1, f"took more than {TIME_LIMIT:g} s"
    except SystemExit as e:                # argparse; not expected with these argv
        rc = e.code if isinstance(e.code, int) else 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.monotonic() - t0
    o, e = out.getvalue(), err.getvalue()
    if failure is None:
        failure = judge(rc, o, e, argv)
    leaked = _open_fds() - fds
    if failure is None and leaked:
        failure = f"left {len(leaked)} file descriptor(s) open"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if failure is None and rss > RSS_LIMIT:
        failure = f"peak RSS {rss >> 20} MiB is over {RSS_LIMIT >> 20} MiB"
    return rc, o, e, seconds, failure


def judge(rc: int, out: str, err: str, argv: list[str]) -> str | None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "--json" not in argv and _CONTROL.search(out):
        return "raw control character in text output"
    if rc in (0, 1):
        return None if not lines else f"exit {rc} with stderr: {err[:200]!r}"
    if rc != 2:
        return f"exit status {rc}"
    if len(lines) != 1:
        return f"exit 2 with {len(lines)} stderr lines: {err[:300]!r}"
    line = lines[0]
    if not line.startswith("espfix-inspect: ") or "internal error" in line \
            or "Traceback" in line or "out of memory" in line:
        return f"exit 2 without a cause: {line[:300]}"
    if _CONTROL.search(line):
        return "raw control character on stderr"
    return None


# ---------------------------------------------------------------------------- driver

@dataclass
class Outcome:
    op: str
    base: str
    argv: list[str]
    rc: int
    seconds: float
    failure: str | None
    stderr: str


def commands(m: Mutant, core: str, syms: str | None, doc: str | None,
             original: str, rng_index: int) -> list[list[str]]:
    s = ["--symbols", syms] if syms else []
    if doc is not None:
        return [["diff", doc, original] + ([] if not syms else [])]
    cmds = [["validate", "--core", core, *s], ["stacks", "--core", core, *s]]
    if rng_index % 4 == 0:
        cmds.append(["validate", "--json", "--core", core, *s])
    if rng_index % 4 == 1 and not syms:
        cmds.append(["diff", core, original])
    return cmds


def fuzz(count: int, seed: int, save: str | None = None,
         progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    work = tempfile.mkdtemp(prefix="espfix-fuzz-")
    try:
        bases = make_bases(work)
        ops = [name for name, _ in OPERATORS.items() for _ in range(WEIGHTS.get(name, 1))]
        made = 0
        attempts = 0
        while made < count and attempts < count * 20:
            attempts += 1
            b = rng.choice(bases)
            name = rng.choice(ops)
            fn, needs_dir = OPERATORS[name]
            m = fn(rng, b, work) if needs_dir else fn(rng, b)
            if m is None:
                continue
            made += 1
            outcomes += run_mutant(m, work, made, save)
            if progress is not None:
                progress(made, count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return outcomes


def run_mutant(m: Mutant, work: str, index: int, save: str | None) -> list[Outcome]:
    core, syms = _write_inputs(work, "mutant", m.core, m.symbols, m.base.symbols_kind)
    original = os.path.join(work, "original.core")
    with open(original, "wb") as f:
        f.write(m.base.core)
    doc = None
    if m.json_doc is not None:
        doc = os.path.join(work, "mutant.json")
        with open(doc, "wb") as f:
            f.write(m.json_doc)
        original_doc = os.path.join(work, "original.json")
        with open(original_doc, "w") as f:
            json.dump(m.base.doc, f)
        original = original_doc
    out = []
    for argv in commands(m, core, syms, doc, original, index):
        rc, _, err, seconds, failure = run_cli(argv)
        out.append(Outcome(m.op, m.base.name, argv, rc, seconds, failure, err.strip()))
        if failure is not None and save:
            keep(m, argv, failure, save)
    return out


def keep(m: Mutant, argv: list[str], failure: str, directory: str) -> str:
    """Write a failing mutant (and its symbol file or JSON input) for replay."""
    os.makedirs(directory, exist_ok=True)
    blob = m.json_doc if m.json_doc is not None else m.core
    digest = hashlib.sha256(blob + (m.symbols or b"")).hexdigest()[:12]
    stem = os.path.join(directory, f"{m.op}-{digest}")
    files = {"input": os.path.basename(stem) + (".json" if m.json_doc is not None else ".core")}
    with open(os.path.join(directory, files["input"]), "wb") as f:
        f.write(blob)
    if m.symbols is not None and m.json_doc is None:
        files["symbols"] = os.path.basename(stem) + ("-kallsyms" if m.base.symbols_kind ==
                                                      "kallsyms" else ".syms")
        with open(os.path.join(directory, files["symbols"]), "wb") as f:
            f.write(m.symbols)
    if m.json_doc is not None:
        files["against"] = m.base.name
    meta = {"op": m.op, "base": m.base.name, "command": argv[0], "failure": failure,
            "symbols_kind": m.base.symbols_kind, **files}
    with open(stem + ".case.json", "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return stem


def replay_argv(case_path: str) -> list[list[str]]:
    """The commands that replay a saved failing mutant (its ``.case.json``)."""
    with open(case_path) as f:
        case = json.load(f)
    directory = os.path.dirname(case_path)
    inp = os.path.join(directory, case["input"])
    if case["op"] == "json":
        against = os.path.join(ROOT, "samples", "bookworm-6.1-l5.core")
        return [["diff", inp, against], ["diff", against, inp]]
    syms = ["--symbols", os.path.join(directory, case["symbols"])] if "symbols" in case else []
    return [["validate", "--core", inp, *syms], ["stacks", "--core", inp, *syms],
            ["validate", "--json", "--core", inp, *syms]]


def limit_memory() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > AS_LIMIT:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, hard))


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    by_op: dict[str, dict[str, int]] = {}
    for o in outcomes:
        d = by_op.setdefault(o.op, {"runs": 0, "exit0": 0, "exit1": 0, "exit2": 0, "failed": 0})
        d["runs"] += 1
        d["failed"] += o.failure is not None
        if o.rc in (0, 1, 2):
            d[f"exit{o.rc}"] += 1
    slowest = max((o.seconds for o in outcomes), default=0.0)
    return {"runs": len(outcomes), "seconds": round(seconds, 1),
            "failures": [{"op": o.op, "base": o.base, "command": o.argv[0],
                          "failure": o.failure} for o in outcomes if o.failure],
            "slowest_run_seconds": round(slowest, 3),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
            "by_operator": by_op}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.helpers.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1500, help="mutants (default 1500)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--save", metavar="DIR", help="write failing mutants here for replay")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    limit_memory()
    t0 = time.monotonic()
    outcomes = fuzz(args.count, args.seed, args.save)
    summary = summarize(outcomes, time.monotonic() - t0)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.count} mutants, {summary['runs']} runs in {summary['seconds']} s, "
              f"slowest run {summary['slowest_run_seconds']} s, peak RSS "
              f"{summary['peak_rss_mib']} MiB, {len(summary['failures'])} failure(s)")
        for op, d in sorted(summary["by_operator"].items()):
            print(f"  {op:9} {d}")
        for f in summary["failures"][:50]:
            print(f"FAIL {f['op']} {f['base']} {f['command']}: {f['failure']}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
