"""`exercise` on a live kernel: every online CPU, tied to its ministack through /proc/kcore.

Each round's child must leave its own IRET frame (RIP in its code, CS, SS = the LDT
selector, RSP[31:16]) in the ministack of the CPU it ran on; the flat-SS control round
must not.  `stacks` afterwards shows those frames too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.guest.live import kcore_usable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_USABLE, _WHY = kcore_usable()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _USABLE, reason=_WHY or "-")]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})


def online() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def doc() -> dict:
    proc = run("exercise", "--control", "--duration", "0.3", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_every_online_cpu_exercised_and_cross_checked(doc):
    assert doc["ok"] and doc["kcore_cross_check"], doc.get("kcore_note")
    assert sorted({r["cpu"] for r in doc["rounds"]}) == online()
    for r in doc["rounds"]:
        assert r["verdict"] == "ok" and r["frame_checked"], r


def test_ministack_holds_the_childs_frame(doc):
    for r in doc["rounds"]:
        if r["mode"] == "control":
            continue
        f = r["frame"]
        assert f["ss"] == r["ss"] == "0xf" and f["cs"] == r["cs"]
        assert (int(f["rsp"], 16) >> 16) & 0xFFFF == (int(r["rsp_set"], 16) >> 16) & 0xFFFF


def test_stacks_shows_the_last_exercise_frame(doc):
    proc = run("stacks", "--json")
    assert proc.returncode == 0, proc.stderr
    frames = {c["cpu"]: c["frame"] for c in json.loads(proc.stdout)["cpus"]}
    for cpu in online():
        assert frames[cpu] is not None and frames[cpu]["ss"] == "0xf", (cpu, frames[cpu])
