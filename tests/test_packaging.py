"""What the installed package carries: the tool, never the test-only kernel module.

tests/kmod/espfix_fault.c writes kernel memory on purpose (issue 11); it must stay in the
repository's test tree and out of every sdist and wheel built from pyproject.toml.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked_tree(dest: str) -> str:
    """A copy of the tracked files (git ls-files), or of the tree without .venv."""
    src = os.path.join(dest, "src")
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "dist", "__pycache__",
            ".pytest_cache", ".pytest-tmp"))   # .pytest-tmp: the basetemp of tests.vm oldest
        return src
    for f in filter(None, files):
        os.makedirs(os.path.join(src, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    return src


def _not_the_tool(names: list[str]) -> list[str]:
    return [n for n in names if "kmod" in n or "espfix_fault" in n or "/tests/" in f"/{n}"]


def test_kernel_module_is_in_the_test_tree():
    assert os.path.exists(os.path.join(ROOT, "tests", "kmod", "espfix_fault.c"))


def _pep621_setuptools():
    """setuptools.build_meta if it reads [project] from pyproject.toml (61.0 or later);
    skips otherwise (bullseye's 52 builds an empty UNKNOWN-0.0.0)."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    import setuptools
    major = int(setuptools.__version__.split(".", 1)[0])
    if major < 61:
        pytest.skip(f"setuptools {setuptools.__version__} predates PEP 621 metadata "
                    "(61.0); the package is built with a newer one")
    return build_meta


def test_sdist_leaves_the_test_module_out(tmp_path, monkeypatch):
    build_meta = _pep621_setuptools()
    src = _tracked_tree(str(tmp_path))
    out = str(tmp_path / "dist")
    monkeypatch.chdir(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # setuptools' pyproject "beta" notice
        sdist = build_meta.build_sdist(out)
    with tarfile.open(os.path.join(out, sdist)) as t:
        names = [m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name]
    assert any(n.startswith("inspector/") for n in names)
    assert _not_the_tool(names) == []


def test_wheel_carries_only_the_tools_packages():
    """A wheel holds the packages pyproject.toml lists and their package data: the
    tool and its BPF probe source, nothing under tests/."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        st = tomllib.load(f)["tool"]["setuptools"]
    assert st["packages"] == ["inspector", "probes"]
    assert set(st.get("package-data", {})) <= {"inspector", "probes"}
