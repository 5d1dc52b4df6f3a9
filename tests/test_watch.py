"""watch: rounds on synthetic cores, hotplug events, signals, config and the systemd units.

The kernel side of hotplug is replayed in the synthetic core (the online mask, and
init_espfix_ap() for a first online); the uevent side is the kernel's datagram format
sent over a local datagram socket, through the same parser and loop as the netlink one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from inspector.cli import main
from inspector.errors import InspectError
from inspector.hotplug import CpuEvent, SysfsPollSource, UeventSource, parse_uevent
from inspector.watch import Watcher
from inspector.watch_config import WatchConfig, build_config, read_config
from inspector.watch_events import Event, event_json, event_text
from tests.helpers import jsonschemas
from tests.conftest import ROOT, kernel
from tests.helpers.faults import BY_NAME
from tests.helpers.jsonproc import JsonLinesProc

FRAME = (0x1234, 0x401000, 0x33, 0x246, 0x7FFD12345678, 0xF)


def uevent(action: str, devpath: str, subsystem: str = "cpu", seq: int = 4711) -> bytes:
    """A datagram as lib/kobject_uevent.c sends it to NETLINK_KOBJECT_UEVENT group 1."""
    env = [f"ACTION={action}", f"DEVPATH={devpath}", f"SUBSYSTEM={subsystem}", f"SEQNUM={seq}"]
    return f"{action}@{devpath}\0".encode() + "\0".join(env).encode() + b"\0"


def rewrite_in_place(k, core: str, tmp_path) -> None:
    """Write *k* over *core* in place (same inode, same mtime), as a live kernel's memory
    changes under an open /proc/kcore: only a fresh read can see it."""
    fresh = str(tmp_path / "rewrite.core")
    k.write(fresh)
    data = open(fresh, "rb").read()
    st = os.stat(core)
    assert st.st_size == len(data), "layout changed: not an in-place update"
    with open(core, "r+b") as f:
        f.write(data)
    os.utime(core, ns=(st.st_atime_ns, st.st_mtime_ns))


class Sink:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(jsonschemas.check(event_json(ev), "watch"))
        event_text(ev)                  # every event renders

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


# ---------------------------------------------------------------------------- uevents

def test_parse_uevent_cpu_actions():
    assert parse_uevent(uevent("offline", "/devices/system/cpu/cpu3")) == \
        CpuEvent("offline", 3, "uevent")
    assert parse_uevent(uevent("online", "/devices/system/cpu/cpu17")) == \
        CpuEvent("online", 17, "uevent")
    assert parse_uevent(uevent("add", "/devices/system/cpu/cpu4")) == CpuEvent("add", 4, "uevent")


@pytest.mark.parametrize("data", [
    uevent("online", "/devices/system/memory/memory8", "memory"),        # memory hotplug
    uevent("change", "/devices/system/cpu/cpu3"),                        # not a state change
    uevent("bind", "/devices/system/cpu/cpu0"),                          # driver bind
    uevent("add", "/devices/system/cpu/cpu3/cache/index0", "cpu"),       # a child object
    uevent("add", "/devices/system/machinecheck/machinecheck3", "machinecheck"),
    b"libudev\0\xfe\xed\xca\xfe" + bytes(32),                            # udev's own format
    b"", b"garbage",
])
def test_parse_uevent_ignores_everything_else(data):
    assert parse_uevent(data) is None


def test_uevent_source_reads_a_burst_and_skips_noise():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    src = UeventSource(a)
    try:
        assert src.read_events() == []
        b.send(uevent("offline", "/devices/system/cpu/cpu2"))
        b.send(uevent("add", "/devices/virtual/net/lo", "net"))
        b.send(uevent("online", "/devices/system/cpu/cpu2"))
        assert src.read_events() == [CpuEvent("offline", 2, "uevent"),
                                     CpuEvent("online", 2, "uevent")]
    finally:
        src.close()
        b.close()


def test_the_netlink_socket_opens_here():
    """NETLINK_KOBJECT_UEVENT group 1 needs no privilege (NL_CFG_F_NONROOT_RECV)."""
    try:
        src = UeventSource()
    except OSError as e:
        pytest.skip(f"no netlink uevent socket in this sandbox: {e}")
    assert src.sock.getsockname()[1] == 1
    assert src.read_events() == []
    src.close()


def test_sysfs_poll_fallback(tmp_path):
    online = tmp_path / "online"
    online.write_text("0-3\n")
    src = SysfsPollSource(str(online))
    assert src.read_events() == []
    online.write_text("0-2\n")
    assert src.read_events() == [CpuEvent("offline", 3, "sysfs")]
    online.write_text("0-3,5\n")
    assert src.read_events() == [CpuEvent("online", 3, "sysfs"), CpuEvent("online", 5, "sysfs")]


# ---------------------------------------------------------------------------- rounds

def watcher_for(core: str, syms: str, sink: Sink, **kw) -> Watcher:
    cfg = WatchConfig(core=core, symbols=syms, **kw)
    return Watcher(cfg, sink, hotplug=None)


def test_new_frames_and_new_faults_are_seen_with_the_target_kept_open(write_kernel, tmp_path):
    k = kernel(nr_cpus=4, frames={0: FRAME})
    core, syms = write_kernel(k)
    sink = Sink()
    w = watcher_for(core, syms, sink)
    try:
        r1 = w.round("start")
        assert r1.ok and r1.frames_held == [0] and r1.frames_new == []   # first look: baseline
        target = w.target
        k.write_frame(2, (0x99, 0x402000, 0x23, 0x202, 0xFFFFFF00ABCD1230, 0xF))
        k.write_frame(0, FRAME[:3] + (0x202,) + FRAME[4:])              # same slot, new frame
        rewrite_in_place(k, core, tmp_path)
        r2 = w.round("interval")
        assert w.target is target, "the target was reopened: the cache test proves nothing"
        assert r2.frames_new == [0, 2] and r2.frames_held == [0, 2]
        frames = {e["cpu"]: e for e in sink.of("espfix_frame")}
        assert frames[2]["frame"]["rip"] == "0x402000" and frames[2]["seen"] == 1
        assert frames[0]["frame"]["rflags"] == "0x202"
        r3 = w.round("interval")
        assert r3.frames_new == [] and r3.frames_seen == {0: 1, 2: 1}
        # a page-table page changes under the open core: the cached copy must not be used
        BY_NAME["writable-pte"](k)
        rewrite_in_place(k, core, tmp_path)
        r4 = w.round("interval")
        assert w.target is target
        assert not r4.ok and {f.check for f in r4.findings} >= {"pte_prot"}
        new = [e for e in sink.of("finding") if e["change"] == "new"]
        assert any(e["check"] == "pte_prot" and e["severity"] == "error" for e in new)
    finally:
        w._close_target()


def test_a_replaced_core_file_is_reopened(write_kernel, tmp_path):
    k = kernel(nr_cpus=4)
    core, syms = write_kernel(k)
    sink = Sink()
    w = watcher_for(core, syms, sink)
    try:
        w.round("start")
        first = w.target
        k.write_frame(1, FRAME)
        k.write(core)                            # atomic replace: a new inode
        r = w.round("interval")
        assert w.target is not first and r.frames_new == [1]
    finally:
        w._close_target()


def test_online_mask_changes_are_hotplug_events_without_uevents(write_kernel, tmp_path):
    k = kernel(nr_cpus=8, online=[0, 1, 2, 3])
    core, syms = write_kernel(k)
    sink = Sink()
    w = watcher_for(core, syms, sink)
    try:
        w.round("start")
        assert sink.of("hotplug") == []
        k._set_mask("__cpu_online_mask", [0, 1, 2])          # cpu3 went offline
        k.init_espfix_ap(5)                                  # cpu5 came up the first time
        k._set_mask("__cpu_online_mask", [0, 1, 2, 5])
        rewrite_in_place(k, core, tmp_path)
        r = w.round("interval")
        hp = {e["cpu"]: e for e in sink.of("hotplug")}
        assert set(hp) == {3, 5}
        assert hp[3]["action"] == "offline" and hp[3]["source"] == "online mask"
        assert not hp[3]["online"] and hp[3]["initialised"] and hp[3]["ok"]
        assert hp[5]["action"] == "online" and hp[5]["online"] and hp[5]["initialised"]
        assert hp[5]["espfix_stack"] == f"{k.get_percpu(5, 'espfix_stack'):#x}"
        assert r.online == [0, 1, 2, 5] and r.initialised == [0, 1, 2, 3, 5]
        assert r.hotplug_events == {"offline": 1, "online": 1}
    finally:
        w._close_target()


def test_a_uevent_validates_the_changed_cpu_at_once(write_kernel, tmp_path):
    """Interval 60 s: the hotplug round must come from the uevent, within a second."""
    k = kernel(nr_cpus=4)
    core, syms = write_kernel(k)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink = Sink()
    times: list[float] = []

    def on_round(res):
        times.append(time.monotonic())
        if res.number == 1:                 # the kernel takes cpu3 down, then says so
            k._set_mask("__cpu_online_mask", [0, 1, 2])
            rewrite_in_place(k, core, tmp_path)
            b.send(uevent("offline", "/devices/system/cpu/cpu3"))
        else:
            w.stop("test")

    w = Watcher(WatchConfig(core=core, symbols=syms, interval=60), sink, on_round,
                hotplug=UeventSource(a))
    status = w.run()
    b.close()
    assert status == 0
    rounds = sink.of("round")
    assert [r["trigger"] for r in rounds] == ["start", "hotplug cpu3 offline"]
    assert times[1] - times[0] < 1.0
    (hp,) = sink.of("hotplug")
    assert (hp["cpu"], hp["action"], hp["source"], hp["online"], hp["initialised"], hp["ok"]) \
        == (3, "offline", "uevent", False, True, True)
    assert any(e["change"] == "new" and e["check"] == "cpu_init" and e["cpu"] == 3
               for e in sink.of("finding"))
    assert sink.events[-1]["event"] == "stop" and sink.events[-1]["reason"] == "test"
    assert rounds[1]["cpus_online"] == "0-2"


def test_the_sysfs_poll_fallback_drives_the_loop(write_kernel, tmp_path):
    k = kernel(nr_cpus=4)
    core, syms = write_kernel(k)
    online = tmp_path / "online"
    online.write_text("0-3\n")
    src = SysfsPollSource(str(online))
    src.poll_interval = 0.05
    sink = Sink()

    def on_round(res):
        if res.number == 1:
            k._set_mask("__cpu_online_mask", [0, 1, 3])
            rewrite_in_place(k, core, tmp_path)
            online.write_text("0-1,3\n")
        else:
            w.stop("test")

    w = Watcher(WatchConfig(core=core, symbols=syms, interval=60), sink, on_round, hotplug=src)
    t = time.monotonic()
    assert w.run() == 0 and time.monotonic() - t < 5
    (hp,) = sink.of("hotplug")
    assert (hp["cpu"], hp["action"], hp["source"], hp["online"]) == (2, "offline", "sysfs", False)


def test_count_rounds_and_exit_status(write_kernel):
    k = kernel(nr_cpus=4)
    BY_NAME["writable-pte"](k)
    core, syms = write_kernel(k)
    sink = Sink()
    w = Watcher(WatchConfig(core=core, symbols=syms, interval=0.1, count=3), sink, hotplug=None)
    t = time.monotonic()
    assert w.run() == 1
    assert 0.18 < time.monotonic() - t < 5
    assert [r["trigger"] for r in sink.of("round")] == ["start", "interval", "interval"]
    # the finding is new once, not every round
    assert len([e for e in sink.of("finding") if e["check"] == "pte_prot"]) == 1


def test_a_later_round_that_cannot_inspect_is_an_error_event(write_kernel, tmp_path):
    k = kernel(nr_cpus=4)
    core, syms = write_kernel(k)
    sink = Sink()
    w = watcher_for(core, syms, sink)
    w.round("start")
    os.truncate(core, 1000)
    r = w.round("interval")
    assert not r.up and "truncated" in r.error
    (err,) = sink.of("error")
    assert "truncated" in err["message"]
    assert sink.of("round")[-1]["up"] is False
    k.write(core)
    assert w.round("interval").up
    w._close_target()


# ---------------------------------------------------------------------------- config

def test_config_file(tmp_path):
    conf = tmp_path / "watch.conf"
    conf.write_text("# comment\n\ninterval = 2.5   # seconds\njson = yes\nframes=off\n"
                    "textfile =\nhotplug = poll\n")
    assert read_config(str(conf)) == {"interval": 2.5, "json": True, "frames": False,
                                      "textfile": None, "hotplug": "poll"}
    cfg = build_config(str(conf), {"interval": 7.0}, count=3)
    assert (cfg.interval, cfg.json, cfg.frames, cfg.count) == (7.0, True, False, 3)


def test_the_shipped_example_config_parses():
    cfg = build_config(os.path.join(ROOT, "contrib", "watch.conf"), {})
    assert cfg == WatchConfig(textfile="/var/lib/prometheus/node-exporter")


@pytest.mark.parametrize(("text", "words"), [
    ("intervall = 3\n", ["watch.conf:1", "unknown key 'intervall'"]),
    ("\ninterval = 0\n", ["watch.conf:2", "interval"]),
    ("json = maybe\n", ["watch.conf:1", "not yes or no"]),
    ("just words\n", ["watch.conf:1", "expected key = value"]),
    ("hotplug = udev\n", ["use auto, poll or off"]),
])
def test_bad_config_is_one_line(tmp_path, text, words):
    conf = tmp_path / "watch.conf"
    conf.write_text(text)
    with pytest.raises(InspectError) as ei:
        read_config(str(conf))
    for w in words:
        assert w in ei.value.line()


# ---------------------------------------------------------------------------- CLI

def test_cli_failures_are_one_line_exit_2(capsys, tmp_path, write_kernel):
    core, syms = write_kernel(kernel())
    cases = [
        (["watch", "--core", str(tmp_path / "nope.core"), "1", "1"], "does not exist"),
        (["watch", "--core", core, "1", "1"],      # the fix names the option and the key
         "carries no symbols: pass the kernel's System.map or vmlinux as --symbols (or "
         "symbols = in the --config file)"),
        (["watch", "--core", core, "--symbols", syms, "--textfile", str(tmp_path / "nodir"),
          "1", "1"], "textfile directory"),
        (["watch", "--config", str(tmp_path / "none.conf")], "config file"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


def test_cli_json_lines(capsys, write_kernel, tmp_path):
    core, syms = write_kernel(kernel(nr_cpus=4))
    assert main(["watch", "--json", "--core", core, "--symbols", syms,
                 "--textfile", str(tmp_path), "0.1", "2"]) == 0
    evs = jsonschemas.loads_lines(capsys.readouterr().out, "watch")
    assert [e["event"] for e in evs] == ["start", "round", "round", "stop"]
    assert evs[1]["cost"]["pages_read"] > 0 and evs[1]["cpus_initialised"] == "0-3"
    assert (tmp_path / "espfix_inspect.prom").exists()


# ---------------------------------------------------------------------------- signals

class Proc(JsonLinesProc):
    """A watch subprocess whose stdout lines are read with a deadline."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__([sys.executable, "-m", "inspector", *argv], ROOT,
                         {**os.environ, "PYTHONPATH": ROOT})


