"""The oldest Python espfix-inspect claims: the host suite under Debian bullseye's Python 3.9.

``requires-python`` in pyproject.toml names the oldest Python the code supports.  This
Python is not on the development and CI machines (Debian 12 has 3.11), so the suite runs
in a debootstrap'd Debian bullseye chroot with Debian's own packages: Python 3.9.2,
pyelftools 0.27, tabulate 0.8.7, pytest 6.0, prometheus_client 0.9.  The chroot is cached
next to the VM images (same cache root, same lock and build-directory discipline), keyed
by a hash of this recipe, so a second run only copies the tree and runs pytest.

    python3 -m tests.vm oldest              # build or reuse the chroot, run the host suite
    python3 -m tests.vm oldest -- -k prom   # extra pytest arguments
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .hostenv import HostError, mirrors, require_tools
from .image import _run, _safe_rmtree, cache_root, chroot_mounts

RECIPE_VERSION = 1
SUITE = "bullseye"
#: What the host suite imports, as Debian bullseye packages them (no pip: these are the
#: versions a bullseye user gets from apt).
PACKAGES = ("python3", "python3-pytest", "python3-pyelftools", "python3-tabulate",
            "python3-prometheus-client", "python3-jsonschema")
PROJECT_IN_CHROOT = "/tmp/espfix-project"


def recipe_hash() -> str:
    blob = json.dumps({"v": RECIPE_VERSION, "suite": SUITE, "packages": PACKAGES},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def chroot_dir() -> Path:
    return cache_root() / f"{SUITE}-python-{recipe_hash()}"


def _log(msg: str) -> None:
    print(f"[oldest] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(name: str):
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".lock-{name}", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)     # one builder or runner per chroot at a time
        yield


def _build(dest: Path) -> None:
    """debootstrap the chroot into a .build-* sibling and rename it into place."""
    require_tools("debootstrap", "chroot", "mount")
    root = cache_root()
    for stale in root.glob(f".build-{dest.name}-*"):
        _safe_rmtree(stale)
    tmp = root / f".build-{dest.name}-{os.getpid()}"
    logfile = root / f"{dest.name}.build.log"
    main, _ = mirrors()
    t0 = time.monotonic()
    try:
        tmp.mkdir()
        logfile.write_text("")
        _log(f"building {dest} (log: {logfile})")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
              str(tmp / "rootfs"), main], logfile)
        (tmp / "rootfs/var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
        for deb in (tmp / "rootfs/var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        versions = subprocess.run(
            ["chroot", str(tmp / "rootfs"), "python3", "-c",
             "import sys, elftools, tabulate, pytest; "
             "print(sys.version.split()[0], elftools.__version__, tabulate.__version__, "
             "pytest.__version__)"],
            capture_output=True, text=True, check=True).stdout.split()
        (tmp / "manifest.json").write_text(json.dumps({
            "suite": SUITE, "packages": PACKAGES, "recipe_hash": recipe_hash(),
            "python": versions[0], "pyelftools": versions[1], "tabulate": versions[2],
            "pytest": versions[3], "mirror": main,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - t0, 1),
        }, indent=2) + "\n")
        os.rename(tmp, dest)
        _log(f"chroot ready in {time.monotonic() - t0:.0f} s: Python {versions[0]}, "
             f"pyelftools {versions[1]}, tabulate {versions[2]}, pytest {versions[3]}")
    finally:
        _safe_rmtree(tmp)


def build() -> Path:
    dest = chroot_dir()
    with _locked(dest.name):
        if not (dest / "manifest.json").is_file():
            _build(dest)
    return dest


def run_suite(pytest_args: list[str]) -> int:
    """Copy the project into the chroot and run the host suite there; pytest's status."""
    from .run import PROJECT_ROOT, TREE_IGNORE
    dest = build()
    rootfs = dest / "rootfs"
    with _locked(dest.name):
        project = rootfs / PROJECT_IN_CHROOT.lstrip("/")
        _safe_rmtree(project)
        shutil.copytree(PROJECT_ROOT, project, ignore=TREE_IGNORE, symlinks=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root",
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = ["chroot", str(rootfs), "/bin/sh", "-c",
               f"cd {PROJECT_IN_CHROOT} && exec python3 -m pytest -q -rs "
               f"-p no:cacheprovider --basetemp={PROJECT_IN_CHROOT}/.pytest-tmp tests "
               + " ".join(map(_quote, pytest_args))]   # basetemp goes with the tree
        t0 = time.monotonic()
        try:
            with chroot_mounts(rootfs):
                rc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode
        finally:
            _safe_rmtree(project)
        manifest = json.loads((dest / "manifest.json").read_text())
        _log(f"host suite under Python {manifest['python']} (Debian {SUITE}): exit {rc} "
             f"in {time.monotonic() - t0:.0f} s")
    return rc


def _quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


__all__ = ["build", "run_suite", "chroot_dir", "HostError"]
