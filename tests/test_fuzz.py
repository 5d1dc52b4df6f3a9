"""The input boundary under a deterministic mutation fuzzer (tests/helpers/fuzz.py).

Every mutant of the real samples and of synthetic cores, symbol files and JSON
documents must end in exit 0/1, or exit 2 with one line naming a cause, within the
time limit and the memory limit, leaking no file descriptor and no raw control
character.  Failing mutants found once are kept in tests/data/fuzz and replayed here.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import fuzz

CASES = sorted(glob.glob(os.path.join(fuzz.REGRESSIONS, "*.case.json")))
#: Mutants in the bounded run (about 20-30 s of CPU on a CI machine); a long run:
#: python3 -m tests.helpers.fuzz --count 20000 --seed N (see docs/input-safety.md).
COUNT = int(os.environ.get("ESPFIX_FUZZ_COUNT", "1200"))


@pytest.mark.parametrize("case", CASES, ids=lambda p: os.path.basename(p)[:-10])
def test_saved_failing_mutants_stay_fixed(case):
    for argv in fuzz.replay_argv(case):
        rc, _, err, _, failure = fuzz.run_cli(argv)
        assert failure is None, f"{argv[0]} {os.path.basename(case)}: {failure}"
        assert rc in (0, 1, 2)


def test_regression_corpus_is_not_empty():
    assert len(CASES) >= 10


def test_bounded_fuzz_run():
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.fuzz", "--count", str(COUNT),
                           "--seed", "1", "--json"], cwd=fuzz.ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["runs"] >= 2 * COUNT
    assert not summary["failures"], json.dumps(summary["failures"][:10], indent=1)
    # every operator ran, and the mutants reached every outcome
    assert set(summary["by_operator"]) == set(fuzz.OPERATORS)
    totals = {k: sum(d[k] for d in summary["by_operator"].values())
              for k in ("exit0", "exit1", "exit2")}
    assert all(totals.values()), totals
