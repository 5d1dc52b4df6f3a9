"""The systemd units in contrib/systemd: hardening rated by systemd itself, and the
options that must stay off said so in the file.

`systemd-analyze security --offline=true` (systemd 252+) rates a unit file without a
running systemd.  Whether an option really breaks /proc/kcore is shown on a real boot
(tests/guest/test_deploy.py runs validate under each of them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

UNITS = os.path.join(ROOT, "contrib", "systemd")
SERVICES = sorted(n for n in os.listdir(UNITS) if n.endswith(".service"))
MAX_EXPOSURE = 3.0
#: options incompatible with reading /proc/kcore and /proc/kallsyms (see the units)
MUST_STAY_OFF = ("PrivateDevices", "ProtectKernelTunables", "ProtectKernelLogs")


def settings(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in open(os.path.join(UNITS, name)):
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def hardening(name: str) -> dict[str, list[str]]:
    skip = {"Description", "Documentation", "ExecStart", "ExecReload", "Type",
            "RemainAfterExit", "Before", "After", "WantedBy", "RequiredBy", "Restart",
            "RestartSec", "RestartPreventExitStatus", "KillSignal", "KillMode",
            "TimeoutStopSec", "SyslogIdentifier", "StandardOutput", "StandardError",
            "ConditionPathExists", "ReadWritePaths", "RestrictAddressFamilies"}
    return {k: v for k, v in settings(name).items() if k not in skip}


def test_units_use_the_packaged_binary():
    for name in os.listdir(UNITS):
        text = open(os.path.join(UNITS, name)).read()
        assert "/usr/local" not in text, name
    for name in SERVICES:
        assert settings(name)["ExecStart"][0].startswith("/usr/bin/espfix-inspect "), name


@pytest.mark.parametrize("name", SERVICES)
def test_options_that_must_stay_off_are_off_and_explained(name):
    s = settings(name)
    text = open(os.path.join(UNITS, name)).read()
    comments = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    for opt in MUST_STAY_OFF:
        assert s.get(opt) == ["no"], f"{name}: {opt} must be set to no explicitly"
        assert re.search(rf"^# - {opt}=yes ", comments, re.M), f"{name}: say why {opt} is off"
    assert "CAP_SYS_RAWIO" in s["CapabilityBoundingSet"][0]


def test_the_periodic_service_is_hardened_like_the_boot_one():
    assert hardening("espfix-inspect-recheck.service") == \
        hardening("espfix-inspect-validate.service")
    r = settings("espfix-inspect-recheck.service")
    assert "RemainAfterExit" not in r and "WantedBy" not in r     # the timer starts it
    t = open(os.path.join(UNITS, "espfix-inspect-recheck.timer")).read()
    assert "OnUnitActiveSec=" in t and "WantedBy=timers.target" in t


def _offline_security(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", path],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("name", SERVICES)
def test_exposure_is_at_most_3(name):
    proc = _offline_security(os.path.join(UNITS, name))
    if "--offline" in proc.stderr or "unrecognized option" in proc.stderr:
        pytest.skip("systemd-analyze here has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout
