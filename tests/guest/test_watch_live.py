"""`watch` on a live kernel, and the systemd units' command lines, as root in a VM guest.

One watch runs (interval 30 s, so every other round is event-driven) while this test takes
a CPU offline and online through sysfs, runs `exercise` on it, and sends SIGHUP and
SIGTERM.  Ground truth: the sysfs CPU lists, the CPU the test itself hotplugged, and the
frame `exercise` left.  The guest has no systemd as PID 1, so the units' ExecStart lines
are run as written, under the unit's CapabilityBoundingSet and NoNewPrivileges (setpriv).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.guest.live import cpulist, kcore_usable
from tests.helpers.jsonproc import JsonLinesProc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "contrib", "systemd")
_USABLE, _WHY = kcore_usable()
pytestmark = [pytest.mark.guest, pytest.mark.skipif(not _USABLE, reason=_WHY or "-")]
SYS_CPU = "/sys/devices/system/cpu"
TOOL = [sys.executable, "-m", "inspector"]
ENV = {**os.environ, "PYTHONPATH": ROOT}


def sysfs_online() -> list[int]:
    return cpulist(open(f"{SYS_CPU}/online").read())


def hotpluggable_cpu() -> int | None:
    for cpu in sorted(sysfs_online(), reverse=True):
        if cpu != 0 and os.path.exists(f"{SYS_CPU}/cpu{cpu}/online"):
            return cpu
    return None


def set_online(cpu: int, on: bool) -> None:
    with open(f"{SYS_CPU}/cpu{cpu}/online", "w") as f:
        f.write("1" if on else "0")


class Watch(JsonLinesProc):
    def __init__(self, argv: list[str]) -> None:
        super().__init__(argv, ROOT, ENV)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    cpu = hotpluggable_cpu()
    if cpu is None:
        pytest.skip("no online CPU besides cpu0 can be taken offline here")
    textfile = tmp_path_factory.mktemp("textfile")
    w = Watch([*TOOL, "watch", "--json", "--textfile", str(textfile), "30"])
    s: dict = {"cpu": cpu, "watch": w, "textfile": str(textfile)}
    try:
        s["first"] = w.until(lambda e: e["event"] == "round", 180)
        t = time.monotonic()
        set_online(cpu, False)
        s["offline_sysfs"] = sysfs_online()
        s["off"] = w.until(lambda e: e["event"] == "hotplug" and e["action"] == "offline", 20)
        s["off_round"] = w.until(lambda e: e["event"] == "round", 20)
        s["off_latency"] = s["off"]["_seen"] - t
        set_online(cpu, True)
        s["on"] = w.until(lambda e: e["event"] == "hotplug" and e["action"] == "online", 20)
        s["on_round"] = w.until(lambda e: e["event"] == "round", 20)
        ex = subprocess.run([*TOOL, "exercise", "--cpu", str(cpu), "--duration", "0.1",
                             "--no-kcore", "--json"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
        assert ex.returncode == 0, ex.stderr
        s["exercise"] = json.loads(ex.stdout)
        w.p.send_signal(signal.SIGHUP)
        s["reload_round"] = w.until(lambda e: e["event"] == "round"
                                    and e["trigger"] == "reload", 30)
        s["prom"] = open(os.path.join(str(textfile), "espfix_inspect.prom")).read()
        s["rc"], s["stderr"] = w.stop()
        s["sysfs_online"] = sysfs_online()
        yield s
    finally:
        if not os.path.exists(f"{SYS_CPU}/cpu{cpu}/online") or \
                open(f"{SYS_CPU}/cpu{cpu}/online").read().strip() != "1":
            set_online(cpu, True)
        w.kill()


def test_offline_is_validated_at_once(session):
    off, cpu = session["off"], session["cpu"]
    assert (off["cpu"], off["source"], off["online"], off["initialised"], off["ok"]) == \
        (cpu, "uevent", False, True, True)
    assert session["off_latency"] < 10, "a 30 s interval: this round came from the uevent"
    rnd = session["off_round"]
    assert rnd["trigger"] == f"hotplug cpu{cpu} offline"
    assert cpulist(rnd["cpus_online"]) == session["offline_sysfs"]
    assert cpu in cpulist(rnd["cpus_initialised"])        # the kernel never frees it
    assert rnd["summary"]["error"] == rnd["summary"]["warning"] == 0


def test_online_again_keeps_the_ministack(session):
    on, off = session["on"], session["off"]
    assert (on["cpu"], on["source"], on["online"], on["ok"]) == (session["cpu"], "uevent",
                                                                True, True)
    assert on["espfix_stack"] == off["espfix_stack"] is not None
    assert cpulist(session["on_round"]["cpus_online"]) == session["sysfs_online"]


def test_the_exercised_cpu_shows_a_new_frame(session):
    cpu = session["cpu"]
    frames = [e for e in session["watch"].events
              if e["event"] == "espfix_frame" and e["cpu"] == cpu]
    assert frames, session["watch"].events
    last = frames[-1]["frame"]
    child = [r for r in session["exercise"]["rounds"] if r["cpu"] == cpu][-1]
    assert last["ss"] == child["ss"] == "0xf" and last["cs"] == child["cs"]
    assert (int(last["rsp"], 16) >> 16) & 0xFFFF == (int(child["rsp_set"], 16) >> 16) & 0xFFFF
    later = [e for e in session["watch"].events if e["event"] == "round"
             and e["round"] > session["on_round"]["round"]]
    assert any(cpu in cpulist(r["frames_new"]) for r in later)


def test_sigterm_is_a_clean_exit(session):
    assert session["rc"] == 0 and session["stderr"] == ""
    stop = session["watch"].events[-1]
    assert stop["event"] == "stop" and stop["reason"] == "SIGTERM"
    pid = session["watch"].p.pid
    assert not os.path.exists(f"/proc/{pid}")                   # reaped
    orphans = [d for d in os.listdir("/proc") if d.isdigit()
               and _ppid(d) == pid]
    assert orphans == []


def _ppid(pid: str) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_round_cost_is_small(session):
    """The issue's bound: < 1% of one CPU at a 10 s interval, i.e. < 100 ms per round."""
    rounds = [e for e in session["watch"].events if e["event"] == "round"][1:]
    mean = sum(r["cost"]["cpu_seconds"] for r in rounds) / len(rounds)
    assert len(rounds) >= 3 and mean < 0.1, [r["cost"] for r in rounds]


