"""The test-only fault module (tests/kmod/espfix_fault.c) in a VM guest: where it may run,
and its build against the running kernel's headers with the kernel's own compiler.

The build takes 40-70 s under TCG (kbuild's own start-up is a third of it), so
tests/guest/conftest.py starts it in the background as soon as the session knows the
fault tests will run, and test_faults_live.py waits for it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

from tests.guest.live import kcore_usable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KMOD_SRC = os.path.join(ROOT, "tests", "kmod")
MODULE = "espfix_fault"
#: the rows that run the fault tests (issue 11: a 5-level and a 4-level+PTI row on 6.1
#: and on 7.x); other rows skip them to keep CI within its time budget
FAULT_ROWS = ("bookworm:l5", "bookworm:pti", "sid:l5", "sid:l4pti")


def why_not_here() -> str | None:
    """Why the fault tests must not run here, or None."""
    if os.environ.get("ESPFIX_VM") != "guest":
        return ("loads a module that corrupts the kernel's espfix state: runs only inside "
                "the project's test VMs (ESPFIX_VM=guest, python3 -m tests.vm run ...)")
    usable, why = kcore_usable()
    if not usable:
        return why
    row = f"{os.environ.get('ESPFIX_VM_KERNEL')}:{os.environ.get('ESPFIX_VM_VARIANT')}"
    if row not in FAULT_ROWS and os.environ.get("ESPFIX_FAULTS") != "1":
        return (f"fault injection runs in rows {', '.join(FAULT_ROWS)} only (CI time); "
                f"this is {row}: set ESPFIX_FAULTS=1 to force it")
    return None


def kernel_build_dir() -> str:
    return f"/lib/modules/{os.uname().release}/build"


def kernel_cc(kdir: str) -> str | None:
    """The compiler that built the kernel: the first word of CONFIG_CC_VERSION_TEXT
    (gcc-12 on bookworm, x86_64-linux-gnu-gcc-16 on sid)."""
    try:
        with open(os.path.join(kdir, ".config")) as f:
            m = re.search(r'^CONFIG_CC_VERSION_TEXT="(\S+)', f.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def cannot_build() -> str | None:
    """Why the module cannot be built in this guest (a skip reason), or None."""
    kdir = kernel_build_dir()
    if not os.path.exists(os.path.join(kdir, "Makefile")):
        return f"no kernel headers at {kdir}: install linux-headers-{os.uname().release}"
    cc = kernel_cc(kdir)
    if cc is None or shutil.which(cc) is None:
        return f"the kernel's compiler {cc!r} (CONFIG_CC_VERSION_TEXT) is not installed"
    if shutil.which("make") is None:
        return "make is not installed in this guest"
    return None


class Build:
    """`make` of a private copy of tests/kmod, running in the background."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="espfix-kmod-")
        shutil.copytree(KMOD_SRC, self.dir, dirs_exist_ok=True)
        kdir = kernel_build_dir()
        self.seconds: float | None = None      # how long make ran
        self.output = ""
        t0 = time.monotonic()
        self.proc = subprocess.Popen(["make", "-C", self.dir, f"KDIR={kdir}",
                                      f"KCC={kernel_cc(kdir)}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

        def reap() -> None:
            self.output = self.proc.communicate()[0]
            self.seconds = time.monotonic() - t0
        self._reaper = threading.Thread(target=reap, daemon=True)
        self._reaper.start()

    @property
    def ko(self) -> str:
        return os.path.join(self.dir, f"{MODULE}.ko")

    def wait(self, timeout: float = 600) -> int:
        self._reaper.join(timeout)
        if self._reaper.is_alive():
            raise TimeoutError(f"make of {MODULE} still running after {timeout} s")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self._reaper.join()
        shutil.rmtree(self.dir, ignore_errors=True)
