"""Kernel lockdown in a live guest (the bookworm:lockdown row boots lockdown=confidentiality).

Lockdown refuses /proc/kcore even to root; the tool must say so in one line and exit 2.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.guest.live import lockdown_mode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(lockdown_mode() != "confidentiality",
                       reason="kernel not booted with lockdown=confidentiality "
                              "(the VM row bookworm:lockdown is)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def test_kcore_really_refused():
    """Ground truth, without the tool: open(2) itself fails with EPERM."""
    with pytest.raises(PermissionError):
        open("/proc/kcore", "rb").close()


@pytest.mark.parametrize("cmd", [["validate"], ["stacks"], ["snapshot", "-o", "/tmp/s.core"],
                                 ["trace", "1"]])
def test_lockdown_is_explained(cmd):
    proc = subprocess.run([sys.executable, "-m", "inspector", *cmd], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "lockdown=confidentiality" in proc.stderr, proc.stderr
    assert not os.path.exists("/tmp/s.core")


def test_lockdown_named_without_securityfs():
    """Without securityfs mounted the mode still comes from the kernel command line."""
    sec = "/sys/kernel/security"
    subprocess.run(["umount", sec], check=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "inspector", "validate"], cwd=ROOT,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        subprocess.run(["mount", "-t", "securityfs", "securityfs", sec], check=True)
    assert proc.returncode == 2
    assert "lockdown=confidentiality (lockdown= on the kernel command line)" in proc.stderr
