"""The VM harness's own logic that needs no VM (tests/vm/run.py)."""
from __future__ import annotations

from pathlib import Path

from tests.vm.run import _died_before_init


def test_oops_before_init_is_a_boot_failure(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    serial.write_text("[    0.9] smpboot: CPU 1\n[    1.2] Oops: int3: 0000 [#1] PREEMPT SMP\n"
                      "[    1.2] RIP: 0010:sched_clock_cpu+0x9/0x1d0\n")
    assert _died_before_init(serial) == "Oops: int3: 0000 [#1] PREEMPT SMP"


def test_oops_after_init_is_the_tests_business(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    serial.write_text("espfix-vm: init at uptime 3.10s, kernel 7.2.13+deb14-amd64\n"
                      "[   40.0] Kernel panic - not syncing: sysrq triggered crash\n")
    assert _died_before_init(serial) is None


def test_quiet_boot_so_far_is_not_a_failure(tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    serial.write_text("[    0.0] Linux version 6.1.0-56-amd64\n")
    assert _died_before_init(serial) is None
    assert _died_before_init(tmp_path / "missing") is None
