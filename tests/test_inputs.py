"""Bad input ends in exit 2 and one clear line on stderr, never a traceback;
good symbol files of every kind are accepted and matched to their core."""

from __future__ import annotations

import os
import pytest

from inspector.cli import main
from tests.conftest import kernel


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("espfix-inspect: ")
    return lines[0]


@pytest.fixture
def clean(write_kernel):
    return write_kernel(kernel())


@pytest.mark.parametrize("kind", ["kallsyms", "system.map", "vmlinux"])
def test_symbol_kinds_accepted(capsys, write_kernel, kind):
    core, syms = write_kernel(kernel(), kind)
    rc, out, err = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 0, err
    assert "result: OK" in out


def test_truncated_core(capsys, clean, tmp_path):
    core, syms = clean
    cut = tmp_path / "cut"
    data = open(core, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    rc, _, err = run(capsys, "validate", "--core", str(cut), "--symbols", syms)
    assert rc == 2
    assert "truncated" in one_line(err)


def test_truncated_headers(capsys, clean, tmp_path):
    core, syms = clean
    cut = tmp_path / "cut"
    cut.write_bytes(open(core, "rb").read()[:100])
    rc, _, err = run(capsys, "validate", "--core", str(cut), "--symbols", syms)
    assert rc == 2
    one_line(err)


def test_not_elf(capsys, clean, tmp_path):
    _, syms = clean
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n" * 100)
    rc, _, err = run(capsys, "validate", "--core", str(bad), "--symbols", syms)
    assert rc == 2
    assert "not an ELF core" in one_line(err)


def test_vmlinux_given_as_core(capsys, write_kernel):
    _, vmlinux = write_kernel(kernel(), "vmlinux")
    rc, _, err = run(capsys, "validate", "--core", vmlinux, "--symbols", vmlinux)
    assert rc == 2
    assert "not a core" in one_line(err)


def test_core_without_vmcoreinfo(capsys, write_kernel):
    core, syms = write_kernel(kernel(vmcoreinfo=False))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 2
    assert "no VMCOREINFO" in one_line(err)


def test_missing_core(capsys, tmp_path):
    rc, _, err = run(capsys, "validate", "--core", str(tmp_path / "nope"))
    assert rc == 2
    assert "does not exist" in one_line(err)


@pytest.mark.skipif(os.path.exists("/proc/kcore"), reason="this host has /proc/kcore")
def test_no_proc_kcore(capsys):
    rc, _, err = run(capsys, "validate")
    assert rc == 2
    assert "/proc/kcore does not exist" in one_line(err)


def test_empty_symbols(capsys, clean, tmp_path):
    core, _ = clean
    empty = tmp_path / "empty"
    empty.write_text("")
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(empty))
    assert rc == 2
    assert "holds no symbols" in one_line(err)


def test_debian_placeholder_system_map(capsys, clean, tmp_path):
    """The exact one-line /boot/System.map-6.1.0-56-amd64 Debian ships (seen in the VM)."""
    core, _ = clean
    fake = tmp_path / "System.map-6.1.0-56-amd64"
    fake.write_text("ffffffffffffffff B The real System.map is in the "
                    "linux-image-<version>-dbg package\n")
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(fake))
    assert rc == 2
    assert "Debian's placeholder System.map" in one_line(err)


def test_zeroed_kallsyms(capsys, clean, tmp_path):
    core, syms = clean
    zeroed = tmp_path / "kallsyms"
    zeroed.write_text("".join("0000000000000000 " + ln.split(" ", 1)[1] + "\n"
                              for ln in open(syms).read().splitlines()))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(zeroed))
    assert rc == 2
    assert "kptr_restrict" in one_line(err)


@pytest.mark.parametrize("kind", ["kallsyms", "system.map", "vmlinux"])
def test_symbols_of_another_build_refused(capsys, write_kernel, kind):
    core, _ = write_kernel(kernel())
    _, foreign = write_kernel(kernel(layout_shift=0x3000, osrelease="6.1.0-98-amd64"), kind)
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", foreign)
    assert rc == 2
    assert "from another kernel build" in one_line(err)