def test_textfile(session):
    text = session["prom"]
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:      # Debian's python3-prometheus-client is not in the guest image
        text_string_to_metric_families = None
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) espfix_inspect_\w+ .+", line), line
            continue
        m = re.fullmatch(r'(espfix_inspect_\w+(?:\{[^}]*\})?) (-?[0-9.e+-]+)', line)
        assert m, line
        samples[m.group(1)] = float(m.group(2))
    if text_string_to_metric_families is not None:
        assert {f.name for f in text_string_to_metric_families(text)}
    last = session["reload_round"]
    assert samples["espfix_inspect_up"] == 1
    assert samples["espfix_inspect_cpus_online"] == len(session["sysfs_online"])
    assert samples["espfix_inspect_validation_ok"] == int(last["ok"])
    assert samples['espfix_inspect_hotplug_events_total{action="offline"}'] == 1
    assert samples['espfix_inspect_hotplug_events_total{action="online"}'] == 1
    assert samples[f'espfix_inspect_espfix_frames_seen_total{{cpu="{session["cpu"]}"}}'] >= 1
    assert samples["espfix_inspect_rounds_total"] == last["round"]
    print(text)


# ---------------------------------------------------------------------------- units

def unit_lines(name: str) -> dict[str, str]:
    out = {}
    for line in open(os.path.join(UNITS, name)):
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def as_run(name: str, replace_config: str | None = None) -> list[str]:
    """The unit's ExecStart as this guest can run it, under its bounding set and no_new_privs."""
    u = unit_lines(name)
    argv = u["ExecStart"].split()
    assert argv[0] == "/usr/bin/espfix-inspect"
    args = argv[1:]
    if replace_config is not None:
        args = [replace_config if a.startswith("/etc/espfix-inspect/") else a for a in args]
    caps = [c.lower().removeprefix("cap_") for c in u["CapabilityBoundingSet"].split()]
    bounding = "-all," + ",".join(f"+{c}" for c in caps)
    prefix = ["setpriv", f"--bounding-set={bounding}"]
    if u.get("NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    return [*prefix, *TOOL, *args]


def test_oneshot_unit_command_validates_like_validate():
    plain = subprocess.run([*TOOL, "validate", "--json"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode in (0, 1), plain.stderr
    unit = subprocess.run(as_run("espfix-inspect-validate.service"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert unit.returncode == plain.returncode, unit.stderr
    verdict = "OK" if plain.returncode == 0 else "FINDINGS"
    assert f"result: {verdict}" in unit.stdout and unit.stderr == ""


def test_watch_unit_command_with_a_config(tmp_path):
    conf = tmp_path / "watch.conf"
    conf.write_text(f"interval = 60\njson = yes\ntextfile = {tmp_path}\n")
    w = Watch(as_run("espfix-inspect-watch.service", str(conf)))
    try:
        start = w.until(lambda e: e["event"] == "start", 120)
        assert start["hotplug"].startswith("uevents"), start   # the netlink socket opened
        rnd = w.until(lambda e: e["event"] == "round", 180)
        assert rnd["up"] and cpulist(rnd["cpus_online"]) == sysfs_online()
        assert (tmp_path / "espfix_inspect.prom").exists()
        rc, err = w.stop()
        assert rc == 0 and err == ""
    finally:
        w.kill()
