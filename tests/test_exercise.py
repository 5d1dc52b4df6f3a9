"""`exercise`: the verdict logic (negative controls included), the real round trips on
this machine (modify_ldt and ptrace work here, /proc/kcore does not), and cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from inspector import exercise as ex
from inspector.errors import InspectError
from inspector.x86 import USER32_CS, USER_CS, USER_DS, ldt_selector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SS16 = ldt_selector(ex.LDT_ENTRY)
CODE = range(0x10000, 0x10000 + len(ex.SPIN64))


def rt(mode=ex.MODE64, rsp=0x7A5E_C0DE_1230, back=None, **kw):
    r = ex.RoundTrip(0, mode.name, mode.cs, USER_DS if mode.flat_ss else SS16, rsp,
                     rsp if back is None else back, iterations=1000, interruptions=10, **kw)
    ex.judge(r, mode, CODE)
    return r


def frame(rip=0x10004, cs=USER_CS, ss=SS16, rsp=0x7A5E_C0DE_1230):
    return {"rax": 1, "rip": rip, "cs": cs, "rflags": 0x202, "rsp": rsp, "ss": ss}


# -- judge: what counts as a leak -------------------------------------------------

def test_clean_round_is_ok():
    assert rt().verdict == "ok"


def test_foreign_bits_16_31_in_saved_rsp_are_a_leak():
    """Negative control: kernel bits in RSP[31:16] must be caught."""
    r = rt(back=0x7A5E_9F3A_1230)
    assert r.verdict == "LEAK" and "saved RSP" in r.reasons[0]


def test_child_seen_mismatch_is_a_leak():
    r = rt(child_mismatches=3, child_last_bad=0x7A5E_9F3A_1230)
    assert r.verdict == "LEAK" and "0x9f3a vs 0xc0de" in r.reasons[0]


def test_compat_high_half_is_vendor_behaviour_not_a_leak():
    r = rt(ex.MODE32, rsp=0xC0DE_1230, back=0xFFFFFF44_C0DE_1230)
    assert r.verdict == "ok" and "vendor behaviour" in r.reasons[0]


def test_compat_low_half_must_match():
    assert rt(ex.MODE32, rsp=0xC0DE_1230, back=0xFFFFFF44_D00D_1230).verdict == "LEAK"


def test_ministack_frame_of_this_child_is_ok():
    assert rt(frame=frame(), frame_checked=True).verdict == "ok"


def test_ministack_frame_with_foreign_rsp_bits_is_a_leak():
    r = rt(frame=frame(rsp=0x7A5E_1111_1230), frame_checked=True)
    assert r.verdict == "LEAK" and "bits 16..31 0x1111" in r.reasons[0]


@pytest.mark.parametrize("f", [None, frame(rip=0x400000), frame(ss=0x2B), frame(cs=USER32_CS)])
def test_missing_or_other_frame(f):
    r = rt(frame=f, frame_checked=True)
    assert r.verdict == "NO-FRAME"


def test_control_round_must_not_leave_a_frame():
    assert rt(ex.CONTROL, frame=frame(ss=USER_DS), frame_checked=True).verdict == "CONTROL-FAILED"
    assert rt(ex.CONTROL, frame=frame(rip=0x500000), frame_checked=True).verdict == "ok"


def test_no_progress_is_not_ok():
    r = ex.RoundTrip(0, "64-bit", USER_CS, SS16, 0x7A5E_C0DE_1230, 0x7A5E_C0DE_1230)
    ex.judge(r, ex.MODE64, CODE)
    assert r.verdict == "IDLE"


# -- failure causes -----------------------------------------------------------------

@pytest.mark.parametrize(("stage", "err", "needle"), [
    (2, 38, "CONFIG_MODIFY_LDT_SYSCALL"),
    (2, 1, "seccomp"),
    (3, 1, "ptrace(PTRACE_TRACEME) refused"),
    (1, 22, "cannot pin"),
])
def test_setup_errors_name_the_cause(stage, err, needle):
    assert needle in ex.setup_error(stage, err).line()


def test_einval_is_16bit_segments_refused(monkeypatch):
    monkeypatch.setattr(ex, "_seccomp_mode", lambda: "0")
    assert "CONFIG_X86_16BIT" in ex.setup_error(2, 22).line()


def test_fred_means_nothing_to_exercise(monkeypatch):
    class Facts:
        fred = True
    monkeypatch.setattr(ex, "read_host_facts", lambda: Facts())
    with pytest.raises(InspectError, match="FRED"):
        ex.exercise([0])


# -- the real thing, on this machine ------------------------------------------------

def _allowed() -> list[int]:
    return sorted(os.sched_getaffinity(0))[:2]


@pytest.fixture(scope="module")
def rounds():
    try:
        return ex.exercise(_allowed(), 0.2)
    except InspectError as e:
        pytest.skip(f"cannot exercise on this machine: {e.line()}")


def test_round_trips_on_this_machine(rounds):
    assert len(rounds) == 4 * len(_allowed())
    for r in rounds:
        assert r.verdict == "ok", (r.mode, r.reasons)
        assert r.iterations > 0
        assert r.interruptions > 0 or (r.timer_irqs or 0) > 0, "nothing interrupted the child"
        assert r.ss == SS16 and not r.frame_checked


def test_rsp_comes_back_with_our_bits(rounds):
    for r in rounds:
        assert (r.rsp_back >> 16) & 0xFFFF == (r.rsp_set >> 16) & 0xFFFF


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_child_killed_and_reaped_on_signal(sig):
    proc = subprocess.Popen([sys.executable, "-m", "inspector", "exercise", "--no-kcore",
                             "--cpu", str(_allowed()[0]), "--duration", "20"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        kids: list[int] = []
        while not kids and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            kids = _children(proc.pid)
        if proc.poll() is not None:
            pytest.skip(f"exercise cannot run here: {proc.stderr.read().strip()}")
        assert kids, "no exercise child appeared"
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    for kid in kids:
        assert not os.path.exists(f"/proc/{kid}"), f"child {kid} survived the {sig.name}"


def _gone(pid: int, timeout: float) -> bool:
    """True once *pid* no longer exists (or is a zombie nobody will reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_child_dies_with_a_sigkilled_parent():
    """An OOM kill or a systemd stop timeout sends SIGKILL: no finally block runs in the
    parent, so the kernel must kill the child (PR_SET_PDEATHSIG, PTRACE_O_EXITKILL)."""
    proc = subprocess.Popen([sys.executable, "-m", "inspector", "exercise", "--no-kcore",
                             "--cpu", str(_allowed()[0]), "--duration", "20"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while not kids and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            kids = _children(proc.pid)
        if proc.poll() is not None:
            pytest.skip(f"exercise cannot run here: {proc.stderr.read().strip()}")
        assert kids, "no exercise child appeared"
        time.sleep(0.5)                   # the child is set up and spinning
        proc.kill()
        proc.wait(timeout=10)
        for kid in kids:
            assert _gone(kid, 5), f"child {kid} survived SIGKILL of its parent"
    finally:
        for kid in kids:
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_idle_round_is_retried_then_could_not_run(monkeypatch):
    """A round whose child never ran is run again, longer, before it counts; a round
    that still cannot run is 'could not run', not a finding."""
    durations = []

    def fake_round(page, pid, cpu, mode, lo, duration, *a):
        durations.append(duration)
        r = ex.RoundTrip(cpu, mode.name, mode.cs, SS16, lo, duration=duration)
        r.verdict = "IDLE"
        return r
    monkeypatch.setattr(ex, "round_trip", fake_round)
    monkeypatch.setattr(ex, "refuse_if_fred", lambda: None)
    rounds = ex.exercise([_allowed()[0]], duration=0.25)
    assert durations[:3] == [0.25, 1.0, 4.0]
    assert all(r.verdict == ex.COULD_NOT_RUN and r.attempts == 3 for r in rounds)
    assert "still idle after 3 attempts" in rounds[0].reasons[-1]


def test_idle_then_running_round_is_ok(monkeypatch):
    calls = []

    def fake_round(page, pid, cpu, mode, lo, duration, *a):
        calls.append(duration)
        r = ex.RoundTrip(cpu, mode.name, mode.cs, SS16, lo, duration=duration)
        r.verdict = "IDLE" if len(calls) == 1 else "ok"
        return r
    monkeypatch.setattr(ex, "round_trip", fake_round)
    monkeypatch.setattr(ex, "refuse_if_fred", lambda: None)
    rounds = ex.exercise([_allowed()[0]], duration=0.5)
    assert rounds[0].verdict == "ok" and rounds[0].attempts == 2
    assert "ran on attempt 2" in rounds[0].reasons[-1]
    assert all(r.attempts == 1 for r in rounds[1:])


def test_all_rounds_could_not_run_is_exit_2(monkeypatch, capsys):
    from inspector.cli import main

    def fake_exercise(cpus, duration, state, control, progress=None):
        return [ex.RoundTrip(c, "64-bit", USER_CS, SS16, 0, verdict=ex.COULD_NOT_RUN)
                for c in cpus]
    monkeypatch.setattr(ex, "exercise", fake_exercise)
    assert main(["exercise", "--no-kcore", "--cpu", str(_allowed()[0])]) == 2
    err = capsys.readouterr().err
    assert "no exercise round could run" in err and err.count("\n") == 1


def test_empty_cpu_selection_is_an_error(capsys):
    from inspector.cli import main
    with pytest.raises(SystemExit) as e:
        main(["exercise", "--cpu", ""])
    assert e.value.code == 2
    assert "the CPU list is empty" in capsys.readouterr().err
