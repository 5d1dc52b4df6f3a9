"""Facts about the live kernel the guest tests run on (no inspector code used)."""
from __future__ import annotations

import os


def lockdown_mode() -> str | None:
    """The active kernel lockdown mode ("integrity"/"confidentiality"), or None.

    /sys/kernel/security/lockdown reads e.g. "none integrity [confidentiality]".
    """
    for path in ("/sys/kernel/security/lockdown",):
        try:
            with open(path) as f:
                words = f.read().split()
        except OSError:
            continue
        for w in words:
            if w.startswith("[") and w != "[none]":
                return w.strip("[]")
    return None


def kcore_usable() -> tuple[bool, str]:
    """(usable, reason it is not): /proc/kcore present, root, no lockdown."""
    if not os.path.exists("/proc/kcore"):
        return False, "needs /proc/kcore: run in the VM harness (pytest -m vm tests/vm)"
    if os.geteuid() != 0:
        return False, "needs root (reads /proc/kcore)"
    mode = lockdown_mode()
    if mode == "confidentiality":
        return False, "kernel lockdown=confidentiality refuses /proc/kcore (test_lockdown.py covers it)"
    return True, ""


def cpulist(text: str) -> list[int]:
    """A sysfs CPU list ("0-3,8") as sorted CPUs, parsed here rather than with the
    tool's own parser, so the guest tests hold the tool to an independent reading."""
    out: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


#: The rows that run the guest tests whose outcome depends on the kernel build alone, not
#: on the row's paging, PTI or CPUs: a trace ended by SIGTERM or by its duration (a BCC
#: compile each, 25-50 s under TCG) and the refusal of other kernels' symbols (10-25 s).
#: One row per kernel keeps them in CI at a fifth of the cost (docs/testing.md).
PER_KERNEL_ROWS = ("bookworm:l4", "trixie:l4", "sid:l5")


def not_in_this_row() -> str | None:
    """Why a once-per-kernel guest test skips in this row, or None where it runs
    (its row, anywhere outside the VM harness, or with ESPFIX_VM_ALL=1)."""
    if os.environ.get("ESPFIX_VM") != "guest" or os.environ.get("ESPFIX_VM_ALL") == "1":
        return None
    row = f"{os.environ.get('ESPFIX_VM_KERNEL')}:{os.environ.get('ESPFIX_VM_VARIANT')}"
    if row in PER_KERNEL_ROWS:
        return None
    return (f"depends on the kernel build only: runs in {', '.join(PER_KERNEL_ROWS)} "
            f"(CI time); this is {row}, ESPFIX_VM_ALL=1 runs it here")