def test_sighup_reloads_and_sigterm_stops_cleanly(write_kernel, tmp_path):
    core, syms = write_kernel(kernel(nr_cpus=4))
    conf = tmp_path / "watch.conf"
    conf.write_text(f"interval = 30\njson = yes\ncore = {core}\nsymbols = {syms}\n")
    w = Proc(["watch", "--config", str(conf)])
    w.until(lambda e: e["event"] == "round")
    conf.write_text(f"interval = 0.2\njson = yes\nframes = no\ncore = {core}\n"
                    f"symbols = {syms}\n")
    w.p.send_signal(signal.SIGHUP)
    ev = w.until(lambda e: e["event"] == "reload")
    assert ev["changed"] == {"interval": [30.0, 0.2], "frames": [True, False]}
    w.until(lambda e: e["event"] == "round" and e["trigger"] == "reload")
    w.until(lambda e: e["event"] == "round" and e["trigger"] == "interval", timeout=5)
    conf.write_text("interval = soon\n")             # a bad file: refused, old one kept
    w.p.send_signal(signal.SIGHUP)
    ev = w.until(lambda e: e["event"] == "error")
    assert "reload refused" in ev["message"] and "watch.conf:1" in ev["message"]
    w.until(lambda e: e["event"] == "round" and e["trigger"] == "interval", timeout=5)
    w.p.send_signal(signal.SIGTERM)
    rc, err = w.finish()
    assert rc == 0, err
    stop = w.events[-1]
    assert stop["event"] == "stop" and stop["reason"] == "SIGTERM"
    assert err.count("\n") == 1 and "reload refused" in err         # one line per failure


