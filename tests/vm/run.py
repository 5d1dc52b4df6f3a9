"""Boot one matrix row under QEMU/TCG and run a shell command in the guest as root.

API:  run_in_vm(kernel, variant, command, timeout, options=VMOptions(...)) -> VMResult

VMOptions (all optional, additive to the variant) add QEMU arguments, kernel
command-line words, a memory size, files copied into the share, a QMP monitor with
a host-side request watcher (the guest asks for `dump-guest-memory` through a file in
the share: see tests/vm/hostreq.py), and a `collect(share)` callback that runs on
the host after the guest finished and before the share is removed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .hostenv import HostError, require_tools
from .image import STUB_PATH, Image, build
from .hostreq import RequestWatcher
from .kernels import Variant, get_kernel, get_variant

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GUEST_INIT = Path(__file__).resolve().with_name("guest-init.sh")
GUEST_SYSTEMD = Path(__file__).resolve().with_name("guest-systemd.sh")
TREE_IGNORE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".venv", "venv", ".tox", "build", "dist", "*.egg-info",
)
BASE_CMDLINE = ("root=/dev/vda", "rw", "console=ttyS0", "panic=-1", f"init={STUB_PATH}")


class VMError(RuntimeError):
    """The VM did not produce a result (boot failure, crash, timeout)."""

    def __init__(self, message: str, serial_log: str = "") -> None:
        super().__init__(message)
        self.serial_log = serial_log


class VMTimeout(VMError):
    pass


class VMBootFailure(VMError):
    """The kernel oopsed or panicked before the guest's init started (a TCG flake seen
    on sid's kernel: "Oops: int3 at sched_clock_cpu"); run_in_vm boots once more."""


#: The guest init's first line on the console (guest-init.sh's `say`).
INIT_STARTED = "espfix-vm: init at uptime"
_EARLY_DEATH = re.compile(r"Oops:|Kernel panic|BUG: unable to handle|general protection fault")


def _died_before_init(serial: Path) -> str | None:
    """The oops or panic line when the kernel died before init started, else None."""
    log = _read(serial)
    if INIT_STARTED in log:
        return None
    m = _EARLY_DEATH.search(log)
    return log[m.start():].splitlines()[0] if m else None


@dataclasses.dataclass(frozen=True)
class VMOptions:
    """Per-run additions to a matrix row (the row itself is unchanged)."""
    qemu_args: tuple[str, ...] = ()          # e.g. ("-device", "vmcoreinfo")
    cmdline: tuple[str, ...] = ()            # e.g. ("crashkernel=256M",)
    mem_mb: int | None = None                # instead of the variant's -m
    share_files: Mapping[str, Path] = dataclasses.field(default_factory=dict)
    qmp: bool = False                        # QMP socket + host request watcher
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)   # more guest env
    collect: Callable[[Path], Any] | None = None   # called with the share dir at the end


@dataclasses.dataclass
class VMResult:
    returncode: int
    stdout: str
    stderr: str
    serial_log: str
    boot_seconds: float | None = None     # guest uptime when the command started
    command_seconds: float | None = None  # guest time the command ran
    total_seconds: float = 0.0            # host wall time, qemu start to exit
    requests: list = dataclasses.field(default_factory=list)   # host requests served
    collected: Any = None                 # what options.collect returned

    def describe(self) -> str:
        boot = f"{self.boot_seconds:.1f}" if self.boot_seconds is not None else "?"
        cmd = f"{self.command_seconds:.1f}" if self.command_seconds is not None else "?"
        return (f"exit status {self.returncode}; boot-to-command {boot} s, "
                f"command {cmd} s, total {self.total_seconds:.1f} s")


def qemu_argv(img: Image, variant: Variant, share: Path, serial: Path,
              options: VMOptions | None = None) -> list[str]:
    opts = options or VMOptions()
    cmdline = " ".join((*BASE_CMDLINE, *variant.cmdline, *opts.cmdline))
    extra = list(opts.qemu_args)
    if opts.qmp:
        extra += ["-qmp", f"unix:{share / QMP_SOCKET},server=on,wait=off"]
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi",
        *variant.qemu_args, "-m", str(opts.mem_mb or variant.mem_mb), *extra,
        "-display", "none", "-monitor", "none", "-serial", f"file:{serial}",
        "-no-reboot", "-snapshot",
        "-kernel", str(img.vmlinuz), "-initrd", str(img.initrd), "-append", cmdline,
        "-drive", f"file={img.root_img},format=raw,if=virtio,cache=unsafe",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=none,id=share",
        "-nic", "none",
    ]


#: QMP socket in the share directory (host side only; the guest never sees sockets).
QMP_SOCKET = "qmp.sock"


