"""The node_exporter textfile: parsed with prometheus_client's own text-format parser.

Inputs: the real snapshots in samples/ (through `watch --textfile`, end to end), faults on
synthetic cores, and a textfile that `watch` wrote inside a VM guest (bookworm 6.1, 5-level)
after CPU hotplug and an `exercise` run, kept in tests/data/.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

from inspector.cli import main
from inspector.model import parse_cpu_list
from inspector.audit import FINDING_NAMES
from inspector.prom import METRICS, TEXTFILE_NAME, render, write_textfile
from inspector.watch import RoundResult, Watcher
from inspector.watch_config import WatchConfig
from tests.helpers import jsonschemas
from tests.conftest import ROOT, kernel
from tests.helpers.faults import BY_NAME

parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus_client is a test dependency (requirements.txt)")

SAMPLES = sorted(glob.glob(os.path.join(ROOT, "samples", "*.core")))
VM_TEXTFILE = os.path.join(ROOT, "tests", "data", "watch-bookworm-6.1-l5.prom")


def families(text: str) -> dict:
    """name -> family, through prometheus_client's parser (raises on bad syntax)."""
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(fams: dict, name: str, **labels) -> float:
    fam = fams[name.removesuffix("_total")]     # the parser names counters without _total
    hits = [s.value for s in fam.samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, fam.samples)
    return hits[0]


def check_format(text: str) -> dict:
    fams = families(text)
    for fam in fams.values():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        assert name in METRICS and fam.type == METRICS[name][0], fam
        assert fam.documentation == METRICS[name][1]
        assert fam.samples, fam
        for s in fam.samples:
            assert s.timestamp is None
            assert tuple(s.labels) == METRICS[name][2], (s, METRICS[name][2])
    for line in text.splitlines():             # no timestamps: "name{labels} value", nothing after
        if not line.startswith("#"):
            assert len(line.rsplit("} ", 1)[-1].split()) in (1, 2)
            assert re.fullmatch(r'[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+', line), line
    return fams


def watch_textfile(core: str, tmp_path, capsys, *extra: str) -> str:
    status = main(["watch", "--json", "--core", core, *extra, "--textfile", str(tmp_path),
                   "0.1", "1"])
    out = capsys.readouterr().out
    assert status in (0, 1), out
    return (tmp_path / TEXTFILE_NAME).read_text()


@pytest.mark.parametrize("core", SAMPLES, ids=os.path.basename)
def test_real_snapshots_against_validate(core, tmp_path, capsys):
    fams = check_format(watch_textfile(core, tmp_path, capsys))
    assert main(["validate", "--json", "--core", core]) in (0, 1)
    doc = jsonschemas.loads(capsys.readouterr().out)
    assert main(["stacks", "--json", "--core", core]) == 0
    stacks = jsonschemas.loads(capsys.readouterr().out)
    k = doc["kernel"]
    assert value(fams, "espfix_inspect_up") == 1
    assert value(fams, "espfix_inspect_validation_ok") == int(doc["ok"])
    assert value(fams, "espfix_inspect_cpus_possible") == len(parse_cpu_list(k["cpus_possible"]))
    assert value(fams, "espfix_inspect_cpus_online") == len(parse_cpu_list(k["cpus_online"]))
    assert value(fams, "espfix_inspect_cpus_initialised") == \
        len(parse_cpu_list(k["cpus_initialised"])) if k["cpus_initialised"] else 0
    for check in FINDING_NAMES:
        for sev in ("error", "warning", "info"):
            want = sum(1 for f in doc["findings"] if (f["check"], f["severity"]) == (check, sev))
            assert value(fams, "espfix_inspect_findings", check=check, severity=sev) == want
    assert value(fams, "espfix_inspect_kernel_info", osrelease=k["osrelease"],
                 levels=str(k["levels"]), pti="on" if k["pti"] else "off") == 1
    for c in stacks["cpus"]:
        if c["espfix_stack"]:
            held = value(fams, "espfix_inspect_ministack_frame_held", cpu=str(c["cpu"]))
            assert held == (c["frame"] is not None)
            assert value(fams, "espfix_inspect_espfix_frames_seen_total", cpu=str(c["cpu"])) == 0
    assert value(fams, "espfix_inspect_rounds_total") == 1


def test_maxcpus8_snapshot_counts(tmp_path, capsys):
    fams = check_format(watch_textfile(os.path.join(ROOT, "samples",
                                                    "bookworm-6.1-maxcpus8.core"), tmp_path, capsys))
    assert (value(fams, "espfix_inspect_cpus_possible"), value(fams, "espfix_inspect_cpus_online"),
            value(fams, "espfix_inspect_cpus_initialised")) == (8, 2, 2)
    assert value(fams, "espfix_inspect_findings", check="cpu_init", severity="info") == 1


@pytest.mark.parametrize("fault", sorted(BY_NAME))
def test_every_fault_is_counted_under_a_known_check(fault, write_kernel, tmp_path, capsys):
    k = kernel(nr_cpus=4, pti=fault == "missing-pti")
    BY_NAME[fault](k)
    core, syms = write_kernel(k)
    fams = check_format(watch_textfile(core, tmp_path, capsys, "--symbols", syms))
    assert main(["validate", "--json", "--core", core, "--symbols", syms]) == 1
    doc = jsonschemas.loads(capsys.readouterr().out)
    assert value(fams, "espfix_inspect_validation_ok") == 0
    assert value(fams, "espfix_inspect_cpus_bad") == sum(1 for c in doc["cpus"] if not c["ok"])
    for f in doc["findings"]:
        assert f["check"] in FINDING_NAMES
        assert value(fams, "espfix_inspect_findings", check=f["check"],
                     severity=f["severity"]) >= 1


