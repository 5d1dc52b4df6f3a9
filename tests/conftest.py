"""Shared fixtures: synthetic kernels written to a temporary directory."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.helpers.synthcore import SynthKernel, SynthSpec  # noqa: E402


@pytest.fixture
def write_kernel(tmp_path):
    """write_kernel(kernel, kind="kallsyms") -> (core_path, symbols_path)."""
    counter = iter(range(1000))

    def _write(kernel: SynthKernel, kind: str = "kallsyms"):
        n = next(counter)
        core = str(tmp_path / f"core{n}")
        syms = str(tmp_path / (f"vmlinux{n}" if kind == "vmlinux" else f"syms{n}"))
        kernel.write(core, syms, kind)
        return core, syms
    return _write


@pytest.fixture
def inspect(write_kernel):
    """inspect(kernel, host=None) -> (state, audit result) for a synthetic kernel."""
    from inspector.audit import audit
    from inspector.hostfacts import HostFacts
    from inspector.state import load_state
    from inspector.target import open_target
    opened = []

    def _inspect(kernel: SynthKernel, host: dict | None = None, kind: str = "kallsyms"):
        core, syms = write_kernel(kernel, kind)
        target = open_target(core, syms)
        opened.append(target)
        state = load_state(target, HostFacts.from_dict(host or {}))
        return state, audit(state)
    yield _inspect
    for t in opened:
        t.close()


def kernel(**kw) -> SynthKernel:
    return SynthKernel(SynthSpec(**kw))
