"""Guest-suite reporting: the fault table test_faults_live.py observed, printed at the end
of the run so that it reaches the VM harness's output (and CI logs)."""
from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    path = getattr(config, "espfix_fault_table", None)
    if path is None:
        return
    terminalreporter.write_sep("-", f"faults observed in this kernel ({path})")
    with open(path) as f:
        terminalreporter.write(f.read())
