"""Hostile input, one case per failure the input-safety review found: each ends in one
clear line and exit 2 (or a named finding and exit 1), never an internal error, a hang,
unbounded memory, a wrong success or raw terminal control."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys

import pytest

from inspector.cli import main
from inspector.elfwrite import NoteEntry, write_core
from tests.helpers import fuzz, jsonschemas
from tests.conftest import kernel

SAMPLE = os.path.join(fuzz.ROOT, "samples", "bookworm-6.1-l5.core")


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "internal error" not in lines[0] and "Traceback" not in err
    return lines[0]


def rebuild(src: str, dst: str, edit) -> str:
    """Copy core *src* to *dst* with its notes passed through edit(list[NoteEntry])."""
    segs, notes = fuzz._decompose(src)
    write_core(dst, segs, edit(list(notes)))
    return dst


def with_vmcoreinfo(src: str, dst: str, key: str, value: str | None) -> str:
    def edit(notes):
        out = []
        for n in notes:
            if n.name == "VMCOREINFO":
                lines = [ln for ln in n.desc.decode("latin-1").splitlines()
                         if not ln.startswith(key + "=")]
                if value is not None:
                    lines.append(f"{key}={value}")
                n = NoteEntry(n.name, n.type, ("\n".join(lines) + "\n").encode("latin-1"))
            out.append(n)
        return out
    return rebuild(src, dst, edit)


def with_meta(src: str, dst: str, change) -> str:
    def edit(notes):
        out = []
        for n in notes:
            if n.name == "ESPFIX-INSPECT" and n.type == 2:
                meta = json.loads(n.desc)
                change(meta)
                n = NoteEntry(n.name, 2, json.dumps(meta).encode())
            out.append(n)
        return out
    return rebuild(src, dst, edit)


# -- VMCOREINFO values ---------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("NUMBER(phys_base)", ""), ("NUMBER(phys_base)", "12\0"), ("NUMBER(phys_base)", "zz"),
    ("NUMBER(phys_base)", "1" * 30), ("NUMBER(pgtable_l5_enabled)", "7"),
    ("NUMBER(pgtable_l5_enabled)", "\xff"), ("NUMBER(sme_mask)", "3"),
    ("NUMBER(sme_mask)", "x"), ("KERNELOFFSET", ""), ("KERNELOFFSET", "-1"),
    ("KERNELOFFSET", "ffffffffffffffff"), ("OSRELEASE", ""), ("OSRELEASE", "x" * 65),
    ("OSRELEASE", "6.1\x1b[2J"), ("PAGESIZE", "65536"), ("SYMBOL(init_top_pgt)", "q"),
])
def test_bad_vmcoreinfo_value_names_the_key(capsys, tmp_path, key, value):
    core = with_vmcoreinfo(SAMPLE, str(tmp_path / "c.core"), key, value)
    rc, _, err = run(capsys, "validate", "--core", core)
    assert rc == 2
    line = one_line(err)
    assert f"VMCOREINFO {key}=" in line and "not valid" in line
    assert "\x1b" not in line


def test_misaligned_kaslr_offset_is_a_finding(capsys, write_kernel):
    """A KERNELOFFSET that is not a multiple of CONFIG_PHYSICAL_ALIGN used to pass."""
    core, syms = write_kernel(kernel(kaslr_offset=0x2A401000))
    rc, out, _ = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 1
    assert "kernel_image" in out and "CONFIG_PHYSICAL_ALIGN" in out


def test_misaligned_phys_base_is_a_finding(capsys, tmp_path):
    core = with_vmcoreinfo(SAMPLE, str(tmp_path / "c.core"), "NUMBER(phys_base)",
                           str(501219328 + 0x1000))
    rc, out, err = run(capsys, "validate", "--core", core)
    # every image read moves by 4 KiB: either the reads fail (exit 2, one line) or the
    # finding names the misalignment
    assert (rc == 1 and "kernel_image" in out) or (rc == 2 and one_line(err))


# -- CPU masks ----------------------------------------------------------------------

def test_online_cpu_outside_possible_is_a_finding(capsys, write_kernel):
    k = kernel(nr_cpus=4)
    k.write_mask("__cpu_possible_mask", [1, 2, 3])
    core, syms = write_kernel(k)
    rc, out, _ = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 1
    assert "cpu_masks" in out and "online but not possible" in out


def test_empty_online_mask_is_a_finding(capsys, write_kernel):
    k = kernel(nr_cpus=4)
    k.write_mask("__cpu_online_mask", [])
    core, syms = write_kernel(k)
    rc, out, _ = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 1
    assert "no CPU is online" in out


def test_mask_bits_beyond_nr_cpu_ids_are_a_finding(capsys, write_kernel):
    k = kernel(nr_cpus=4)
    k.write_mask("__cpu_possible_mask", [0, 1, 2, 3, 9])
    core, syms = write_kernel(k)
    rc, out, _ = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 1
    assert "at or beyond nr_cpu_ids" in out


# -- ELF headers ----------------------------------------------------------------------

@pytest.mark.parametrize(("off", "fmt", "value", "needle"), [
    (32, "Q", 0x8000000000000040, "outside the file"),
    (32, "Q", (1 << 64) - 1, "outside the file"),
    (54, "H", 40, "not 56"),
    (56, "H", 0xFFFF, "extended numbering"),
    (4, "B", 1, "not an x86-64 ELF"),
])
def test_elf_header_fields_out_of_range(capsys, tmp_path, off, fmt, value, needle):
    data = bytearray(open(SAMPLE, "rb").read())
    struct.pack_into("<" + fmt, data, off, value)
    bad = tmp_path / "bad.core"
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, "validate", "--core", str(bad))
    assert rc == 2
    assert needle in one_line(err)


def test_damaged_vmlinux_string_table(capsys, write_kernel, tmp_path):
    core, vmlinux = write_kernel(kernel(), "vmlinux")
    data = bytearray(open(vmlinux, "rb").read())
    shoff = struct.unpack_from("<Q", data, 40)[0]
    struct.pack_into("<Q", data, shoff + 64 * 3 + 24, 1 << 62)     # .strtab sh_offset
    bad = tmp_path / "vmlinux"
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(bad))
    assert rc == 2
    assert "unreadable vmlinux" in one_line(err)


# -- snapshot metadata ----------------------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda m: m.__setitem__("host", []),
    lambda m: m["host"].__setitem__("cpu_node", ["0"]),
    lambda m: m["host"].__setitem__("cpu_node", {"x": 0}),
    lambda m: m["host"].__setitem__("cpu_node", {"0": "node0"}),
    lambda m: m["host"].__setitem__("block_size", "134217728"),
    lambda m: m["host"].__setitem__("block_size", 3),
    lambda m: m["host"].__setitem__("online", "0-3"),
    lambda m: m["host"].__setitem__("fred", "no"),
], ids=["host-list", "cpu_node-list", "cpu_node-key", "cpu_node-value", "block_size-str",
        "block_size-odd", "online-str", "fred-str"])
def test_snapshot_metadata_with_wrong_types(capsys, tmp_path, change):
    core = with_meta(SAMPLE, str(tmp_path / "m.core"), change)
    for cmd in ("validate", "stacks"):
        rc, _, err = run(capsys, cmd, "--core", core)
        assert rc == 2
        assert "snapshot" in one_line(err)


# -- diff inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda d: d["findings"].append({"check": "x", "severity": "error", "cpu": None,
                                    "message": "m", "cpus": [1]}),
    lambda d: d["cpus"][0].__setitem__("cpu", [0]),
    lambda d: d.__setitem__("kernel", []),
    lambda d: d["cpus"].append("cpu9"),
    lambda d: d.__setitem__("findings", {}),
], ids=["cpus-list", "cpu-list", "kernel-list", "cpu-row-str", "findings-object"])
def test_diff_json_with_wrong_types(capsys, tmp_path, change):
    rc, out, _ = run(capsys, "validate", "--json", "--core", SAMPLE)
    doc = jsonschemas.loads(out)
    change(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    rc, _, err = run(capsys, "diff", str(bad), SAMPLE)
    assert rc == 2
    assert "is not a validate --json document: at " in one_line(err)


def test_our_own_validate_json_matches_the_schema(capsys):
    from inspector.diff import check_validate_doc
    for name in sorted(os.listdir(os.path.dirname(SAMPLE))):
        if name.endswith(".core"):
            path = os.path.join(os.path.dirname(SAMPLE), name)
            rc, out, _ = run(capsys, "validate", "--json", "--core", path)
            check_validate_doc(jsonschemas.loads(out), path)


# -- frames across a page end -------------------------------------------------------

def test_slot_at_page_offset_0xfe0_is_shown_unreadable(capsys, write_kernel, tmp_path):
    k = kernel(nr_cpus=4)
    k.set_percpu(2, "espfix_stack", (k.get_percpu(2, "espfix_stack") & ~0xFFF) | 0xFE0)
    core, syms = write_kernel(k)
    rc, out, err = run(capsys, "stacks", "--core", core, "--symbols", syms)
    assert rc == 0, err
    assert "cpu 2: frame unreadable: espfix_stack" in out and "across the page end" in out
    rc, out, _ = run(capsys, "stacks", "--json", "--core", core, "--symbols", syms)
    row = jsonschemas.loads(out)["cpus"][2]
    assert row["frame"] is None and "across the page end" in row["frame_error"]
    snap = str(tmp_path / "snap.core")
    rc, _, err = run(capsys, "snapshot", "--core", core, "--symbols", syms, "-o", snap)
    assert rc == 0, err
    rc, out, _ = run(capsys, "validate", "--core", snap)
    assert rc == 1 and "espfix_stack" in out


# -- CPU lists ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["stacks", "--core", SAMPLE, "--cpu", "0-100000000"],
    ["layout", "--cpu-list", "0-100000000"],
    ["layout", "--cpu-list", "0-" + "9" * 5000],
    ["layout", "--cpu-list", "1-x"],
    ["layout", "--cpu-list", ""],
])
def test_cpu_lists_are_bounded_before_expansion(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad CPU list" in err or "empty" in err


# -- non-regular files and unbounded reads --------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("argv", [
    ["validate", "--core", "{fifo}"],
    ["validate", "--core", SAMPLE, "--symbols", "{fifo}"],
    ["diff", "{fifo}", SAMPLE],
    ["watch", "--config", "{fifo}", "1", "1"],
    ["validate", "--core", SAMPLE, "--symbols", "/dev/zero"],
    ["validate", "--core", SAMPLE, "--symbols", "/dev/urandom"],
    ["diff", "/dev/zero", SAMPLE],
    ["watch", "--config", "/dev/zero", "1", "1"],
    ["validate", "--core", "/dev/null"],
])
def test_non_regular_inputs_are_refused_at_once(fifo, argv):
    """A FIFO blocked in open() forever; /dev/zero grew memory until MemoryError."""
    argv = [a.format(fifo=fifo) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "inspector", *argv], cwd=fuzz.ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not a regular file" in one_line(proc.stderr)


def test_huge_symbol_file_is_bounded(capsys, tmp_path, monkeypatch):
    import inspector.symbols as symbols
    monkeypatch.setattr(symbols, "MAX_SYMBOL_TEXT", 1 << 16)
    big = tmp_path / "System.map"
    big.write_text("ffffffff81000000 T _text\n" * 10000)
    rc, _, err = run(capsys, "validate", "--core", SAMPLE, "--symbols", str(big))
    assert rc == 2
    assert "larger than" in one_line(err)


# -- output files ---------------------------------------------------------------------

def test_snapshot_is_private(capsys, tmp_path):
    out = tmp_path / "snap.core"
    old = os.umask(0o022)
    try:
        rc, _, err = run(capsys, "snapshot", "--core", SAMPLE, "-o", str(out))
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


def test_snapshot_mode_is_never_wider_than_the_umask(capsys, tmp_path):
    out = tmp_path / "snap.core"
    old = os.umask(0o077 | 0o200)
    try:
        rc, _, err = run(capsys, "snapshot", "--core", SAMPLE, "-o", str(out))
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o400


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dir"])
def test_snapshot_refuses_a_non_regular_target(capsys, tmp_path, kind):
    target = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "real").write_bytes(b"keep")
        os.symlink(tmp_path / "real", target)
    else:
        target.mkdir()
    rc, _, err = run(capsys, "snapshot", "--core", SAMPLE, "-o", str(target))
    assert rc == 2
    assert "would be replaced by a regular file" in one_line(err)
    if kind == "symlink":
        assert os.path.islink(target) and (tmp_path / "real").read_bytes() == b"keep"


def test_watch_exit_status_reports_failed_textfile_writes(capsys, tmp_path, monkeypatch):
    import inspector.prom as prom
    from inspector.errors import InspectError

    def fail(directory, text):
        raise InspectError(f"cannot write {directory}/espfix_inspect.prom: No space left "
                           "on device", "free space")
    monkeypatch.setattr(prom, "write_textfile", fail)
    rc, out, err = run(capsys, "watch", "--json", "--core", SAMPLE, "--textfile",
                       str(tmp_path), "0.1", "2")
    assert rc == 2
    events = jsonschemas.loads_lines(out)
    rounds = [e for e in events if e["event"] == "round"]
    assert rounds and all(r["textfile"] == {"written": False, "error": rounds[0]["textfile"]
                                            ["error"]} for r in rounds)
    assert "No space left" in rounds[0]["textfile"]["error"]
    stop = events[-1]
    assert stop["event"] == "stop" and stop["output_failures"] == 2 and stop["exit"] == 2
    assert "No space left" in err


# -- terminal safety ------------------------------------------------------------------

def test_strings_from_a_core_are_escaped_on_the_terminal(capsys, tmp_path, write_kernel):
    k = kernel(osrelease="6.1.0-99-amd64")
    core, syms = write_kernel(k)
    evil = with_vmcoreinfo(core, str(tmp_path / "evil.core"), "OSRELEASE",
                           "6.1\x9b2J-amd64")          # C1 CSI: printable in latin-1? no
    rc, _, err = run(capsys, "validate", "--core", evil, "--symbols", syms)
    assert rc == 2 and "\x9b" not in err and "\\x9b" in err


def test_diff_messages_from_json_are_escaped(capsys, tmp_path):
    rc, out, _ = run(capsys, "validate", "--json", "--core", SAMPLE)
    doc = jsonschemas.loads(out)
    doc["findings"].append({"check": "walk", "severity": "error", "cpu": 0,
                            "message": "\x1b]0;owned\x07\x1b[2J"})
    doc["ok"] = False
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps(doc))
    rc, out, err = run(capsys, "diff", str(bad), SAMPLE)
    assert rc == 1
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07" in out