def test_kallsyms_of_another_boot_refused(capsys, write_kernel):
    """Same build, other KASLR offset: a saved kallsyms no longer fits."""
    core, _ = write_kernel(kernel())
    _, other_boot = write_kernel(kernel(kaslr_offset=0x10000000))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", other_boot)
    assert rc == 2
    assert "does not fit this boot: every symbol VMCOREINFO exports is off by " \
        "-0x1a400000, a KASLR slide" in one_line(err)


SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


def _sample_symbols(core: str, out) -> str:
    """The real kallsyms lines a snapshot embeds, as a plain symbol file."""
    from inspector.elfcore import ElfCore
    from inspector.target import NT_SYMBOLS, SNAPSHOT_NOTE
    with ElfCore(core) as c:
        note = next(n for n in c.notes if n.name == SNAPSHOT_NOTE and n.type == NT_SYMBOLS)
        out.write_bytes(note.desc)
    return str(out)


@pytest.mark.parametrize(("syms_from", "core", "needle"), [
    ("sid-7.x-l5", "bookworm-6.1-l5", "is from another kernel build: init_uts_ns is"),
    ("bookworm-6.1-l5", "sid-7.x-l5", "is from another kernel build: init_uts_ns is"),
    ("bookworm-6.1-l4-pti", "bookworm-6.1-l5", "does not fit this boot: every symbol"),
])
def test_real_symbols_of_another_kernel_refused(capsys, tmp_path, syms_from, core, needle):
    """Real kallsyms captured from other Debian kernels (and another boot of the same
    build), taken from the snapshots in samples/, against a real snapshot."""
    from inspector.elfcore import ElfCore
    with ElfCore(os.path.join(SAMPLES, f"{syms_from}.core")) as a, \
            ElfCore(os.path.join(SAMPLES, f"{core}.core")) as b:
        if a.vmcoreinfo.get("KERNELOFFSET") == b.vmcoreinfo.get("KERNELOFFSET"):
            pytest.skip("both captures drew the same KASLR slide: the symbols fit")
    syms = _sample_symbols(os.path.join(SAMPLES, f"{syms_from}.core"), tmp_path / "syms")
    rc, _, err = run(capsys, "validate", "--core", os.path.join(SAMPLES, f"{core}.core"),
                     "--symbols", syms)
    assert rc == 2
    assert needle in one_line(err)


@pytest.mark.parametrize("kind", ["system.map", "vmlinux"])
def test_link_time_symbols_fit_any_boot(capsys, write_kernel, kind):
    """System.map and vmlinux hold link addresses: KERNELOFFSET relocates them."""
    core, _ = write_kernel(kernel())
    _, other_boot = write_kernel(kernel(kaslr_offset=0x10000000), kind)
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", other_boot)
    assert rc == 0, err


def test_vmlinux_of_a_rebuild_with_same_release(capsys, write_kernel):
    core, _ = write_kernel(kernel())
    rebuild = kernel()
    off = rebuild.syms["linux_banner"] - rebuild.text
    rebuild.image[off + 14:off + 20] = b"6.1.0-"     # same release, other build string
    banner = bytes(rebuild.image[off:off + 200]).split(b"\0")[0]
    rebuild.image[off:off + len(banner)] = banner.replace(b"#1 SMP", b"#2 SMP")
    _, vmlinux = write_kernel(rebuild, "vmlinux")
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", vmlinux)
    assert rc == 2
    assert "another build of 6.1.0-99-amd64" in one_line(err)


def test_stripped_vmlinux(capsys, clean, tmp_path):
    core, _ = clean
    stripped = tmp_path / "vmlinux-stripped"
    # an ELF executable without a .symtab: our writer's header with no sections
    k = kernel()
    k.write_vmlinux(str(stripped))
    data = bytearray(stripped.read_bytes())
    data[0x3C:0x3E] = (0).to_bytes(2, "little")      # e_shnum = 0
    data[0x3E:0x40] = (0).to_bytes(2, "little")      # e_shstrndx = 0
    stripped.write_bytes(bytes(data))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(stripped))
    assert rc == 2
    assert "no symbol table" in one_line(err)


