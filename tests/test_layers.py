"""The layers stay visible: nothing imports a module above it.

x86 facts -> model -> memory sources -> walker -> state -> audit/snapshot -> report -> cli
"""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "inspector"

LEVEL = {
    "errors": 0, "records": 0, "x86": 0, "model": 0, "jsonfmt": 0, "fileio": 0, "safetext": 0,
    "vmcoreinfo": 0, "journal": 0,
    "elfcore": 1, "symbols": 1, "memory": 1, "target": 1, "hostfacts": 1, "elfwrite": 1, "ldt": 1,
    "pagetable": 2,
    "state": 3,
    "kdump": 1, "kallsyms_mem": 1, "dumptarget": 1, "crash": 3,
    "hotplug": 1, "watch_config": 1,
    "audit": 4, "snapshot": 5, "exercise": 5, "watch": 5, "watch_events": 5, "watch_diff": 5,
    "report": 6, "prom": 6, "diff": 6, "trace_summary": 6, "trace_output": 6,
    "cli": 7, "trace_cli": 7, "watch_cli": 7, "__main__": 8, "__init__": 0,
}


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            yield node.module or "__init__"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("inspector."):
            yield node.module.split(".", 1)[1]


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.stem)
def test_no_upward_imports(path):
    me = path.stem
    assert me in LEVEL, f"new module {me}: give it a layer in tests/test_layers.py"
    for mod in imports(path):
        mod = mod.split(".")[0]
        assert LEVEL[mod] <= LEVEL[me], f"{me} (layer {LEVEL[me]}) imports {mod} ({LEVEL[mod]})"


def test_model_does_no_io():
    src = (PKG / "model.py").read_text()
    for word in ("open(", "import os", "import sys", "pread"):
        assert word not in src
