"""A hypervisor dump of this very guest, taken at the moment the test chooses.

Runs only in the matrix rows that tests/vm/test_matrix.py starts with a QMP monitor and
``-device vmcoreinfo`` (DUMP_ROWS).  After ``exercise`` left a frame in every online
CPU's ministack, the test saves what the live tool sees (``stacks --json``,
``validate --json``, /proc/kallsyms) into the share and asks the host for
``dump-guest-memory`` in the formats of ESPFIX_VM_DUMP_FORMATS.  The host then reads
the dumps with nothing but the dump (tests/vm/dumpcheck.py).  One extra dump is taken
before ``qemu_fw_cfg`` is loaded, when ESPFIX_VM_DUMP_NOVMCI=1: QEMU cannot know where
VMCOREINFO is yet, and the host must say so.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.live import kcore_usable
from tests.vm.hostreq import GUEST_SHARE, request_dump

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_USABLE, _WHY = kcore_usable()
pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not _USABLE, reason=_WHY or "-"),
    pytest.mark.skipif(os.environ.get("ESPFIX_VM_HOST_REQUESTS") != "1",
                       reason="the VM has no host request channel (only the dump rows of "
                              "tests/vm/test_matrix.py have one)"),
]
DUMPS = GUEST_SHARE / "dumps"
VMCOREINFO_FW_CFG = Path("/sys/firmware/qemu_fw_cfg/by_name/etc/vmcoreinfo")


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector", *args], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_hypervisor_dumps_after_exercise():
    t0 = time.monotonic()
    timings: dict = {}
    if os.environ.get("ESPFIX_VM_DUMP_NOVMCI") == "1":
        assert not VMCOREINFO_FW_CFG.exists(), "qemu_fw_cfg already loaded"
        timings["novmci.kdump-zlib"] = request_dump("kdump-zlib", "novmci.kdump-zlib")
    subprocess.run(["modprobe", "qemu_fw_cfg"], check=True)
    assert VMCOREINFO_FW_CFG.exists(), "no etc/vmcoreinfo in fw_cfg: -device vmcoreinfo missing?"
    ex = tool("exercise", "--duration", "0.3", "--json")
    assert ex.returncode == 0, ex.stdout + ex.stderr
    for name, args in (("live-stacks.json", ("stacks", "--json")),
                       ("live-validate.json", ("validate", "--json"))):
        proc = tool(*args)
        assert proc.returncode == 0, proc.stderr
        (DUMPS / name).write_text(proc.stdout)
    shutil.copyfile("/proc/kallsyms", DUMPS / "kallsyms")
    for fmt in filter(None, os.environ.get("ESPFIX_VM_DUMP_FORMATS", "kdump-zlib").split(",")):
        timings[f"qemu.{fmt}"] = request_dump(fmt, f"qemu.{fmt}")
    after = tool("stacks", "--json")
    assert after.returncode == 0
    # nothing took the espfix path while QEMU wrote the dumps: the frames are the same
    assert json.loads(after.stdout)["cpus"] == \
        json.loads((DUMPS / "live-stacks.json").read_text())["cpus"]
    # drgn, where this guest has it, reads the same dumps (the host compares)
    if subprocess.run([sys.executable, "-c", "import drgn"]).returncode == 0:
        from tests.vm.dumpcheck import DRGN_FRAMES
        live = json.loads((DUMPS / "live-stacks.json").read_text())
        want = {str(c["cpu"]): c["espfix_stack"] for c in live["cpus"] if c["frame"]}
        results = {}
        # ELF dumps only: libkdumpfile finds no architecture in QEMU's kdump header
        # (its utsname is empty but for machine), so drgn cannot open those at all
        for name in timings:
            if not name.startswith("qemu.elf"):
                continue
            p = subprocess.run([sys.executable, "-c", DRGN_FRAMES, str(DUMPS / name),
                                json.dumps(want)], capture_output=True, text=True)
            results[name] = {"rc": p.returncode, "out": p.stdout, "err": p.stderr[-2000:]}
        (DUMPS / "guest-drgn.json").write_text(json.dumps(results))
    # what this test costs the row, for the CI budget
    timings["test_seconds"] = round(time.monotonic() - t0, 1)
    (DUMPS / "guest-timings.json").write_text(json.dumps(timings))
