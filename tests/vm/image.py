"""Build (or reuse) a cached root image, vmlinuz and initrd for one pinned kernel.

Layout: ${ESPFIX_VM_CACHE:-/var/cache/espfix-inspect/vm}/<suite>-<kver>-<recipe-hash>/
holding root.img, vmlinuz, initrd.img and manifest.json.  A build happens in a
.build-* sibling directory and is renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from .hostenv import HostError, mirrors, require_tools
from .kernels import Kernel, get_kernel

RECIPE_VERSION = 1
IMAGE_SIZE = "3G"
GUEST_PACKAGES = (
    "python3", "python3-bpfcc", "python3-pyelftools", "python3-tabulate",
    "python3-pytest", "kmod", "initramfs-tools", "udev", "procps", "util-linux",
    # the test-only fault module (tests/kmod) is built in the guest; gcc comes with
    # the linux-headers package's dependencies
    "make", "libc6-dev",
    # peers and formats: drgn reads the same state; crash dumps through libkdumpfile,
    # written by makedumpfile (kdump-tools loads the capture kernel)
    "python3-drgn", "python3-libkdumpfile", "makedumpfile", "kexec-tools", "kdump-tools",
    "python3-jsonschema",
    # the deployed path: systemd as PID 1, node_exporter's textfile collector, Prometheus
    "systemd", "systemd-sysv", "prometheus-node-exporter", "prometheus",
)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "9pnet_virtio", "9p")
STUB_PATH = "/sbin/espfix-vm-init"   # init= on the kernel command line
SHARE_MOUNT = "/mnt/share"

# PID 1 in the image: mounts the 9p share and execs the real init script from it, so
# editing tests/vm/guest-init.sh never needs an image rebuild.
STUB = f"""#!/bin/sh
# espfix-inspect test VM: mount the 9p share and exec the real init from it.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
modprobe 9pnet_virtio
modprobe 9p
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share {SHARE_MOUNT} &&
   [ -f {SHARE_MOUNT}/guest-init.sh ]; then
    exec /bin/sh {SHARE_MOUNT}/guest-init.sh
