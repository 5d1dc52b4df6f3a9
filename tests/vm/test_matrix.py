"""Boot every matrix row once and run the in-guest test suite (tests/guest) as root.

Selected only with ESPFIX_VM=1 or `-m vm`; ESPFIX_VM_ROWS=bookworm:l5,sid narrows the rows;
ESPFIX_VM_TIMEOUT (seconds, default 1500) bounds each VM run (a fault-test row took 13 min
on a host shared with another VM).
"""
from __future__ import annotations

import os

import pytest

from .kernels import matrix, parse_rows
from .run import VMError, run_in_vm

GUEST_PYTEST = "python3 -m pytest -q -rs -p no:cacheprovider tests/guest"
ROWS = parse_rows(os.environ["ESPFIX_VM_ROWS"]) if os.environ.get("ESPFIX_VM_ROWS") \
    else matrix()


@pytest.mark.vm
@pytest.mark.parametrize(("kernel", "variant"), ROWS, ids=[f"{k}-{v}" for k, v in ROWS])
def test_guest_suite(kernel: str, variant: str) -> None:
    timeout = float(os.environ.get("ESPFIX_VM_TIMEOUT", "1500"))
    try:
        res = run_in_vm(kernel, variant, GUEST_PYTEST, timeout)
    except VMError as e:
        pytest.fail(str(e), pytrace=False)
    print(f"{kernel}:{variant}: {res.describe()}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        pytest.fail(f"guest pytest on {kernel}:{variant} exited {res.returncode} "
                    f"({res.describe()})\n--- guest stdout ---\n{res.stdout}"
                    f"--- guest stderr ---\n{res.stderr}"
                    f"--- serial log (tail) ---\n"
                    + "\n".join(res.serial_log.splitlines()[-30:]), pytrace=False)
