"""Guest-suite plumbing for the fault tests (test_faults_live.py):

- they run last, after every other guest test: nothing that takes an LDT (exercise,
  trace's modify_ldt) runs while a fault is in place, and no other test sees a kernel
  that had faults in it;
- the test-only module's build starts at collection, so its 40-70 s under TCG overlap
  the other tests instead of adding to the row;
- the fault table they observed is printed at the end of the run, so it reaches the VM
  harness's output and CI logs.
"""
from __future__ import annotations

import pytest

FAULT_FILE = "test_faults_live.py"


def _is_fault_test(item: pytest.Item) -> bool:
    # nodeid, not item.path: Node.path is pytest >= 7, and the Python 3.9 job runs
    # bullseye's pytest 6.0.
    return item.nodeid.split("::", 1)[0].endswith("/" + FAULT_FILE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    faults = [i for i in items if _is_fault_test(i)]
    if not faults:
        return
    items[:] = [i for i in items if not _is_fault_test(i)] + faults
    from tests.guest.kmod import Build, cannot_build, why_not_here
    if why_not_here() is None and cannot_build() is None:
        config.espfix_kmod_build = Build()


def pytest_unconfigure(config: pytest.Config) -> None:
    build = getattr(config, "espfix_kmod_build", None)
    if build is not None:
        build.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    path = getattr(config, "espfix_fault_table", None)
    if path is None:
        return
    terminalreporter.write_sep("-", f"faults observed in this kernel ({path})")
    with open(path) as f:
        terminalreporter.write(f.read())
