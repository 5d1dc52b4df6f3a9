"""Crash dumps the Debian way: crashkernel=, kdump-tools, echo c, makedumpfile.

One boot per row (a crash ends the boot, so this cannot ride on the guest suite's):
tests/vm/kdump_guest.py runs `exercise`, saves the live view, loads the capture kernel
with kdump-config and panics the kernel; in the capture kernel it runs makedumpfile
-c -d 31 (kdump-tools' default) and -E -d 31 into the share.  The host then reads both
dumps with nothing but the dump (tests/vm/dumpcheck.py): same layout and frames as the
live run, symbols equal to /proc/kallsyms, registers from crash_notes with the panicking
CPU in the sysrq crash path.

Selected like the matrix (ESPFIX_VM=1 or -m vm); ESPFIX_VM_KDUMP_ROWS=bookworm:l5,...
picks rows (default: KDUMP_ROWS), ESPFIX_VM_KDUMP=0 skips them.
"""
from __future__ import annotations

import json
import os

import pytest

from .dumpcheck import check_share, host_cannot_read_dumps
from .image import image_for
from .kernels import parse_rows
from .run import VMError, VMOptions, run_in_vm

KDUMP_ROWS = [("bookworm", "l4"), ("sid", "l5")]


def _rows() -> list[tuple[str, str]]:
    """ESPFIX_VM_KDUMP_ROWS, else KDUMP_ROWS of the kernels ESPFIX_VM_ROWS selects."""
    if os.environ.get("ESPFIX_VM_KDUMP_ROWS"):
        return parse_rows(os.environ["ESPFIX_VM_KDUMP_ROWS"])
    if os.environ.get("ESPFIX_VM_ROWS"):
        kernels = {k for k, _ in parse_rows(os.environ["ESPFIX_VM_ROWS"])}
        return [r for r in KDUMP_ROWS if r[0] in kernels]
    return KDUMP_ROWS


ROWS = _rows()
#: crashkernel= reserves the capture kernel's memory (Debian's kdump-tools suggests
#: 384M-:128M... on larger machines; the capture kernel plus python3 fit in 256 MiB).
CRASHKERNEL = "crashkernel=256M"
DUMPS = ["kdump.c-d31", "kdump.E-d31"]
#: ESPFIX_VM_KDUMP_RAW=1 also copies /proc/vmcore raw (all of RAM: 2 GB, not in CI)
RAW = os.environ.get("ESPFIX_VM_KDUMP_RAW") == "1"
#: ESPFIX_VM_KDUMP_EXTRA=1 also writes -l, -z / -p where makedumpfile has them, and -F
EXTRA = os.environ.get("ESPFIX_VM_KDUMP_EXTRA") == "1"


@pytest.mark.vm
@pytest.mark.skipif(os.environ.get("ESPFIX_VM_KDUMP") == "0", reason="ESPFIX_VM_KDUMP=0")
@pytest.mark.skipif(host_cannot_read_dumps() is not None,
                    reason=f"the host cannot read the dumps: {host_cannot_read_dumps()}")
@pytest.mark.parametrize(("kernel", "variant"), ROWS, ids=[f"{k}-{v}" for k, v in ROWS])
def test_kdump_capture(kernel: str, variant: str) -> None:
    timeout = float(os.environ.get("ESPFIX_VM_TIMEOUT", "900"))

    def collect(share):
        log = share / "dumps" / "kdump-log.json"
        extra = []
        if EXTRA and log.exists():
            written = json.loads(log.read_text())
            extra = [n for n in written if n.startswith("kdump.") and n not in DUMPS]
            extra = ["kdump.l-d31", "kdump.F-c-d31"] + [
                n for n in extra if n not in ("kdump.l-d31", "kdump.F-c-d31")]
        if (share / "dumps" / DUMPS[0]).exists():
            report = check_share(share, DUMPS + extra + ["vmcore.raw"] * RAW)
        else:
            report = {"problems": ["no dump was written"], "timings": {}, "sizes": {}, "notes": []}
        report["kdump_log"] = json.loads(log.read_text()) if log.exists() else None
        return report

    opts = VMOptions(cmdline=(CRASHKERNEL,), env={"ESPFIX_VM_KDUMP_RAW": "1" if RAW else "0",
                                                  "ESPFIX_VM_KDUMP_EXTRA": "1" if EXTRA else "0"},
                     share_files={"kdump-initrd.img": image_for(kernel).initrd},
                     collect=collect)
    try:
        res = run_in_vm(kernel, variant, "python3 tests/vm/kdump_guest.py", timeout,
                        options=opts)
    except VMError as e:
        pytest.fail(f"{e}", pytrace=False)
    report = res.collected or {}
    print(f"{kernel}:{variant}: {res.describe()}\n{json.dumps(report, indent=1)}")
    serial = "\n".join(res.serial_log.splitlines()[-40:])
    assert res.returncode == 0, (f"capture did not complete ({res.describe()}):\n"
                                 f"{res.stdout}{res.stderr}\n{serial}")
    assert not report["problems"], "\n".join(report["problems"])
    log = report["kdump_log"]
    assert "capture" in log and log["capture"]["uname"] == log["first"]["uname"]
    for name in report["crash"]:
        crash = report["crash"][name]
        # the kernel crashed: every CPU saved its registers in crash_notes, and the
        # panicking one (sysrq "c") was not in the espfix path
        assert crash["source"].startswith("crash_notes"), crash
        assert crash["panic_cpu"] is not None, crash
        panicked = crash["cpus"][str(crash["panic_cpu"])]
        assert panicked["verdict"] == "not in espfix", panicked
