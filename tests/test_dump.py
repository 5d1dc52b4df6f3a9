"""Crash dumps on the host: the formats kdump writes, symbols from the dump, the crash
context, filtered pages and the one-line failures.

The dumps here are synthetic (tests/helpers/mkdump.py); real dumps of real kernels are read in
the VM matrix (tests/vm/test_dumps.py).  libkdumpfile's Python module is Debian's
python3-libkdumpfile, built for /usr/bin/python3 only: without it these tests skip.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from inspector.cli import main
from tests.helpers import jsonschemas
from tests.helpers.mkdump import add_kallsyms, prstatus, write_diskdump, write_elf_vmcore
from tests.helpers.synthcore import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import kdumpfile  # noqa: F401
    HAVE_KDUMPFILE = True
except ImportError:
    HAVE_KDUMPFILE = False
needs_kdumpfile = pytest.mark.skipif(
    not HAVE_KDUMPFILE,
    reason=f"needs libkdumpfile's module kdumpfile, which {sys.executable} cannot import: "
           "apt-get install python3-libkdumpfile and make .venv from /usr/bin/python3 "
           "(PYTHON=/usr/bin/python3 bash .ci/setup)")

FRAME = (0xDEAD, 0x41710000, 0x23, 0x293, 0xFFFFFF143F217FF0, 0xF)
#: entry_64.S/traps.c symbols, at made-up but ordered offsets from _stext
ENTRY = {"native_irq_return_iret": (0x1E00, "T"), "native_irq_return_ldt": (0x1E02, "t"),
         "asm_load_gs_index": (0x1EC0, "T"), "asm_exc_double_fault": (0x1C00, "T"),
         "asm_exc_general_protection": (0x1A00, "T"), "exc_double_fault": (0x3000, "T"),
         "exc_general_protection": (0x3400, "T"), "default_idle": (0x5000, "T"),
         "default_idle_end": (0x5100, "T")}


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _kernel(**kw):
    frames = kw.pop("frames", {1: FRAME})
    return build(nr_cpus=4, frames=frames, **kw)


def _entry(k):
    return {n: (k.syms["_stext"] + off, t) for n, (off, t) in ENTRY.items()}


def _dump(k, tmp_path, fmt, name="dump", registers=(), drop=frozenset(), form=None,
          vmcoreinfo=True, **kw):
    form = form or ("place-relative" if k.spec.percpu == "relative" else "absolute-percpu")
    lines = add_kallsyms(k, form, extra=_entry(k)) if vmcoreinfo else ""
    vmci = k.vmcoreinfo_text() + lines if vmcoreinfo else ""
    path = str(tmp_path / f"{name}.{fmt}")
    if fmt == "elf":
        write_elf_vmcore(k, path, vmci, list(registers), set(drop), **kw)
    else:
        write_diskdump(k, path, vmci, list(registers), set(drop),
                       flattened=fmt == "flat", **kw)
    return path


def _strip(doc):
    for key in ("core", "symbols", "live", "notes"):
        doc["kernel"].pop(key, None)
    return doc


# -- formats ---------------------------------------------------------------------

@needs_kdumpfile
@pytest.mark.parametrize("fmt", ["kdump", "flat", "elf"])
@pytest.mark.parametrize("percpu", ["zero-based", "relative"])
def test_dump_reads_as_the_core_it_was_taken_from(fmt, percpu, tmp_path, write_kernel, capsys):
    k = _kernel(percpu=percpu, levels=4, pti=True)
    core, syms = write_kernel(k)
    dump = _dump(k, tmp_path, fmt)
    rc1, live, _ = _run(capsys, "validate", "--core", core, "--symbols", syms, "--json")
    rc2, off, err = _run(capsys, "validate", "--core", dump, "--json")
    assert rc1 == rc2 == 0, err
    assert _strip(jsonschemas.loads(live)) == _strip(jsonschemas.loads(off))
    _, s1, _ = _run(capsys, "stacks", "--core", core, "--symbols", syms, "--json")
    _, s2, _ = _run(capsys, "stacks", "--core", dump, "--json")
    assert jsonschemas.loads(s1)["cpus"] == [{k2: v for k2, v in c.items() if k2 != "crash"}
                                      for c in jsonschemas.loads(s2)["cpus"]]
    assert jsonschemas.loads(s2)["cpus"][1]["frame"]["rax"] == "0xdead"


@needs_kdumpfile
def test_flattened_note_and_symbol_source(tmp_path, capsys):
    rc, out, _ = _run(capsys, "validate", "--core", _dump(_kernel(), tmp_path, "flat"))
    assert rc == 0
    assert "(kallsyms tables in memory)" in out
    assert "decoded from the kernel's kallsyms tables in the dump (absolute-percpu" in out


@needs_kdumpfile
def test_snapshot_of_a_dump_validates_the_same(tmp_path, capsys):
    k = _kernel()
    dump = _dump(k, tmp_path, "kdump")
    snap = str(tmp_path / "snap.core")
    assert _run(capsys, "snapshot", "--core", dump, "-o", snap)[0] == 0
    _, a, _ = _run(capsys, "stacks", "--core", dump, "--json")
    _, b, _ = _run(capsys, "stacks", "--core", snap, "--json")
    assert ([c["frame"] for c in jsonschemas.loads(a)["cpus"]]
            == [c["frame"] for c in jsonschemas.loads(b)["cpus"]])
    assert os.path.getsize(snap) < os.path.getsize(dump)


# -- filtered pages ----------------------------------------------------------------

@needs_kdumpfile
@pytest.mark.parametrize("fmt", ["kdump", "elf"])
def test_zero_ministack_page_filtered(fmt, tmp_path, capsys):
    k = _kernel(frames={})
    k.alloc_page(0)                                   # RAM above the stack page
    dump = _dump(k, tmp_path, fmt, drop={k.stack_pa[0]})
    rc, out, _ = _run(capsys, "stacks", "--core", dump, "--json")
    rows = jsonschemas.loads(out)["cpus"]
    assert rc == 0 and all(r["frame_state"] == "all zero, filtered" and r["frame"] is None
                           for r in rows)
    rc, text, _ = _run(capsys, "stacks", "--core", dump)
    assert "(dropped as a zero page: all zero, filtered)" in text
    assert _run(capsys, "validate", "--core", dump)[0] == 0     # validate reads no stack page


@needs_kdumpfile
def test_filtered_page_table_page_is_an_info_finding(tmp_path, capsys):
    k = _kernel()
    k.alloc_page(0)
    pte = next(iter(k.pte_pa.values()))
    dump = _dump(k, tmp_path, "kdump", drop={pte})
    rc, out, err = _run(capsys, "validate", "--core", dump, "--json")
    doc = jsonschemas.loads(out)
    skipped = [f for f in doc["findings"] if f["message"].startswith("could not run")]
    assert skipped and all(f["severity"] == "info" for f in skipped), doc["findings"]
    assert {f["check"] for f in skipped} >= {"pte_clones"}
    assert all(f["filtered_page"] == f"{pte:#x}" for f in skipped)
    assert "filtered out of" in skipped[0]["message"]


# -- symbols ------------------------------------------------------------------------

@needs_kdumpfile
@pytest.mark.parametrize("name", ["kallsyms", "kallsyms.saved"])
def test_kallsyms_of_another_boot_is_relocated(name, tmp_path, capsys):
    other = _kernel(kaslr_offset=0x1C000000, phys_base=-0x30000000)
    add_kallsyms(other, "absolute-percpu", extra=_entry(other))      # the same build
    saved = tmp_path / name
    saved.write_text(other.symbol_text())
    k = _kernel()
    dump = _dump(k, tmp_path, "kdump")
    rc, out, err = _run(capsys, "validate", "--core", dump, "--symbols", str(saved), "--json")
    assert rc == 0, err
    doc = jsonschemas.loads(out)
    delta = k.spec.kaslr_offset - 0x1C000000
    assert any(f"relocated by the KASLR difference {delta:+#x}" in n
               for n in doc["kernel"]["notes"])
    _, plain, _ = _run(capsys, "validate", "--core", dump, "--json")
    assert _strip(doc) == _strip(jsonschemas.loads(plain))


@needs_kdumpfile
def test_symbols_of_another_build_are_still_refused(tmp_path, capsys):
    other = _kernel(layout_shift=0x3000)
    add_kallsyms(other, "absolute-percpu", extra=_entry(other))
    saved = tmp_path / "kallsyms"
    saved.write_text(other.symbol_text())
    dump = _dump(_kernel(), tmp_path, "kdump")
    rc, _, err = _run(capsys, "validate", "--core", dump, "--symbols", str(saved))
    assert rc == 2 and "is from another kernel build" in err and err.count("\n") == 1


@needs_kdumpfile
def test_dump_of_a_kernel_before_6_0_asks_for_symbols(tmp_path, capsys):
    k = _kernel(osrelease="5.10.0-30-amd64")
    path = str(tmp_path / "old.kdump")
    write_diskdump(k, path, k.vmcoreinfo_text())
    rc, _, err = _run(capsys, "validate", "--core", path)
    assert rc == 2 and err.count("\n") == 1
    assert "VMCOREINFO has no kallsyms tables" in err
    assert "pass this kernel's System.map or vmlinux as --symbols (Debian: " in err


# -- no VMCOREINFO, no libkdumpfile, bad files ----------------------------------------

@needs_kdumpfile
@pytest.mark.parametrize("fmt", ["flat", "elf"])
def test_qemu_dump_without_vmcoreinfo(fmt, tmp_path, capsys):
    k = _kernel()
    kw = {"qemu_notes": True} if fmt == "elf" else {"utsname": False}
    dump = _dump(k, tmp_path, fmt, vmcoreinfo=False, registers=[{}] * 4, **kw)
    rc, _, err = _run(capsys, "validate", "--core", dump)
    assert rc == 2 and err.count("\n") == 1
    assert "has no VMCOREINFO: it was written by QEMU's dump-guest-memory" in err
    assert "-device vmcoreinfo" in err and "modprobe qemu_fw_cfg" in err


@needs_kdumpfile
def test_elf_vmcore_without_vmcoreinfo_from_elsewhere(tmp_path, capsys):
    dump = _dump(_kernel(), tmp_path, "elf", vmcoreinfo=False, registers=[{}])
    rc, _, err = _run(capsys, "validate", "--core", dump)
    assert rc == 2 and "has no VMCOREINFO note, so nothing says where the kernel is" in err


def test_missing_libkdumpfile_is_one_line(tmp_path):
    k = _kernel()
    path = str(tmp_path / "d.kdump")
    write_diskdump(k, path, k.vmcoreinfo_text())
    code = ("import sys; sys.modules['kdumpfile'] = None; from inspector.cli import main; "
            f"sys.exit(main(['validate', '--core', {path!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, (ROOT, os.environ.get("PYTHONPATH"))))})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "needs libkdumpfile's Python module kdumpfile" in proc.stderr
    assert "apt-get install python3-libkdumpfile" in proc.stderr


@needs_kdumpfile
def test_truncated_flattened_dump(tmp_path, capsys):
    path = _dump(_kernel(), tmp_path, "flat")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    rc, _, err = _run(capsys, "validate", "--core", path)
    assert rc == 2 and err.count("\n") == 1 and "truncated" in err


def test_unknown_file_is_not_a_dump(tmp_path, capsys):
    path = tmp_path / "junk"
    path.write_bytes(b"PAGEDU64" + bytes(4096))
    rc, _, err = _run(capsys, "validate", "--core", str(path))
    assert rc == 2 and "not an ELF core" in err


# -- the crash context ----------------------------------------------------------------

def _regs(k, cpu, **kw):
    r = {"cs": 0x10, "ss": 0x18, "rflags": 0x46, "gs_base": k.offsets[cpu],
         "rip": k.syms["_stext"] + ENTRY["default_idle"][0] + 6,
         "rsp": 0xFFFFC90000010000 + 0x4000 * cpu}
    r.update(kw)
    return r


@needs_kdumpfile
@pytest.mark.parametrize("fmt", ["kdump", "elf"])
def test_crash_context_places_rsp_and_rip(fmt, tmp_path, capsys):
    k = _kernel()
    stx = k.syms["_stext"]
    alias = k.get_percpu(1, "espfix_stack") | 0x3F210000
    regs = [_regs(k, 0, cs=0x33, ss=0x2B, rip=0x401000, rsp=0x7FFD0000, gs_base=0),
            _regs(k, 1, rip=stx + ENTRY["native_irq_return_iret"][0], rsp=alias + 8),
            _regs(k, 2, rip=stx + ENTRY["exc_double_fault"][0] + 0x21,
                  rsp=0xFFFFFF7000001000),
            _regs(k, 3)]
    dump = _dump(k, tmp_path, fmt, registers=regs)
    rc, out, err = _run(capsys, "stacks", "--core", dump, "--json")
    assert rc == 0, err
    doc = jsonschemas.loads(out)
    crash = {r["cpu"]: r["crash"] for r in doc["cpus"]}
    assert "one per vCPU in order" in doc["crash"]["source"]
    assert crash[0]["mode"] == "user" and crash[0]["verdict"] == "not in espfix"
    assert crash[1]["rip_espfix"] == "espfix IRET" and crash[1]["rsp_ministack_cpu"] == 1
    assert crash[1]["rip_symbol"] == "native_irq_return_iret"
    assert crash[1]["percpu_confirmed"] is True
    assert crash[2]["rip_espfix"] == "double-fault handler (espfix64 fixup)"
    assert crash[2]["rsp_espfix_area"] and crash[2]["rsp_ministack_cpu"] is None
    assert crash[2]["rip_symbol"] == "exc_double_fault+0x21"
    assert crash[3]["verdict"] == "not in espfix" and crash[3]["rip_symbol"] == "default_idle+0x6"
    rc, text, _ = _run(capsys, "stacks", "--core", dump)
    assert "RIP in espfix IRET; RSP on its own ministack alias" in text
    assert "RSP in the espfix area, on no CPU's ministack" in text


@needs_kdumpfile
def test_crash_notes_in_memory_win_over_note_order(tmp_path, capsys):
    k = _kernel()
    k.sym("crash_notes", k._alloc(8, 8), "D")
    k.put_u64(k.syms["crash_notes"], k.percpu_start + 0x1000)
    k.sym("panic_cpu", k._alloc(4, 4), "D")
    k.put_u32(k.syms["panic_cpu"], 2)
    stx = k.syms["_stext"]
    for cpu in range(4):
        rip = stx + (ENTRY["native_irq_return_ldt"][0] + 0x10 if cpu == 3 else 0x5006)
        desc = prstatus(_regs(k, cpu, rip=rip), pid=100 + cpu)
        note = struct.pack("<III", 5, len(desc), 1) + b"CORE\0\0\0\0" + desc
        pa = k._dm_pa((k.percpu_start + 0x1000 + k.offsets[cpu]) & ((1 << 64) - 1))
        k.page(pa)[pa & 0xFFF:(pa & 0xFFF) + len(note)] = note
    # the dump's own notes deliberately in another order: crash_notes must decide
    dump = _dump(k, tmp_path, "kdump", registers=[_regs(k, c) for c in (3, 2, 1, 0)])
    rc, out, err = _run(capsys, "stacks", "--core", dump, "--json")
    assert rc == 0, err
    doc = jsonschemas.loads(out)
    assert doc["crash"]["panic_cpu"] == 2 and doc["crash"]["source"].startswith("crash_notes")
    crash = {r["cpu"]: r["crash"] for r in doc["cpus"]}
    assert [crash[c]["pid"] for c in range(4)] == [100, 101, 102, 103]
    assert crash[3]["rip_espfix"] == "espfix return path"
    assert crash[3]["rip_symbol"] == "native_irq_return_ldt+0x10"


# -- drgn as a peer ----------------------------------------------------------------------

def _drgn_python() -> str | None:
    for py in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(py) and subprocess.run([py, "-c", "import drgn"],
                                                 capture_output=True).returncode == 0:
            return py
    return None


@needs_kdumpfile
@pytest.mark.skipif(_drgn_python() is None, reason="drgn is not importable (Debian: "
                    "python3-drgn, for /usr/bin/python3)")
@pytest.mark.parametrize("levels", [4, 5])
def test_drgn_reads_the_same_ministack_frames(levels, tmp_path, capsys):
    """drgn walks the dump's page tables itself (swapper_pg_dir from VMCOREINFO) to the
    espfix alias addresses; its bytes must be the frames stacks reports."""
    k = _kernel(levels=levels, frames={0: FRAME, 3: (1, 2, 0x33, 0x202, 0x7FFE0000, 0x7)})
    lines = add_kallsyms(k, "absolute-percpu", extra=_entry(k))
    vmci = k.vmcoreinfo_text() + lines + f"SYMBOL(swapper_pg_dir)={k.syms['init_top_pgt']:x}\n"
    dump = str(tmp_path / "drgn.elf")
    write_elf_vmcore(k, dump, vmci, [{}] * 4)
    rc, out, _ = _run(capsys, "stacks", "--core", dump, "--json")
    rows = [c for c in jsonschemas.loads(out)["cpus"] if c["frame"]]
    assert rc == 0 and [r["cpu"] for r in rows] == [0, 3]
    from tests.vm.dumpcheck import DRGN_FRAMES
    want = {str(r["cpu"]): r["espfix_stack"] for r in rows}
    proc = subprocess.run([_drgn_python(), "-c", DRGN_FRAMES, dump, json.dumps(want)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["frames"]
    for r in rows:
        assert got[str(r["cpu"])] == [r["frame"][w] for w in
                                      ("rax", "rip", "cs", "rflags", "rsp", "ss")]


@needs_kdumpfile
def test_snapshot_of_a_dump_with_a_filtered_ministack_page(tmp_path, capsys):
    k = _kernel(frames={})
    k.alloc_page(0)
    dump = _dump(k, tmp_path, "elf", drop={k.stack_pa[0]})
    snap = str(tmp_path / "snap.core")
    assert _run(capsys, "snapshot", "--core", dump, "-o", snap)[0] == 0
    assert _run(capsys, "validate", "--core", snap)[0] == 0


@needs_kdumpfile
def test_qemu_elf_header_quirk_still_reads(tmp_path, write_kernel, capsys):
    """QEMU 7.2's ELF dumps carry e_ehsize 8 (seen on the sid guest's dump), which the
    strict ELF reader refuses; an ELF core of physical PT_LOADs is still a vmcore for
    libkdumpfile.  A /proc/kcore-shaped core with the same damage stays refused."""
    k = _kernel()
    dump = _dump(k, tmp_path, "elf", registers=[{}] * 4)
    core, syms = write_kernel(k)
    for path in (dump, core):
        with open(path, "r+b") as f:
            f.seek(52)
            f.write(struct.pack("<H", 8))
    rc, out, err = _run(capsys, "stacks", "--core", dump, "--json")
    assert rc == 0, err
    assert jsonschemas.loads(out)["cpus"][1]["frame"]["rax"] == "0xdead"
    rc, _, err = _run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 2 and "ELF header size is 8" in err
