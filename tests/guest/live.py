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
