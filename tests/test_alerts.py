"""The Prometheus alerting rules (contrib/prometheus) under Prometheus's own rule engine.

`promtool` (Debian: in the prometheus package, installed by .ci/setup) checks the file
and runs the unit tests next to it: input series as watch's textfile produces them,
alerts expected at given times.  The live counterpart, a real Prometheus scraping a
real node_exporter in a guest booted with systemd, is tests/guest/test_deploy.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from inspector.prom import METRICS
from tests.conftest import ROOT

RULES_DIR = os.path.join(ROOT, "contrib", "prometheus")
RULES = os.path.join(RULES_DIR, "espfix-inspect.rules.yml")
TESTS = os.path.join(RULES_DIR, "espfix-inspect.rules.test.yml")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/setup does)")


def promtool(*args: str, cwd: str = RULES_DIR) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_rules_use_only_metrics_watch_writes():
    text = open(RULES).read()
    used = set(re.findall(r"\bespfix_inspect_\w+", text))
    assert used and used <= set(METRICS), used - set(METRICS)


@needs_promtool
def test_promtool_check_rules():
    proc = promtool("check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 4 rules found" in proc.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", TESTS)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


@needs_promtool
def test_the_unit_tests_can_fail(tmp_path):
    """A rule that no longer alerts on a single error finding must fail the tests."""
    broken = open(RULES).read().replace('{severity="error"}) > 0', '{severity="error"}) > 5')
    assert broken != open(RULES).read()
    (tmp_path / "espfix-inspect.rules.yml").write_text(broken)
    shutil.copy(TESTS, tmp_path)
    proc = promtool("test", "rules", os.path.basename(TESTS), cwd=str(tmp_path))
    assert proc.returncode != 0 and "EspfixError" in proc.stdout + proc.stderr