def test_sigint_stops_cleanly_mid_wait(write_kernel):
    core, syms = write_kernel(kernel(nr_cpus=4))
    w = Proc(["watch", "--json", "--core", core, "--symbols", syms, "60"])
    w.until(lambda e: e["event"] == "round")
    t = time.monotonic()
    w.p.send_signal(signal.SIGINT)
    rc, err = w.finish()
    assert rc == 0 and err == "" and time.monotonic() - t < 5
    assert w.events[-1]["reason"] == "SIGINT"


# ---------------------------------------------------------------------------- systemd units

UNITS = os.path.join(ROOT, "contrib", "systemd")


def unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in open(os.path.join(UNITS, name)):
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def test_unit_files_say_what_the_issue_asks():
    v = unit("espfix-inspect-validate.service")
    assert v["Type"] == ["oneshot"] and v["RemainAfterExit"] == ["yes"]
    assert v["ExecStart"][0].split() == ["/usr/bin/espfix-inspect", "validate"]
    # boot assessment (systemd.special(7)): a failed validation fails boot-complete.target
    assert v["Before"] == ["boot-complete.target"]
    assert v["RequiredBy"] == ["boot-complete.target"] and v["WantedBy"] == ["multi-user.target"]
    assert "After" not in v          # as early as the basic system allows, not after multi-user
    w = unit("espfix-inspect-watch.service")
    assert w["ExecStart"][0].split()[:3] == ["/usr/bin/espfix-inspect", "watch", "--config"]
    assert w["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert w["Restart"] == ["on-failure"] and w["RestartPreventExitStatus"] == ["2"]
    assert "AF_NETLINK" in w["RestrictAddressFamilies"][0]
    assert w.get("PrivateNetwork", ["no"]) == ["no"]  # uevents only reach the host netns


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_units_pass_systemd_analyze_verify(tmp_path):
    exe = shutil.which("espfix-inspect") or os.path.join(os.path.dirname(sys.executable),
                                                         "espfix-inspect")
    if not os.path.exists(exe):
        pytest.skip("espfix-inspect is not installed (pip install -e .)")
    for name in os.listdir(UNITS):
        text = open(os.path.join(UNITS, name)).read()
        (tmp_path / name).write_text(text.replace("/usr/bin/espfix-inspect", exe))
    # Documentation=man:espfix-inspect-*(8) must resolve: the pages in man/ (test_man.py)
    env = dict(os.environ, MANPATH=os.path.join(ROOT, "man") + ":")
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.iterdir())],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
