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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if vm_selected(config):
        return
    skip = pytest.mark.skip(reason="boots a QEMU/TCG VM (~15-40 s per row): "
                                   "set ESPFIX_VM=1 or run `pytest -m vm tests/vm`")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)
