"""Journal priority prefixes: `<3>`/`<4>` on error/warning lines, only when stdout is the
journal stream systemd connected (JOURNAL_STREAM=DEV:INO matches fstat of fd 1).

The commands run as subprocesses with stdout on a real file, and JOURNAL_STREAM set to
that file's device and inode: exactly the check journald's clients make
(sd-daemon(3), systemd.exec(5)).  In a guest booted with systemd as PID 1,
tests/guest/test_deploy.py checks what journald itself made of them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from inspector.journal import prefix, stream_is_journal
from inspector.watch_events import (ErrorEvent, FindingEvent, HotplugEvent, RoundEvent,
                                     StartEvent, event_severity)
from tests.helpers import jsonschemas
from tests.conftest import ROOT, kernel
from tests.helpers.faults import BY_NAME


def run(argv: list[str], tmp_path, journal: bool | str) -> tuple[int, str, str]:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = ROOT
    with open(out, "wb") as o, open(err, "wb") as e:
        if journal is True:
            st = os.fstat(o.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal:
            env["JOURNAL_STREAM"] = journal
        rc = subprocess.run([sys.executable, "-m", "inspector", *argv], stdout=o, stderr=e,
                            env=env, cwd=ROOT, timeout=120).returncode
    return rc, out.read_text(), err.read_text()


@pytest.fixture
def faulted(write_kernel):
    """A core with an error finding (a writable espfix PTE) and one with a warning only."""
    k = kernel(nr_cpus=4)
    BY_NAME["writable-pte"](k)
    error = write_kernel(k)
    k = kernel(nr_cpus=128, online=list(range(4)), brought_up=list(range(4)))
    pages = k.syms["espfix_pages"]
    k.put_u64(pages + 8, k.get_u64(pages))      # espfix_pages[1] set, no CPU 64-127 up
    warning = write_kernel(k)
    return {"error": error, "warning": warning}


def test_stream_is_journal_compares_device_and_inode(tmp_path, monkeypatch):
    f = open(tmp_path / "x", "wb")
    g = open(tmp_path / "y", "wb")
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stream_is_journal(f.fileno())
    assert not stream_is_journal(g.fileno())             # redirected elsewhere since
    for bad in ("", "12", "a:b", f"{st.st_dev}:", f":{st.st_ino}", f"{st.st_dev}:{st.st_ino}x"):
        monkeypatch.setenv("JOURNAL_STREAM", bad)
        assert not stream_is_journal(f.fileno())
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stream_is_journal(f.fileno())
    assert (prefix("error", True), prefix("warning", True), prefix("info", True),
            prefix(None, True), prefix("error", False)) == ("<3>", "<4>", "", "", "")


def test_validate_prefixes_errors_only_in_the_journal(faulted, tmp_path):
    core, syms = faulted["error"]
    rc, plain, _ = run(["validate", "--core", core, "--symbols", syms], tmp_path, False)
    assert rc == 1 and "<3>" not in plain and "<4>" not in plain
    rc, text, _ = run(["validate", "--core", core, "--symbols", syms], tmp_path, True)
    assert rc == 1
    rows = [line for line in text.splitlines() if line.lstrip("<34>").startswith("error ")]
    assert rows and all(r.startswith("<3>error ") for r in rows), text
    assert "<3>result: FINDINGS" in text
    # stripped of the prefixes (as journald does), the report is the plain one
    assert text.replace("<3>", "") == plain
    # a JOURNAL_STREAM that names another file (stdout redirected since): no prefixes
    rc, other, _ = run(["validate", "--core", core, "--symbols", syms], tmp_path, "1:2")
    assert other == plain


def test_validate_warning_rows_get_priority_4(faulted, tmp_path):
    core, syms = faulted["warning"]
    rc, text, _ = run(["validate", "--core", core, "--symbols", syms], tmp_path, True)
    assert rc == 1
    assert any(line.startswith("<4>warning ") and "espfix_pages" in line
               for line in text.splitlines()), text
    assert "<4>result: FINDINGS" in text and "<3>" not in text
    assert not any(line.startswith("<") and "info " in line for line in text.splitlines())


def test_a_clean_validate_has_no_prefix(write_kernel, tmp_path):
    core, syms = write_kernel(kernel(nr_cpus=4))
    rc, text, _ = run(["validate", "--core", core, "--symbols", syms], tmp_path, True)
    assert rc == 0 and "<" not in text.replace("<->", "")


def test_cannot_inspect_line_is_an_error_on_a_journal_stderr(tmp_path):
    missing = str(tmp_path / "nope.core")
    out, err = tmp_path / "o", tmp_path / "e"
    with open(out, "wb") as o, open(err, "wb") as e:
        st = os.fstat(e.fileno())
        env = dict(os.environ, PYTHONPATH=ROOT, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        rc = subprocess.run([sys.executable, "-m", "inspector", "validate", "--core", missing],
                            stdout=o, stderr=e, env=env, cwd=ROOT, timeout=60).returncode
    line = err.read_text()
    assert rc == 2 and line.startswith("<3>espfix-inspect: ") and line.count("\n") == 1


def test_watch_prefixes_new_findings(faulted, tmp_path):
    core, syms = faulted["error"]
    argv = ["watch", "--core", core, "--symbols", syms, "--hotplug", "off", "0.1", "2"]
    rc, text, _ = run(argv, tmp_path, True)
    assert rc == 1
    lines = text.splitlines()
    new = [ln for ln in lines if "finding new: error" in ln]
    assert new and all(ln.startswith("<3>") for ln in new), text
    assert not any(ln.startswith("<") for ln in lines if "finding new" not in ln)
    rc, plain, _ = run(argv, tmp_path, False)
    assert "<3>" not in plain
    # JSON lines in the journal carry the same priorities
    rc, js, _ = run([*argv, "--json"], tmp_path, True)
    marked = [ln for ln in js.splitlines() if ln.startswith("<3>")]
    assert marked and all(jsonschemas.loads(ln[3:])["event"] == "finding" for ln in marked)


def _hotplug(ok: bool) -> HotplugEvent:
    return HotplugEvent("t", 3, "online", "uevent", True, True, True, "0x1", ok, [])


@pytest.mark.parametrize(("ev", "severity"), [
    (FindingEvent("t", "new", {"severity": "error"}), "error"),
    (FindingEvent("t", "new", {"severity": "warning"}), "warning"),
    (FindingEvent("t", "new", {"severity": "info"}), "info"),
    (FindingEvent("t", "gone", {"severity": "error"}), None),
    (ErrorEvent("t", 1, "x"), "error"),
    (RoundEvent("t", 1, "interval", False, False), "error"),
    (RoundEvent("t", 1, "interval", True, False), None),
    (_hotplug(False), "warning"),
    (_hotplug(True), None),
    (StartEvent("t", "0", 1, "/proc/kcore", None, 10.0, None, "off", None, None, True), None),
])
def test_event_severity(ev, severity):
    assert event_severity(ev) == severity