def test_every_declared_finding_name_has_a_zero_series(write_kernel, tmp_path, capsys):
    """The findings family has one series per registry name x severity, in registry
    order, zeros included (alerts on "> 0" see a value, not an absence)."""
    core, syms = write_kernel(kernel(nr_cpus=4))
    text = watch_textfile(core, tmp_path, capsys, "--symbols", syms)
    series = re.findall(r'^espfix_inspect_findings\{check="(\w+)",severity="(\w+)"\} 0$',
                        text, re.M)
    assert series == [(c, s) for c in FINDING_NAMES for s in ("error", "warning", "info")]


def test_frames_and_hotplug_counters_after_rounds(write_kernel, tmp_path):
    k = kernel(nr_cpus=4)
    core, syms = write_kernel(k)
    results: list[RoundResult] = []
    w = Watcher(WatchConfig(core=core, symbols=syms), lambda ev: None, results.append,
                hotplug=None)
    w.round("start")
    k.write_frame(1, (1, 0x401000, 0x33, 0x246, 0x7FFD00001234, 0xF))
    k._set_mask("__cpu_online_mask", [0, 1, 2])
    k.write(core)
    w.round("interval")
    w._close_target()
    fams = check_format(render(results[-1]))
    assert value(fams, "espfix_inspect_espfix_frames_seen_total", cpu="1") == 1
    assert value(fams, "espfix_inspect_espfix_frames_seen_total", cpu="0") == 0
    assert value(fams, "espfix_inspect_ministack_frame_held", cpu="1") == 1
    assert value(fams, "espfix_inspect_hotplug_events_total", action="offline") == 1
    assert value(fams, "espfix_inspect_cpus_online") == 3
    assert value(fams, "espfix_inspect_rounds_total") == 2
    assert value(fams, "espfix_inspect_last_run_timestamp_seconds") == \
        pytest.approx(results[-1].started, abs=0.01)


def test_a_round_that_could_not_inspect():
    res = RoundResult(3, "interval", 1_700_000_000.0, 0.01, 0.005,
                      error="reading /proc/kcore failed")
    fams = check_format(render(res))
    assert value(fams, "espfix_inspect_up") == 0
    assert value(fams, "espfix_inspect_validation_ok") == 0
    assert "espfix_inspect_findings" not in fams         # no stale values


def test_label_values_are_escaped():
    res = RoundResult(1, "start", 0.0, osrelease='6.1 "odd\\name"\nx', levels=5, pti=False)
    fams = check_format(render(res))
    assert value(fams, "espfix_inspect_kernel_info", osrelease='6.1 "odd\\name"\nx') == 1


def test_write_is_atomic_and_leaves_nothing(tmp_path, monkeypatch):
    import inspector.fileio as ew
    path = write_textfile(str(tmp_path), "espfix_inspect_up 1\n")
    assert path == str(tmp_path / TEXTFILE_NAME)
    assert os.stat(path).st_mode & 0o777 == 0o644

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ew.os, "fsync", boom)
    with pytest.raises(Exception) as ei:
        write_textfile(str(tmp_path), "espfix_inspect_up 0\n")
    assert "No space left" in str(ei.value)
    assert open(path).read() == "espfix_inspect_up 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [TEXTFILE_NAME]


def test_temp_names_are_skipped_by_the_collector(tmp_path, monkeypatch):
    """node_exporter reads only *.prom: the temporary file must not match while written."""
    import inspector.fileio as ew
    seen = []
    real = ew.os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real(src, dst)
    monkeypatch.setattr(ew.os, "replace", spy)
    write_textfile(str(tmp_path), "espfix_inspect_up 1\n")
    assert seen and not seen[0].endswith(".prom") and seen[0].startswith(".")


def test_the_textfile_watch_wrote_in_a_vm_guest():
    """Real: `watch --textfile` on 6.1.0-56-amd64 (4 vCPUs, 5-level) after cpu3 went offline
    and online again and `exercise` ran on cpu1 (see docs-watch.md)."""
    fams = check_format(open(VM_TEXTFILE).read())
    assert value(fams, "espfix_inspect_up") == 1 and value(fams, "espfix_inspect_validation_ok") == 1
    assert value(fams, "espfix_inspect_cpus_online") == 4
    assert value(fams, "espfix_inspect_hotplug_events_total", action="offline") >= 1
    assert value(fams, "espfix_inspect_hotplug_events_total", action="online") >= 1
    assert value(fams, "espfix_inspect_espfix_frames_seen_total", cpu="1") >= 1
    assert value(fams, "espfix_inspect_kernel_info", osrelease="6.1.0-56-amd64", levels="5",
                 pti="off") == 1


def test_textfile_is_world_readable_under_the_units_umask(tmp_path):
    """The units run with UMask=0077 and node_exporter reads the file as its own user:
    the textfile is 0644 anyway (a 0600 file broke the bookworm:systemd row)."""
    old = os.umask(0o077)
    try:
        path = write_textfile(str(tmp_path), "espfix_inspect_up 1\n")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