def test_no_data_symbols(capsys, clean, tmp_path):
    """A kallsyms without CONFIG_KALLSYMS_ALL has text symbols only."""
    core, syms = clean
    text_only = tmp_path / "kallsyms-text"
    text_only.write_text("".join(ln + "\n" for ln in open(syms).read().splitlines()
                                 if ln.split()[1] in "Tt"))
    rc, _, err = run(capsys, "validate", "--core", core, "--symbols", str(text_only))
    assert rc == 2
    assert "CONFIG_KALLSYMS_ALL" in one_line(err)


def test_snapshot_without_symbols_needs_none(capsys, clean, tmp_path):
    core, syms = clean
    snap = str(tmp_path / "snap.core")
    rc, out, err = run(capsys, "snapshot", "--core", core, "--symbols", syms, "-o", snap)
    assert rc == 0, err
    rc, _, err = run(capsys, "validate", "--core", core)      # a plain core has no symbols
    assert rc == 2
    assert "--symbols" in one_line(err)


def test_unreadable_core_as_non_root(capsys, clean, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    core, syms = clean
    os.chmod(core, 0o600)
    os.chmod(syms, 0o644)
    for d in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        os.chmod(d, os.stat(d).st_mode | 0o055)
    os.seteuid(65534)
    try:
        rc, _, err = run(capsys, "validate", "--core", core, "--symbols", syms)
    finally:
        os.seteuid(0)
    assert rc == 2
    assert "permission denied" in one_line(err)


@pytest.mark.parametrize("argv,needle", [
    (["layout", "--cpus", "0"], "--cpus must be"),
    (["layout", "--cpu-list", "5-2"], "bad CPU list"),
    (["layout", "--page-random", "5000"], "page_random must be"),
    (["layout", "--rand", "7", "--slot-random", "3"], "exclude each other"),
])
def test_layout_bad_arguments(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        rc = main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_fault_exits_1(capsys, write_kernel):
    k = kernel()
    k.set_percpu(1, "espfix_stack", k.get_percpu(1, "espfix_stack") + 64)
    core, syms = write_kernel(k)
    rc, out, _ = run(capsys, "validate", "--core", core, "--symbols", syms)
    assert rc == 1
    assert "espfix_stack" in out and "result: FINDINGS" in out


@pytest.mark.parametrize(("fred", "needle"), [
    (True, "espfix is disabled: this kernel uses FRED"),
    (False, "espfix is not set up on this kernel"),
])
def test_espfix_disabled_is_explained(write_kernel, fred, needle):
    """init_espfix_bsp() returned early (FRED): no top entry, no CPU set up."""
    from inspector.errors import InspectError
    from inspector.hostfacts import HostFacts
    from inspector.state import load_state
    from inspector.target import open_target
    core, syms = write_kernel(kernel(espfix=False, pti=True))
    target = open_target(core, syms)
    try:
        with pytest.raises(InspectError, match=needle):
            load_state(target, HostFacts.from_dict({"fred": fred}))
    finally:
        target.close()


def test_effective_capability_read_from_proc_status(tmp_path):
    """The CAP_SYS_RAWIO diagnosis reads CapEff (proc(5)); a sandbox that dropped the
    capability (seen on a real boot under systemd's PrivateDevices=yes) is named as such."""
    from inspector.elfcore import CAP_SYS_RAWIO, _has_effective_cap
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n")
    assert _has_effective_cap(CAP_SYS_RAWIO, str(status)) is True
    status.write_text(f"CapEff:\t{(1 << 22) | (1 << 34):016x}\n")    # SYS_RAWIO off, SYSLOG on
    assert _has_effective_cap(CAP_SYS_RAWIO, str(status)) is False
    assert _has_effective_cap(34, str(status)) is True
    status.write_text("CapEff:\tnot-hex\n")
    assert _has_effective_cap(CAP_SYS_RAWIO, str(status)) is None
    assert _has_effective_cap(CAP_SYS_RAWIO, str(tmp_path / "missing")) is None
