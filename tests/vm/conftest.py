"""pytest plumbing for the VM tests: the `vm` marker, and skipping unless selected.

VM tests run only with ESPFIX_VM=1 or when `-m` names `vm` (e.g. `pytest -m vm tests/vm`);
a plain `pytest` never boots a VM.  ESPFIX_VM_ROWS=bookworm:l5,sid:l5 picks rows.
"""
from __future__ import annotations

import os
import re

import pytest

MARKER = "vm: boots a QEMU/TCG test VM (slow); selected by ESPFIX_VM=1 or -m vm"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def vm_selected(config: pytest.Config) -> bool:
    if os.environ.get("ESPFIX_VM") == "1":
        return True
    expr = config.getoption("markexpr", "") or ""
    return bool(re.search(r"\bvm\b", expr)) and not re.search(r"\bnot\s+vm\b", expr)


def _boot_cost(item: pytest.Item) -> int:
    """A rough weight of one VM test (a boot): rows with the live fault tests or the QEMU
    dumps run 2-4 times longer than a plain row, and a kdump test boots twice."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "kernel" not in callspec.params:
        return 0
    from tests.guest.kmod import FAULT_ROWS
    from tests.vm.test_matrix import DUMP_ROWS
    row = (callspec.params["kernel"], callspec.params["variant"])
    if item.name.startswith("test_kdump"):
        return 2
    return 1 + 3 * (f"{row[0]}:{row[1]}" in FAULT_ROWS) + 2 * (row in DUMP_ROWS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vm_selected(config):
        # Longest boots first, so that with pytest-xdist (.ci/run: -n 2) the two workers
        # finish close together instead of one waiting on a fault row started last.
        items.sort(key=_boot_cost, reverse=True)      # stable: same cost keeps its order
        return
    skip = pytest.mark.skip(reason="boots a QEMU/TCG VM (~15-40 s per row): "
                                   "set ESPFIX_VM=1 or run `pytest -m vm tests/vm`")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)
