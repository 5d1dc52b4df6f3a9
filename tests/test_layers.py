"""The layers stay visible: nothing imports a module above it, and nothing imports in a
circle.

x86 facts -> model -> memory sources -> walker -> state -> audit/snapshot -> report ->
command modules -> cli

Every import counts: ``import``/``from`` statements at any depth (a lazy import inside
a function is still a dependency), ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name, in inspector/ and in probes/.  A dynamic
import whose name is not a literal would hide a dependency from this test, so there is
none.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "inspector"
PROBES = ROOT / "probes"

LEVEL = {
    "errors": 0, "records": 0, "x86": 0, "model": 0, "jsonfmt": 0, "fileio": 0, "safetext": 0,
    "vmcoreinfo": 0, "journal": 0, "schema": 0, "vocab": 0, "progress": 0,
    "elfcore": 1, "symbols": 1, "memory": 1, "target": 1, "hostfacts": 1, "elfwrite": 1, "ldt": 1,
    "pagetable": 2,
    "state": 3,
    "kdump": 1, "kallsyms_mem": 1, "dumptarget": 1, "crash": 3,
    "hotplug": 1, "watch_config": 1,
    "audit": 4, "snapshot": 5, "exercise": 5, "watch": 5, "watch_events": 5, "watch_diff": 5,
    "report": 6, "prom": 6, "diff": 6, "trace_summary": 6, "trace_output": 6,
    "probes": 0, "probes.trace": 6,
    "cliutil": 7, "trace_cli": 7, "watch_cli": 7,
    "cli": 8, "__main__": 9, "__init__": 0,
}

SOURCES = sorted(PKG.glob("*.py")) + sorted(PROBES.glob("*.py"))


def name_of(path):
    if path.parent == PROBES:
        return "probes" if path.stem == "__init__" else f"probes.{path.stem}"
    return path.stem


def _module(absolute):
    """The LEVEL key of an absolute module name, None for modules outside the project."""
    top, _, rest = absolute.partition(".")
    if top == "inspector":
        return rest.split(".")[0] or "__init__"
    if top == "probes":
        return f"probes.{rest.split('.')[0]}" if rest else "probes"
    return None


def _is_module(package_dir, name):
    return (package_dir / f"{name}.py").exists()


def _targets(node, here):
    """Project modules one AST node imports; *here* is the importing module's directory."""
    package = "inspector" if here == PKG else "probes"
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield _module(alias.name)
    elif isinstance(node, ast.ImportFrom):
        base = f"{package}.{node.module}" if node.level == 1 and node.module else \
            package if node.level == 1 else node.module or ""
        assert node.level <= 1, "no imports from above the package"
        target_dir = {"inspector": PKG, "probes": PROBES}.get(base)
        if target_dir is not None:          # from . import a, b / from inspector import a
            for alias in node.names:
                yield _module(f"{base}.{alias.name}" if _is_module(target_dir, alias.name)
                              else base)
        else:
            yield _module(base)
    elif isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), \
                f"line {node.lineno}: {name}() with a computed name hides a dependency"
            text = arg.value
            yield _module(f"{package}{text}" if text.startswith(".") else text)


def imports(path, module_level_only=False):
    tree = ast.parse(path.read_text())

    def nodes(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
                    node.test.id == "TYPE_CHECKING":
                yield from nodes(node.orelse)
                continue
            yield node
            yield from nodes(ast.iter_child_nodes(node))

    walk = nodes(tree.body) if module_level_only else ast.walk(tree)
    for node in walk:
        for mod in _targets(node, path.parent):
            if mod is not None:
                yield mod


@pytest.mark.parametrize("path", SOURCES, ids=name_of)
def test_no_upward_imports(path):
    me = name_of(path)
    assert me in LEVEL, f"new module {me}: give it a layer in tests/test_layers.py"
    for mod in imports(path):
        assert mod in LEVEL, f"{me} imports {mod}, which has no layer"
        assert LEVEL[mod] <= LEVEL[me], f"{me} (layer {LEVEL[me]}) imports {mod} ({LEVEL[mod]})"


def test_no_import_cycles():
    """What a module imports when it is imported (not in a function) forms no cycle:
    cli <-> trace_cli, report -> exercise -> ldt (ctypes and libc at import) and
    prom -> elfwrite were such hidden loops."""
    graph = {name_of(p): set(imports(p, module_level_only=True)) - {name_of(p), "__init__"}
             for p in SOURCES}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_the_scan_sees_every_kind_of_import():
    """The scanner itself: a lazy import, a from-package import of modules and a literal
    importlib call are all seen; a computed importlib name is refused."""
    text = ("from . import trace_cli, __version__\n"
            "def f():\n    from .report import dumps\n"
            "    import importlib\n    importlib.import_module('.prom', __package__)\n"
            "    __import__('inspector.diff')\n"
            "from probes import trace\n")
    found = {m for node in ast.walk(ast.parse(text)) for m in _targets(node, PKG) if m}
    assert found == {"trace_cli", "__init__", "report", "prom", "diff", "probes.trace"}
    bad = ast.parse("import importlib\nimportlib.import_module(f'.{name}', 'inspector')\n")
    with pytest.raises(AssertionError, match="computed name"):
        for node in ast.walk(bad):
            list(_targets(node, PKG))


def test_model_does_no_io():
    for name in ("model.py", "x86.py"):
        src = (PKG / name).read_text()
        for word in ("open(", "import os", "import sys", "pread"):
            assert word not in src, f"{name}: {word}"


CLI_LAYER = {"cli", "cliutil", "trace_cli", "watch_cli", "diff", "__main__"}
FLAG = __import__("re").compile(r"--(core|symbols|cpu)\b")


@pytest.mark.parametrize("path", [p for p in SOURCES if name_of(p) not in CLI_LAYER],
                         ids=name_of)
def test_lower_layers_name_no_command_line_option_in_errors(path):
    """An error's fix says {core}, {symbols} or {cpus}; the command words it (--symbols
    for validate, --symbols-a for diff, a watch.conf key for watch)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if not (name.endswith(("Error", "Unreadable", "Filtered")) or name == "open_regular"):
            continue
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            for const in ast.walk(arg):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    assert not FLAG.search(const.value), \
                        f"{name_of(path)}:{node.lineno} names an option: {const.value!r}"
