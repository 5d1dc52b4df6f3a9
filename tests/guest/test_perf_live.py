"""The live fast paths of issue 13 against ground truth in the guest, as root.

- The targeted scan of /proc/kallsyms resolves every name open_target asks for to what
  the full table of every line gives (the kernel's own s_show() format, read twice).
- drgn, reading every possible CPU's espfix_stack, espfix_waddr and 48-byte ministack
  through its own kallsyms support (bench/drgn_espfix.py, the benchmark's reference),
  sees what ``stacks --json`` prints.  Needs python3-drgn with kallsyms helpers (0.0.25+;
  trixie and sid images, not bookworm's 0.0.22).

Timing is left to bench/bench_live.py; nothing here is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.guest.live import kcore_usable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_USABLE, _WHY = kcore_usable()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _USABLE, reason=_WHY or "-")]


def test_kallsyms_scan_matches_the_full_table():
    from inspector.elfcore import ElfCore
    from inspector.symbols import load_symbols
    from inspector.target import KALLSYMS_PATH, KCORE_PATH, live_symbol_names
    with ElfCore(KCORE_PATH) as core:
        names = live_symbol_names(core.vmcoreinfo)
    scanned = load_symbols(KALLSYMS_PATH, names)
    full = load_symbols(KALLSYMS_PATH)
    assert scanned.resolve is not None, "the scan fell back to the full parser"
    for name in names:
        assert (name in scanned.addresses) == (name in full.addresses), name
        assert scanned.addresses.get(name) == full.addresses.get(name), name
        assert scanned.types.get(name) == full.types.get(name), name
    for name in ("espfix_stack", "espfix_pages", "init_top_pgt", "__per_cpu_offset"):
        assert name in scanned.addresses, name
    assert scanned.late == []


def _drgn_has_kallsyms() -> bool:
    try:
        from drgn.helpers.linux import kallsyms
    except ImportError:
        return False
    return hasattr(kallsyms, "_load_builtin_kallsyms")


@pytest.mark.skipif(not _drgn_has_kallsyms(),
                    reason="python3-drgn without kallsyms helpers (bookworm ships 0.0.22)")
def test_drgn_reads_what_stacks_prints():
    env = {**os.environ, "PYTHONPATH": ROOT}
    drgn = subprocess.run([sys.executable, "bench/drgn_espfix.py", "--json"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert drgn.returncode == 0, drgn.stderr
    stacks = subprocess.run([sys.executable, "-m", "inspector", "stacks", "--json"], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert stacks.returncode == 0, stacks.stderr
    seen = json.loads(drgn.stdout)["cpus"]
    rows = {str(r["cpu"]): r for r in json.loads(stacks.stdout)["cpus"]}
    assert sorted(seen, key=int) == sorted(rows, key=int)
    for cpu, d in seen.items():
        for key in ("espfix_stack", "espfix_waddr", "frame"):
            assert d[key] == rows[cpu][key], (cpu, key, d[key], rows[cpu][key])
