"""espfix-inspect against the live kernel, as root inside a VM guest.

The tool is checked against ground truth it does not compute itself: sysfs CPU
lists, and a second, deliberately minimal reader of /proc/kcore written here
with struct alone (ELF program headers + kallsyms + __per_cpu_offset), sharing
no code with the inspector.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.guest.live import cpulist, kcore_usable, not_in_this_row  # noqa: E402

_USABLE, _WHY = kcore_usable()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _USABLE, reason=_WHY or "-")]


def tool(*args: str, user: int | None = None, check_rc: int | None = 0):
    argv = [sys.executable, "-m", "inspector", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc {proc.returncode}: {proc.stderr}{proc.stdout}"
    return proc


def tool_json(*args: str, check_rc: int = 0) -> dict:
    return json.loads(tool(*args, "--json", check_rc=check_rc).stdout)


def sysfs_cpus(path: str) -> set[int]:
    return set(cpulist(open(path).read()))


class MiniKcore:
    """The simplest reader that can answer "what is per_cpu(espfix_stack, n)"."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/kcore", os.O_RDONLY)
        ehdr = os.pread(self.fd, 64, 0)
        phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        self.loads = []
        for i in range(phnum):
            p = os.pread(self.fd, phentsize, phoff + i * phentsize)
            ptype, _flags, off, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", p)
            if ptype == 1:
                self.loads.append((vaddr, off, filesz))
        self.syms = {}
        for line in open("/proc/kallsyms"):
            addr, _t, name = line.split()[:3]
            self.syms.setdefault(name, int(addr, 16))

    def u64(self, vaddr: int) -> int:
        vaddr &= (1 << 64) - 1
        for start, off, size in self.loads:
            if start <= vaddr < start + size:
                return struct.unpack("<Q", os.pread(self.fd, 8, off + vaddr - start))[0]
        raise LookupError(hex(vaddr))

    def per_cpu(self, name: str, cpu: int) -> int:
        offset = self.u64(self.syms["__per_cpu_offset"] + 8 * cpu)
        return self.u64(self.syms[name] + offset)


@pytest.fixture(scope="module")
def validate() -> dict:
    return tool_json("validate")


def test_validate_is_clean(validate):
    errors = [f for f in validate["findings"] if f["severity"] != "info"]
    assert validate["ok"] and not errors, errors


def test_cpu_sets_match_sysfs(validate):
    k = validate["kernel"]
    from inspector.model import parse_cpu_list
    assert set(parse_cpu_list(k["cpus_online"])) == sysfs_cpus("/sys/devices/system/cpu/online")
    assert set(parse_cpu_list(k["cpus_possible"])) == sysfs_cpus("/sys/devices/system/cpu/possible")
    initialised = set(parse_cpu_list(k["cpus_initialised"]))
    online = sysfs_cpus("/sys/devices/system/cpu/online")
    assert online <= initialised, "every online CPU has a ministack"
    for cpu in initialised - online:
        # CPUs that were online before keep their state; report it as such
        assert any(f["cpu"] == cpu and "offline, initialised" in f["message"]
                   for f in validate["findings"])


