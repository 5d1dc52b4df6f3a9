"""The Debian package the systemd rows install (kernels.py, variants with init "systemd").

$ESPFIX_VM_DEB names a built .deb (CI sets it to what `.ci/deb` built and checked);
otherwise `.ci/deb` is run in build-only mode (ESPFIX_DEB_BUILD_ONLY=1: dpkg-buildpackage
in build/deb/, no lintian, no install; about 16 s), once per process, so the guest gets
the package of the tree under test.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from .hostenv import HostError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def vm_deb() -> Path:
    named = os.environ.get("ESPFIX_VM_DEB")
    if named:
        p = Path(named)
        if not p.is_file() or p.suffix != ".deb":
            raise HostError(f"ESPFIX_VM_DEB={named} is not a .deb file: build one with "
                            f"`bash .ci/deb` (it prints the path), or unset ESPFIX_VM_DEB")
        return p.resolve()
    proc = subprocess.run(["bash", str(PROJECT_ROOT / ".ci" / "deb")], cwd=PROJECT_ROOT,
                          env=dict(os.environ, ESPFIX_DEB_BUILD_ONLY="1"),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].endswith(".deb"):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HostError(f"building the .deb for the systemd row failed (`bash .ci/deb` "
                        f"exit {proc.returncode}):\n{tail}")
    return Path(lines[-1])


__all__ = ["vm_deb"]
