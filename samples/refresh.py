#!/usr/bin/env python3
"""Re-capture the shipped snapshots from real kernels booted by the VM harness.

    python3 samples/refresh.py [NAME ...]      # default: all of SAMPLES

Each sample is `espfix-inspect exercise` (so the ministacks hold real frames) then
`espfix-inspect snapshot`, run as root in a guest of the pinned
kernel matrix (tests/vm), carried back to the host as base64 on stdout,
written atomically, then checked to validate offline with exit 0.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from inspector.elfwrite import atomic_output  # noqa: E402
from tests.vm.run import run_in_vm  # noqa: E402

#: name -> (kernel, variant): one 5-level and one 4-level PTI capture per era
SAMPLES = {
    "bookworm-6.1-l5": ("bookworm", "l5"),
    "bookworm-6.1-l4-pti": ("bookworm", "pti"),
    "bookworm-6.1-maxcpus8": ("bookworm", "maxcpus8"),
    "trixie-6.12-l5-pti": ("trixie", "l5pti"),
    "sid-7.x-l5": ("sid", "l5"),
    "sid-7.x-l4-pti": ("sid", "l4pti"),
}
BEGIN, END = "----BEGIN SNAPSHOT----", "----END SNAPSHOT----"


def capture(name: str) -> str:
    kernel, variant = SAMPLES[name]
    # exercise first, so that the ministacks hold real IRET frames for `stacks --core`
    cmd = (f"espfix-inspect exercise --duration 0.1 >&2 && "
           f"espfix-inspect snapshot -o /tmp/s.core >&2 && echo {BEGIN} && "
           f"base64 -w0 /tmp/s.core && echo && echo {END}")
    res = run_in_vm(kernel, variant, cmd, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"{name}: guest command failed ({res.describe()}):\n{res.stderr}")
    blob = res.stdout.split(BEGIN, 1)[1].split(END, 1)[0]
    path = os.path.join(HERE, f"{name}.core")
    with atomic_output(path) as fh:
        fh.write(base64.b64decode(blob))
    check = subprocess.run([sys.executable, "-m", "inspector", "validate", "--core", path],
                           cwd=ROOT, capture_output=True, text=True)
    print(f"{name}: {os.path.getsize(path)} bytes, offline validate exit {check.returncode}; "
          f"{res.stderr.strip()}")
    return path


def main(argv: list[str]) -> int:
    for name in argv or list(SAMPLES):
        if name not in SAMPLES:
            raise SystemExit(f"unknown sample {name}; known: {', '.join(SAMPLES)}")
        capture(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
