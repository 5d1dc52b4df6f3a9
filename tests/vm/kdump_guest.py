"""Guest side of the kdump test: crash the kernel the Debian way and save the dump.

Runs twice in one VM run (tests/vm/test_kdump.py boots with ``crashkernel=``):

1. in the booted kernel: ``exercise`` leaves a frame in every online CPU's ministack,
   the live ``stacks``/``validate`` JSON and /proc/kallsyms go to the share, then
   kdump-tools loads the capture kernel (``kdump-config load``: /etc/default/kdump-tools
   with USE_KDUMP=1; the capture initrd is the harness's own small initrd, placed
   where kdump-tools looks for it so that it does not run mkinitramfs under TCG),
   and ``echo c > /proc/sysrq-trigger`` panics the kernel;
2. in the capture kernel (``/proc/vmcore`` exists; the harness init runs this same
   command again): makedumpfile writes the Debian default ``-c -d 31`` dump and an
   ``-E -d 31`` ELF dump into the share, with its own report and timings.

Everything it saw goes to ``dumps/kdump-log.json`` in the share, so the host can show
the evidence when the capture kernel never comes up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARE = Path("/mnt/share")
DUMPS = SHARE / "dumps"
LOG = DUMPS / "kdump-log.json"
ROOT = Path(__file__).resolve().parents[2]


def log(key: str, value) -> None:
    doc = json.loads(LOG.read_text()) if LOG.exists() else {}
    doc[key] = value
    tmp = LOG.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.rename(LOG)


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def tool(*args: str) -> subprocess.CompletedProcess:
    return sh(sys.executable, "-m", "inspector", *args, cwd=ROOT,
              env={**os.environ, "PYTHONPATH": str(ROOT)})


def first_kernel() -> int:
    kver = os.uname().release
    log("first", {"uname": kver, "cmdline": Path("/proc/cmdline").read_text().strip(),
                  "crash_size": Path("/sys/kernel/kexec_crash_size").read_text().strip()})
    ex = tool("exercise", "--duration", "0.3", "--json")
    if ex.returncode != 0:
        print(ex.stdout, ex.stderr)
        return 1
    for name, args in (("live-stacks.json", ("stacks", "--json")),
                       ("live-validate.json", ("validate", "--json"))):
        proc = tool(*args)
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
        (DUMPS / name).write_text(proc.stdout)
    shutil.copyfile("/proc/kallsyms", DUMPS / "kallsyms")
    # kdump-tools, configured as a Debian admin would (/etc/default/kdump-tools)
    kdir = Path("/var/lib/kdump")
    kdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARE / "kdump-initrd.img", kdir / f"initrd.img-{kver}")
    sysctl = Path("/etc/kdump/sysctl.conf")
    if sysctl.exists():        # else kdump-config drops the initrd and runs mkinitramfs
        shutil.copyfile(sysctl, kdir / f"latest_sysctls-{kver}")
    # the package's own defaults file (KDUMP_KERNEL=/var/lib/kdump/vmlinuz,
    # KDUMP_INITRD=/var/lib/kdump/initrd.img, ...) with kdump switched on
    defaults = Path("/etc/default/kdump-tools")
    text = defaults.read_text() if defaults.exists() else ""
    lines = [ln for ln in text.splitlines() if not ln.startswith("USE_KDUMP=")]
    defaults.write_text("\n".join(lines + ["USE_KDUMP=1"]) + "\n")
    log("defaults", [ln for ln in defaults.read_text().splitlines()
                     if ln and not ln.startswith("#")])
    t0 = time.monotonic()
    load = sh("kdump-config", "load")
    loaded = Path("/sys/kernel/kexec_crash_loaded").read_text().strip()
    show = sh("kdump-config", "show")
    log("load", {"rc": load.returncode, "stdout": load.stdout, "stderr": load.stderr,
                 "seconds": round(time.monotonic() - t0, 2), "kexec_crash_loaded": loaded,
                 "show": show.stdout})
    if loaded != "1":
        print(f"kdump-config load did not load a capture kernel:\n{load.stdout}{load.stderr}")
        return 1
    log("crash", {"uptime": Path("/proc/uptime").read_text().split()[0]})
    os.sync()
    Path("/proc/sysrq-trigger").write_text("c")
    time.sleep(60)
    print("still alive 60 s after echo c > /proc/sysrq-trigger")
    return 1


def capture_kernel() -> int:
    log("capture", {"uname": os.uname().release,
                    "cmdline": Path("/proc/cmdline").read_text().strip(),
                    "uptime": Path("/proc/uptime").read_text().split()[0],
                    "vmcore_bytes": os.stat("/proc/vmcore").st_size,
                    "makedumpfile": sh("makedumpfile", "-v").stdout.strip()})
    status = 0
    runs = [("kdump.c-d31", ("-c", "-d", "31")), ("kdump.E-d31", ("-E", "-d", "31"))]
    if os.environ.get("ESPFIX_VM_KDUMP_EXTRA") == "1":
        # the other compressions this makedumpfile was built with, and the flattened
        # stream (-F writes to stdout)
        features = sh("makedumpfile", "-v").stdout
        runs.append(("kdump.l-d31", ("-l", "-d", "31")))
        if "zstd\tenabled" in features:
            runs.append(("kdump.z-d31", ("-z", "-d", "31")))
        if "snappy\tenabled" in features:
            runs.append(("kdump.p-d31", ("-p", "-d", "31")))
        runs.append(("kdump.F-c-d31", ("-F", "-c", "-d", "31")))
    for name, args in runs:
        t0 = time.monotonic()
        if "-F" in args:
            with open(DUMPS / name, "wb") as out:
                proc = subprocess.run(["makedumpfile", *args, "/proc/vmcore"], stdout=out,
                                      stderr=subprocess.PIPE, text=True)
            proc.stdout = ""
        else:
            proc = sh("makedumpfile", *args, "/proc/vmcore", str(DUMPS / name))
        log(name, {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 2),
                   "report": (proc.stdout + proc.stderr)[-3000:],
                   "bytes": (DUMPS / name).stat().st_size if (DUMPS / name).exists() else 0})
        status |= proc.returncode
    if os.environ.get("ESPFIX_VM_KDUMP_RAW") == "1":      # /proc/vmcore copied raw
        t0 = time.monotonic()
        shutil.copyfile("/proc/vmcore", DUMPS / "vmcore.raw")
        log("vmcore.raw", {"seconds": round(time.monotonic() - t0, 2),
                           "bytes": (DUMPS / "vmcore.raw").stat().st_size})
    return status


def main() -> int:
    DUMPS.mkdir(exist_ok=True)
    return capture_kernel() if Path("/proc/vmcore").exists() else first_kernel()


if __name__ == "__main__":
    sys.exit(main())