fi
echo "espfix-vm-init: cannot mount the 9p share or find guest-init.sh" >/dev/console
echo o >/proc/sysrq-trigger
while :; do :; done
"""

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    import sys
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: Kernel
    dir: Path

    @property
    def root_img(self) -> Path:
        return self.dir / "root.img"

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.root_img, self.vmlinuz, self.initrd,
                                         self.manifest))


def cache_root() -> Path:
    return Path(os.environ.get("ESPFIX_VM_CACHE", "/var/cache/espfix-inspect/vm"))


def recipe_hash(kernel: Kernel) -> str:
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "kernel": dataclasses.asdict(kernel),
        "packages": GUEST_PACKAGES,
        "initrd_modules": INITRD_MODULES,
        "stub": STUB,
        "size": IMAGE_SIZE,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def image_for(kernel_name: str) -> Image:
    k = get_kernel(kernel_name)
    return Image(k, cache_root() / f"{k.suite}-{k.kver}-{recipe_hash(k)}")


# --------------------------------------------------------------------------- helpers

def check_pin(kernel: Kernel) -> None:
    """Fail with one clear line if the pinned linux-image .deb left the archive."""
    main, sec = mirrors()
    base = sec if kernel.archive == "debian-security" else main
    url = f"{base}/{urllib.parse.quote(kernel.image_pool)}"
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=30):
            return
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise HostError(
                f"pinned kernel linux-image-{kernel.kver}={kernel.version} ({kernel.suite}) "
                f"is no longer in the archive ({url}: HTTP {e.code}); run "
                f"`python3 -m tests.vm pins` and update KERNELS in tests/vm/kernels.py"
            ) from None
        raise HostError(f"cannot check pinned kernel at {url}: HTTP {e.code}") from None
    except OSError as e:
        raise HostError(f"cannot reach the Debian mirror ({url}): {e}") from None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                out.append(mnt)
    return out


def _safe_rmtree(path: Path) -> None:
    """Remove a build tree, but never while anything is mounted below it."""
    if not path.exists():
        return
    for mnt in sorted(_mounts_under(path), reverse=True):
        subprocess.run(["umount", mnt], check=False)
        if mnt in _mounts_under(path):
            subprocess.run(["umount", "-l", mnt], check=False)
    left = _mounts_under(path)
    if left:
        raise HostError(f"refusing to delete {path}: still mounted: {', '.join(left)}")

    def gone_ok(func: object, p: str, exc: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(exc[1], FileNotFoundError):
            raise exc[1]

    shutil.rmtree(path, onerror=gone_ok)


def _kill_chroot_procs(rootfs: Path) -> None:
    """SIGKILL every process whose root directory is inside rootfs, and wait for them."""
    prefix = str(rootfs.resolve())
    for _ in range(50):
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                root = os.readlink(d / "root")
            except OSError:
                continue
            if root == prefix or root.startswith(prefix + "/"):
                pids.append(int(d.name))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[None]:
    """proc, sys and dev inside the chroot; unmounted on every exit path."""
    done: list[Path] = []
    try:
        for args, target in ((["-t", "proc", "proc"], "proc"),
                             (["-t", "sysfs", "sysfs"], "sys"),
                             (["--bind", "/dev"], "dev"),
                             (["-t", "devpts", "devpts"], "dev/pts")):
            mnt = rootfs / target
            mnt.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(mnt)], check=True)
            done.append(mnt)
        yield
    finally:
        _kill_chroot_procs(rootfs)     # e.g. dpkg still running after Ctrl-C
        for mnt in reversed(done):
            if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=False)


def _run(cmd: list[str], logfile: Path, env: dict[str, str] | None = None) -> None:
    with open(logfile, "a") as lf:
        lf.write(f"\n$ {' '.join(cmd)}\n")
        lf.flush()
        # Own session: a terminal Ctrl-C reaches only us; we then kill the whole group.
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        raise HostError(f"`{' '.join(cmd[:6])}` failed with status {rc}; "
                        f"log: {logfile}\n" + "\n".join(tail))


def _chroot(rootfs: Path, script: str, logfile: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    _run(["chroot", str(rootfs), "/bin/sh", "-ec", script], logfile, env)


def _sources_list(kernel: Kernel) -> str:
    main, sec = mirrors()
    lines = []
    for suite in (kernel.suite, *kernel.extra_suites):
        base = sec if suite.endswith("-security") else main
        lines.append(f"deb {base} {suite} main\n")
    return "".join(lines)


# --------------------------------------------------------------------------- build

def _populate(kernel: Kernel, rootfs: Path, logfile: Path, log: Log) -> None:
    (rootfs / "etc/apt/sources.list").write_text(_sources_list(kernel))
    if kernel.apt_options:
        (rootfs / "etc/apt/apt.conf.d/99espfix-vm").write_text(
            "\n".join(kernel.apt_options) + "\n")
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    stub = rootfs / STUB_PATH.lstrip("/")
    stub.write_text(STUB)
    stub.chmod(0o755)
    (rootfs / SHARE_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/hostname").write_text("espfix-vm\n")
    (rootfs / "etc/fstab").write_text("# root is mounted by the kernel (root=/dev/vda rw)\n")

    pkgs = " ".join((*kernel.packages, *GUEST_PACKAGES))
    mods = "\n".join(INITRD_MODULES)
    t = time.monotonic()
    with chroot_mounts(rootfs):
        _chroot(rootfs, "apt-get update", logfile)
        _chroot(rootfs, f"apt-get install -y --no-install-recommends {pkgs}", logfile)
        log(f"  packages installed ({time.monotonic() - t:.0f} s)")
        t = time.monotonic()
        _chroot(rootfs, f"""
            rm -rf /tmp/irconf && cp -a /etc/initramfs-tools /tmp/irconf
            sed -i 's/^MODULES=.*/MODULES=list/' /tmp/irconf/initramfs.conf
            printf '%s\\n' '{mods}' >> /tmp/irconf/modules
            mkinitramfs -d /tmp/irconf -o /boot/espfix-initrd.img {kernel.kver}
            rm -rf /tmp/irconf
            apt-get clean
            rm -rf /var/lib/apt/lists/*_Packages /var/lib/apt/lists/*_Translation-*
            """, logfile)
        log(f"  small initrd built ({time.monotonic() - t:.0f} s)")


def build(kernel_name: str, *, force: bool = False, log: Log = _stderr_log) -> Image:
    """Return the cached image for kernel_name, building it first if needed."""
    img = image_for(kernel_name)
    if img.complete() and not force:
        return img
    require_tools("debootstrap", "mkfs.ext4", "chroot", "mount")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{img.dir.name}", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)          # one builder per image at a time
        if img.complete() and not force:
            return img
        for stale in root.glob(f".build-{img.dir.name}-*"):
            _safe_rmtree(stale)                      # left by an interrupted build
        k = img.kernel
        check_pin(k)
        main, _ = mirrors()
        tmp = root / f".build-{img.dir.name}-{os.getpid()}"
        rootfs = tmp / "rootfs"
        logfile = root / f"{img.dir.name}.build.log"   # survives a failed build
        t0 = time.monotonic()
        try:
            tmp.mkdir()
            logfile.write_text("")
            log(f"building {img.dir} (log: {logfile})")
            t = time.monotonic()
            _run(["debootstrap", "--variant=minbase", k.suite, str(rootfs), main], logfile)
            log(f"  debootstrap {k.suite} ({time.monotonic() - t:.0f} s)")
            _populate(k, rootfs, logfile, log)
            shutil.copyfile(rootfs / f"boot/vmlinuz-{k.kver}", tmp / "vmlinuz")
            shutil.copyfile(rootfs / "boot/espfix-initrd.img", tmp / "initrd.img")
            for f in (rootfs / "boot").glob("initrd.img-*"):
                f.unlink()                              # the big default initrd
            (rootfs / "boot/espfix-initrd.img").unlink()
            if _mounts_under(rootfs):
                raise HostError(f"still mounted under {rootfs}; not making the image")
            t = time.monotonic()
            _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs),
                  str(tmp / "root.img"), IMAGE_SIZE], logfile)
            log(f"  mkfs.ext4 -d ({time.monotonic() - t:.0f} s)")
            _safe_rmtree(rootfs)
            (tmp / "manifest.json").write_text(json.dumps({
                "kernel": dataclasses.asdict(k),
                "recipe_hash": recipe_hash(k),
                "mirror": main,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1),
            }, indent=2) + "\n")
            if img.dir.exists():                         # --force: replace the old one
                _safe_rmtree(img.dir)
            os.rename(tmp, img.dir)
            log(f"image ready in {time.monotonic() - t0:.0f} s: {img.dir}")
        finally:
            _safe_rmtree(tmp)   # no-op after the rename; cleans up on any failure
    return img
