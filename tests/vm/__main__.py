"""CLI: python3 -m tests.vm {list,build,run,observe,pins,ensure-tools,oldest}  (see README.md)."""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from .hostenv import HostError, ensure_host_tools
from .image import build, image_for
from .kernels import KERNELS, SLOW_VARIANTS, VARIANTS, MatrixError, get_variant, matrix
from .run import VMError, run_in_vm

OBSERVED = Path(__file__).resolve().with_name("observed")


def _cmd_list(_: argparse.Namespace) -> int:
    for name, k in KERNELS.items():
        img = image_for(name)
        state = "cached" if img.complete() else "not built"
        print(f"{name}: linux-image-{k.kver}={k.version} [{state}: {img.dir}]")
        for v in VARIANTS[name].values():
            print(f"  {name}:{v.name:9} {' '.join(v.qemu_args)}"
                  f"{'  cmdline: ' + ' '.join(v.cmdline) if v.cmdline else ''}"
                  f"  ({v.description})")
        for v in SLOW_VARIANTS.get(name, {}).values():
            print(f"  {name}:{v.name:9} {' '.join(v.qemu_args)}  cmdline: {' '.join(v.cmdline)}"
                  f"  ({v.description}; slow: only when named in ESPFIX_VM_ROWS)")
    return 0


def _cmd_build(a: argparse.Namespace) -> int:
    names = list(KERNELS) if a.all or not a.kernel else a.kernel
    if a.jobs <= 1:
        for name in names:
            print(f"{name}: {build(name, force=a.force).dir}")
        return 0
    # Several at once (CI: --jobs 2): debootstrap and apt wait on the mirror and the
    # disk as much as on a core, and each image has its own directory and lock.
    import sys
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> str:
        def log(msg: str) -> None:
            print(f"[vm] {name}: {msg}", file=sys.stderr, flush=True)
        return f"{name}: {build(name, force=a.force, log=log).dir}"

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for line in pool.map(one, names):
            print(line)
    return 0


def _command_text(words: list[str]) -> str:
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise MatrixError("no guest command given (put it after --)")
    # one word: a shell snippet as is; several: quoted as an argv
    return words[0] if len(words) == 1 else shlex.join(words)


def _cmd_run(a: argparse.Namespace) -> int:
    v = get_variant(a.kernel, a.variant)
    deb = None
    if v.init == "systemd":
        from .deb import vm_deb
        deb = Path(a.deb).resolve() if a.deb else vm_deb()
    res = run_in_vm(a.kernel, a.variant, _command_text(a.command), a.timeout,
                    keep_share=a.keep or None, deb=deb)
    sys.stdout.write(res.stdout)
    sys.stdout.flush()
    sys.stderr.write(res.stderr)
    if a.serial:
        sys.stderr.write(res.serial_log)
    print(f"[vm] {a.kernel}:{a.variant}: {res.describe()}", file=sys.stderr)
    return res.returncode


def _cmd_observe(a: argparse.Namespace) -> int:
    rows = [(a.kernel, a.variant)] if a.variant else [r for r in matrix() if r[0] == a.kernel]
    status = 0
    for kernel, variant in rows:
        res = run_in_vm(kernel, variant, "sh tests/vm/observe.sh", a.timeout)
        suite = KERNELS[kernel].suite
        out = OBSERVED / f"{suite}-{variant}.txt"
        OBSERVED.mkdir(exist_ok=True)
        out.write_text(f"# {kernel}:{variant} observed by `python3 -m tests.vm observe` "
                       f"({res.describe()})\n" + res.stdout + res.stderr)
        print(f"{out}: {res.describe()}")
        status = status or res.returncode
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.vm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="show the kernel/variant matrix and cache state")
    b = sub.add_parser("build", help="build (or reuse) images")
    b.add_argument("--kernel", action="append", choices=list(KERNELS))
    b.add_argument("--all", action="store_true")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--jobs", type=int, default=1, help="build this many images at once")
    r = sub.add_parser("run", help="boot a row and run a command as root in the guest")
    o = sub.add_parser("observe", help="record kernel facts into tests/vm/observed/")
    for q in (r, o):
        q.add_argument("--kernel", required=True, choices=list(KERNELS))
        q.add_argument("--timeout", type=float, default=600.0,
                       help="host-side limit for the VM run in seconds (default 600)")
    r.add_argument("--variant", required=True)
    r.add_argument("--keep", action="store_true", help="keep the share dir for debugging")
    r.add_argument("--serial", action="store_true", help="also print the serial log")
    r.add_argument("--deb", metavar="FILE", help="systemd variants: the .deb to install "
                   "(default: $ESPFIX_VM_DEB, else built with .ci/deb)")
    r.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the command (one word = shell snippet)")
    o.add_argument("--variant", help="default: every variant of the kernel")
    sub.add_parser("pins", help="show pinned vs current kernel ABIs in the archive")
    sub.add_parser("ensure-tools", help="apt-get install qemu-system-x86, debootstrap")
    old = sub.add_parser("oldest", help="run the host suite under the oldest claimed Python "
                         "(Debian bullseye's 3.9, in a cached chroot)")
    old.add_argument("--build-only", action="store_true", help="only build or reuse the chroot")
    old.add_argument("pytest_args", nargs=argparse.REMAINDER,
                     help="-- then extra pytest arguments")
    a = p.parse_args(argv)

    # SIGTERM -> SystemExit so that finally blocks kill qemu and unmount chroots.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if a.cmd == "list":
            return _cmd_list(a)
        if a.cmd == "build":
            return _cmd_build(a)
        if a.cmd == "run":
            return _cmd_run(a)
        if a.cmd == "observe":
            return _cmd_observe(a)
        if a.cmd == "oldest":
            from . import oldest
            if a.build_only:
                print(oldest.build())
                return 0
            extra = a.pytest_args[1:] if a.pytest_args[:1] == ["--"] else a.pytest_args
            return oldest.run_suite(extra)
        if a.cmd == "pins":
            from .pins import main as pins_main
            return pins_main()
        ensure_host_tools()
        return 0
    except (HostError, MatrixError, VMError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (qemu killed, build mounts removed)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
