"""In-guest smoke tests: the test VM gives root a readable /proc/kcore, real kallsyms
addresses and the CPU topology its matrix row promises.

Run inside the VM by tests/vm/test_matrix.py (`python3 -m pytest -q tests/guest`).
On a host without /proc/kcore, or not as root, every test skips with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.guest.live import cpulist, lockdown_mode

KCORE = Path("/proc/kcore")
CPU = Path("/sys/devices/system/cpu")
NODE = Path("/sys/devices/system/node")

if not KCORE.exists():
    pytestmark = pytest.mark.skip(
        reason="/proc/kcore does not exist on this kernel: run in the test VM "
               "(python3 -m tests.vm run --kernel bookworm --variant l5 -- ...)")
elif os.geteuid() != 0:
    pytestmark = pytest.mark.skip(
        reason="needs root (CAP_SYS_RAWIO) for /proc/kcore and unmasked /proc/kallsyms")
elif lockdown_mode() == "confidentiality":
    pytestmark = pytest.mark.skip(reason="kernel lockdown refuses /proc/kcore: "
                                         "test_lockdown.py covers this row")


def _expect(name: str) -> str:
    """Expected value the host put in the guest env, or skip outside the test VM."""
    value = os.environ.get(f"ESPFIX_VM_EXPECT_{name}")
    if value is None:
        pytest.skip(f"ESPFIX_VM_EXPECT_{name} unset: not running in the espfix test VM")
    return value


def _kallsyms(name: str) -> list[int]:
    addrs = []
    with open("/proc/kallsyms") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == name:
                addrs.append(int(fields[0], 16))
    return addrs


def test_kcore_is_elf() -> None:
    with open(KCORE, "rb", buffering=0) as f:
        head = f.read(16)
    assert head[:4] == b"\x7fELF", f"/proc/kcore starts with {head[:4]!r}"
    assert head[4] == 2, "/proc/kcore is not ELFCLASS64"


def test_kallsyms_espfix_stack_nonzero() -> None:
    addrs = _kallsyms("espfix_stack")
    assert addrs, "espfix_stack not in /proc/kallsyms (CONFIG_X86_ESPFIX64 off?)"
    assert all(a != 0 for a in addrs), \
        "espfix_stack shows address 0: kptr_restrict is hiding kallsyms addresses"


@pytest.mark.parametrize("which", ["possible", "present", "online"])
def test_cpu_masks_fit_variant(which: str) -> None:
    want = _expect(which.upper())
    got = (CPU / which).read_text().strip()
    assert set(cpulist(got)) == set(cpulist(want)), f"cpu {which}: {got}, variant expects {want}"


def test_nproc_matches_online() -> None:
    online = set(cpulist(_expect("ONLINE")))
    assert len(os.sched_getaffinity(0)) == len(online)


def test_numa_nodes_fit_variant() -> None:
    want = _expect("NODES")
    got = (NODE / "online").read_text().strip() if (NODE / "online").exists() else "0"
    assert set(cpulist(got)) == set(cpulist(want)), f"nodes online: {got}, variant expects {want}"