def _prepare_share(share: Path, kernel: str, variant: Variant, command: str,
                   options: VMOptions | None = None, deb: Path | None = None) -> None:
    opts = options or VMOptions()
    shutil.copytree(PROJECT_ROOT, share / "tree", ignore=TREE_IGNORE, symlinks=True)
    for name, src in opts.share_files.items():
        shutil.copyfile(src, share / name)
    shutil.copyfile(GUEST_INIT, share / "guest-init.sh")
    shutil.copyfile(GUEST_SYSTEMD, share / "guest-systemd.sh")
    if deb is not None:
        (share / "deb").mkdir()
        shutil.copyfile(deb, share / "deb" / deb.name)
    (share / "cmd.sh").write_text(command + "\n")
    env = {
        "ESPFIX_VM": "guest",
        "ESPFIX_VM_KERNEL": kernel,
        "ESPFIX_VM_KVER": get_kernel(kernel).kver,
        "ESPFIX_VM_VARIANT": variant.name,
        "ESPFIX_VM_EXPECT_POSSIBLE": variant.expect_possible,
        "ESPFIX_VM_EXPECT_PRESENT": variant.expect_present,
        "ESPFIX_VM_EXPECT_ONLINE": variant.expect_online,
        "ESPFIX_VM_EXPECT_NODES": variant.expect_nodes,
        "ESPFIX_VM_CMDLINE_EXTRA": " ".join((*variant.cmdline, *opts.cmdline)),
        "ESPFIX_VM_MEM_MB": str(opts.mem_mb or variant.mem_mb),
        "ESPFIX_VM_HOST_REQUESTS": "1" if opts.qmp else "0",
        "ESPFIX_VM_QEMU_EXTRA": " ".join(opts.qemu_args),
        "ESPFIX_VM_INIT": variant.init,
        **opts.env,
    }
    (share / "env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    (share / "out").mkdir()


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def run_in_vm(kernel: str, variant: str, command: str, timeout: float = 600.0, *,
              keep_share: bool | None = None, options: VMOptions | None = None,
              deb: Path | None = None) -> VMResult:
    """Boot `kernel`/`variant` (building the image if needed) and run `command`
    (a /bin/sh script) as root in the guest, cwd = a copy of the project tree.
    Variants with init "systemd" need `deb`, the package the guest installs before it
    execs systemd (tests/vm/deb.py builds one).

    Returns the command's status and output; raises VMTimeout if qemu outlives
    `timeout` seconds (image build time not included) and VMError if the guest never
    reported a status.  qemu is killed and reaped on every path, Ctrl-C included.
    A kernel that oopses or panics before init started is booted once more (said on
    stderr): that is a TCG flake, not a finding about the code under test.
    """
    try:
        return _run_once(kernel, variant, command, timeout, keep_share=keep_share,
                         options=options, deb=deb)
    except VMBootFailure as e:
        import sys
        print(f"[vm] {kernel}:{variant}: {e}; booting once more", file=sys.stderr)
        return _run_once(kernel, variant, command, timeout, keep_share=keep_share,
                         options=options, deb=deb)


def _run_once(kernel: str, variant: str, command: str, timeout: float, *,
              keep_share: bool | None, options: VMOptions | None,
              deb: Path | None) -> VMResult:
    v = get_variant(kernel, variant)
    if v.init == "systemd" and deb is None:
        raise VMError(f"{kernel}:{variant} boots systemd with the Debian package installed: "
                      f"pass deb= (python3 -m tests.vm run --deb FILE, or let tests/vm/deb.py "
                      f"build it)")
    require_tools("qemu-system-x86_64")
    img = build(kernel)
    if keep_share is None:
        keep_share = os.environ.get("ESPFIX_VM_KEEP") == "1"
    share = Path(tempfile.mkdtemp(prefix=f"espfix-vm-{kernel}-{variant}-"))
    serial = share / "serial.log"
    proc: subprocess.Popen[bytes] | None = None
    watcher: RequestWatcher | None = None
    opts = options or VMOptions()
    try:
        _prepare_share(share, kernel, v, command, opts, deb)
        argv = qemu_argv(img, v, share, serial, opts)
        (share / "qemu-argv").write_text(shlex.join(argv) + "\n")
        t0 = time.monotonic()
        with open(share / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            if opts.qmp:
                watcher = RequestWatcher(share, share / QMP_SOCKET, proc)
                watcher.start()
            deadline = t0 + timeout
            while True:
                try:
                    qemu_rc = proc.wait(timeout=min(5.0, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    pass
                if time.monotonic() >= deadline:
                    proc.kill()
                    proc.wait()
                    log = _read(serial)
                    raise VMTimeout(f"{kernel}:{variant}: VM timed out after {timeout:.0f} s "
                                    f"(qemu killed); serial log tail:\n{_tail(log)}", log)
                oops = _died_before_init(serial)
                if oops is not None:
                    proc.kill()
                    proc.wait()
                    raise VMBootFailure(f"kernel died before init: {oops}", _read(serial))
        total = time.monotonic() - t0
        if watcher is not None:
            watcher.stop()
        out = share / "out"
        log = _read(serial)
        rc_text = _read(out / "rc").strip()
        if not rc_text:
            raise VMError(f"{kernel}:{variant}: guest reported no exit status (qemu exit "
                          f"{qemu_rc}: {_tail(_read(share / 'qemu.log'), 5)!s}); "
                          f"serial log tail:\n{_tail(log)}", log)
        times = dict(kv.split("=", 1) for kv in _read(out / "times").split())
        boot = float(times["command"]) if "command" in times else None
        ran = (float(times["end"]) - float(times["command"])
               if {"end", "command"} <= times.keys() else None)
        res = VMResult(int(rc_text), _read(out / "stdout"), _read(out / "stderr"), log,
                       boot, ran, total, watcher.served if watcher is not None else [])
        if opts.collect is not None:
            res.collected = opts.collect(share)
        return res
    finally:
        if watcher is not None:
            watcher.stop()
        if proc is not None and proc.poll() is None:   # Ctrl-C, SystemExit, anything
            proc.kill()
            proc.wait()
        if keep_share:
            import sys
            print(f"[vm] share kept: {share}", file=sys.stderr)
        else:
            shutil.rmtree(share, ignore_errors=True)


__all__ = ["VMResult", "VMOptions", "VMError", "VMTimeout", "HostError", "run_in_vm",
           "qemu_argv"]