def test_espfix_stack_matches_an_independent_reader(validate):
    mini = MiniKcore()
    seen = 0
    for row in validate["cpus"]:
        cpu = row["cpu"]
        stack = mini.per_cpu("espfix_stack", cpu)
        waddr = mini.per_cpu("espfix_waddr", cpu)
        assert (row["espfix_stack"] or "0x0") == f"{stack:#x}"
        assert (row["espfix_waddr"] or "0x0") == f"{waddr:#x}"
        if stack:
            page = mini.u64(mini.syms["espfix_pages"] + 8 * (cpu // 64))
            assert waddr & ~0xFFF == page, "espfix_waddr lies in espfix_pages[n/64]"
            seen += 1
    assert seen >= 1


def test_stacks_has_one_row_per_possible_cpu():
    doc = tool_json("stacks")
    assert [r["cpu"] for r in doc["cpus"]] == sorted(sysfs_cpus("/sys/devices/system/cpu/possible"))
    for r in doc["cpus"]:
        if r["espfix_stack"]:
            assert int(r["phys"], 16) & 0xFFF == int(r["espfix_stack"], 16) & 0xFFF


def test_snapshot_validates_offline_the_same(tmp_path, validate):
    snap = str(tmp_path / "s.core")
    tool("snapshot", "-o", snap)
    offline = tool_json("validate", "--core", snap)
    assert offline["findings"] == validate["findings"]
    assert offline["cpus"] == validate["cpus"]
    assert os.path.getsize(snap) < 300_000


def _hotpluggable() -> list[int]:
    return [c for c in sorted(sysfs_cpus("/sys/devices/system/cpu/online"))
            if os.path.exists(f"/sys/devices/system/cpu/cpu{c}/online") and c != 0]


def _set_online(cpu: int, on: bool) -> None:
    with open(f"/sys/devices/system/cpu/cpu{cpu}/online", "w") as f:
        f.write("1" if on else "0")


def test_offline_cpu_keeps_its_ministack():
    cpus = _hotpluggable()
    if not cpus:
        pytest.skip("no hot-pluggable CPU in this guest")
    cpu = cpus[-1]
    _set_online(cpu, False)
    try:
        doc = tool_json("validate")
        assert doc["ok"]
        row = next(r for r in doc["cpus"] if r["cpu"] == cpu)
        assert not row["online"] and row["initialised"] and row["ok"]
        assert any(f["cpu"] == cpu and "offline, initialised" in f["message"]
                   for f in doc["findings"])
    finally:
        _set_online(cpu, True)
    assert tool_json("validate")["ok"]


def test_never_online_cpu_gets_set_up_on_first_online():
    before = tool_json("validate")
    fresh = [r["cpu"] for r in before["cpus"] if not r["online"] and not r["initialised"]
             and os.path.exists(f"/sys/devices/system/cpu/cpu{r['cpu']}/online")]
    if not fresh:
        pytest.skip("no possible-but-never-online CPU that can be brought up (boot with maxcpus=)")
    assert any(f["check"] == "cpu_init" and f["severity"] == "info" and f["cpu"] is None
               for f in before["findings"])
    cpu = fresh[0]
    _set_online(cpu, True)
    try:
        after = tool_json("validate")
    finally:
        _set_online(cpu, False)        # leave the guest as booted for the other tests
    row = next(r for r in after["cpus"] if r["cpu"] == cpu)
    assert row["online"] and row["initialised"] and row["ok"]
    assert after["ok"]
    again = tool_json("validate")      # offline now, and its ministack stays
    row = next(r for r in again["cpus"] if r["cpu"] == cpu)
    assert not row["online"] and row["initialised"] and again["ok"]


# -- failure modes on a live kernel ------------------------------------------

def test_not_root_is_explained():
    proc = tool("validate", user=65534, check_rc=2)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "not root" in proc.stderr


def test_kptr_restrict_is_explained():
    path = "/proc/sys/kernel/kptr_restrict"
    old = open(path).read().strip()
    with open(path, "w") as f:
        f.write("2")
    try:
        proc = tool("validate", check_rc=2)
    finally:
        with open(path, "w") as f:
            f.write(old)
    assert proc.stderr.count("\n") == 1 and "kptr_restrict" in proc.stderr


@pytest.mark.skipif(not_in_this_row() is not None, reason=not_in_this_row() or "-")
def test_symbols_of_another_build_refused(tmp_path):
    """A System.map whose data symbols sit 4 KiB away from this build's."""
    mini = MiniKcore()
    vmcoreinfo_offset = None
    for line in subprocess.run([sys.executable, "-c",
                                "from inspector.elfcore import ElfCore;"
                                "print(ElfCore('/proc/kcore').vmcoreinfo['KERNELOFFSET'])"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split():
        vmcoreinfo_offset = int(line, 16)
    assert vmcoreinfo_offset is not None
    fake = tmp_path / "System.map"
    with open(fake, "w") as f:
        for name, addr in mini.syms.items():
            if addr >= 0xFFFFFFFF80000000:
                addr -= vmcoreinfo_offset
                if name not in ("_text", "_stext"):
                    addr += 0x1000
            f.write(f"{addr:016x} D {name}\n")
    proc = tool("validate", "--symbols", str(fake), check_rc=2)
    assert "from another kernel build" in proc.stderr


def test_debian_boot_system_map_is_explained(validate):
    """Debian ships /boot/System.map-KVER as a one-line placeholder (the real one is in
    the -dbg package): the tool must say so; a real System.map must give kallsyms' verdict."""
    path = f"/boot/System.map-{os.uname().release}"
    if not os.path.exists(path):
        pytest.skip(f"no {path} in this image")
    if "The real System.map is in" in open(path).read(4096):
        proc = tool("validate", "--symbols", path, check_rc=2)
        assert proc.stderr.count("\n") == 1 and "Debian's placeholder System.map" in proc.stderr
    else:
        doc = tool_json("validate", "--symbols", path)
        assert doc["findings"] == validate["findings"] and doc["cpus"] == validate["cpus"]


@pytest.mark.skipif(not_in_this_row() is not None, reason=not_in_this_row() or "-")
def test_real_symbols_of_other_kernels_refused(tmp_path):
    """kallsyms captured from other Debian kernels and boots (embedded in samples/)."""
    from inspector.elfcore import ElfCore
    from inspector.target import NT_SYMBOLS, SNAPSHOT_NOTE
    live = ElfCore("/proc/kcore").vmcoreinfo
    samples = sorted(f for f in os.listdir(os.path.join(ROOT, "samples")) if f.endswith(".core"))
    tried = 0
    for name in samples:
        with ElfCore(os.path.join(ROOT, "samples", name)) as c:
            info = c.vmcoreinfo
            note = next(n for n in c.notes if n.name == SNAPSHOT_NOTE and n.type == NT_SYMBOLS)
        if (info["OSRELEASE"], info.get("KERNELOFFSET")) == \
                (live["OSRELEASE"], live.get("KERNELOFFSET")):
            continue                  # the same build and KASLR slide: it would fit
        syms = tmp_path / f"{name}.kallsyms"
        syms.write_bytes(note.desc)
        proc = tool("validate", "--symbols", str(syms), check_rc=2)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        want = "does not fit this boot" if info["OSRELEASE"] == live["OSRELEASE"] \
            else "from another kernel build"
        assert want in proc.stderr, (name, proc.stderr)
        tried += 1
    assert tried >= 2
