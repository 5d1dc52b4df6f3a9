"""Boot every matrix row once and run the in-guest test suite (tests/guest) as root.

Selected only with ESPFIX_VM=1 or `-m vm`; ESPFIX_VM_ROWS=bookworm:l5,sid narrows the rows;
ESPFIX_VM_TIMEOUT (seconds, default: the variant's timeout_s, 1500 for the default rows:
a fault-test row took 13 min on a host shared with another VM) bounds each VM run.

The rows in DUMP_ROWS also get a QMP monitor and `-device vmcoreinfo`: their guest suite
(tests/guest/test_dump_live.py) asks the hypervisor for dumps after `exercise`, and the
host reads them with nothing but the dump before the share is removed
(tests/vm/dumpcheck.py).  ESPFIX_VM_DUMPS=0 turns that off.
"""
from __future__ import annotations

import json
import os

import pytest

from .dumpcheck import check_share, host_cannot_read_dumps
from .hostenv import HostError
from .kernels import get_variant, matrix, parse_rows
from .run import VMError, VMOptions, run_in_vm

GUEST_PYTEST = "python3 -m pytest -q -rs -p no:cacheprovider --durations=12"
ROWS = parse_rows(os.environ["ESPFIX_VM_ROWS"]) if os.environ.get("ESPFIX_VM_ROWS") \
    else matrix()
#: (kernel, variant) -> (QEMU dump-guest-memory formats, memory for that boot in MiB or
#: None for the variant's, also dump before qemu_fw_cfg is loaded).  kdump-compressed
#: dumps of these 2 GiB guests are 60-80 MB; the ELF one is all of RAM (2.1 GB), written
#: to /tmp and removed with the share right after the checks.
DUMP_ROWS: dict[tuple[str, str], tuple[tuple[str, ...], int | None, bool]] = {
    ("bookworm", "l5"): (("kdump-zlib",), None, True),
    ("sid", "l5"): (("kdump-zlib", "elf"), None, False),
}


_host_reads_dumps = host_cannot_read_dumps


def dump_options(kernel: str, variant: str) -> VMOptions | None:
    if os.environ.get("ESPFIX_VM_DUMPS") == "0" or (kernel, variant) not in DUMP_ROWS \
            or _host_reads_dumps() is not None:
        return None
    formats, mem, novmci = DUMP_ROWS[(kernel, variant)]
    if os.environ.get("ESPFIX_VM_DUMP_FORMATS"):
        formats = tuple(os.environ["ESPFIX_VM_DUMP_FORMATS"].split(","))
    expect = [f"qemu.{f}" for f in formats]
    return VMOptions(qemu_args=("-device", "vmcoreinfo"), mem_mb=mem, qmp=True,
                     env={"ESPFIX_VM_DUMP_FORMATS": ",".join(formats),
                          "ESPFIX_VM_DUMP_NOVMCI": "1" if novmci else "0"},
                     collect=lambda share: check_share(share, expect, novmci=novmci))


@pytest.mark.vm
@pytest.mark.parametrize(("kernel", "variant"), ROWS, ids=[f"{k}-{v}" for k, v in ROWS])
def test_guest_suite(kernel: str, variant: str) -> None:
    v = get_variant(kernel, variant)
    timeout = float(os.environ.get("ESPFIX_VM_TIMEOUT", v.timeout_s))
    opts = dump_options(kernel, variant)
    try:
        deb = None
        if v.init == "systemd":          # the deployed path: boots with the .deb installed
            from .deb import vm_deb
            deb = vm_deb()
        res = run_in_vm(kernel, variant, f"{GUEST_PYTEST} {v.guest_args}", timeout,
                        options=opts, deb=deb)
    except (VMError, HostError) as e:
        pytest.fail(str(e), pytrace=False)
    print(f"{kernel}:{variant}: {res.describe()}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        pytest.fail(f"guest pytest on {kernel}:{variant} exited {res.returncode} "
                    f"({res.describe()})\n--- guest stdout ---\n{res.stdout}"
                    f"--- guest stderr ---\n{res.stderr}"
                    f"--- serial log (tail) ---\n"
                    + "\n".join(res.serial_log.splitlines()[-30:]), pytrace=False)
    if opts is None and (kernel, variant) in DUMP_ROWS and _host_reads_dumps():
        pytest.skip(f"guest suite passed; the dump checks of this row did not run: "
                    f"{_host_reads_dumps()}")
    if opts is not None:
        report = res.collected
        print(f"dumps on the host: {json.dumps(report, indent=1)}")
        if report["problems"]:
            pytest.fail(f"{kernel}:{variant} dumps: " + "\n".join(report["problems"]),
                        pytrace=False)
