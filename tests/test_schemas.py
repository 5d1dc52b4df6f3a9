"""One JSON vocabulary, versioned: every document names its schema, every schema file
is a valid draft-07 schema for that name, and a --json run that cannot inspect prints
an error document (inspector/schema.py, inspector/schemas/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from inspector.cli import main
from inspector.schema import DOCUMENTS, schema_file, schema_id
from tests.helpers import jsonschemas
from tests.conftest import ROOT, kernel

SAMPLE = os.path.join(ROOT, "samples", "bookworm-6.1-l4-pti.core")


def test_every_document_has_its_schema_file():
    files = sorted(n[:-len(".schema.json")] for n in
                   os.listdir(os.path.dirname(schema_file("validate"))))
    assert files == sorted(DOCUMENTS)
    for name in DOCUMENTS:
        with open(schema_file(name)) as f:
            schema = json.load(f)
        jsonschema.Draft7Validator.check_schema(schema)
        assert schema["$id"].endswith(f"/{name}.schema.json")
        assert schema["properties"]["schema"] == {"const": schema_id(name)}
        assert "schema" in schema["required"]


def test_schema_id_form():
    assert schema_id("validate") == "espfix-inspect/validate/1"
    with pytest.raises(KeyError):
        schema_id("nonesuch")


def test_a_document_without_its_schema_key_fails_the_check():
    doc = jsonschemas.loads(_out(["layout", "--cpus", "2", "--json"]))
    del doc["schema"]
    with pytest.raises(AssertionError, match="no known schema key"):
        jsonschemas.check(doc)


def test_schemas_are_not_vacuous():
    """A renamed key fails: the old names of this vocabulary are refused."""
    doc = jsonschemas.loads(_out(["layout", "--cpus", "2", "--json"]), "layout")
    doc["memory"]["cpus"] = doc["memory"].pop("nr_cpus")
    with pytest.raises(AssertionError, match="memory"):
        jsonschemas.check(doc)
    ev = {"schema": schema_id("trace"), "event": "end", "time": "2026-12-01T00:00:00Z"}
    with pytest.raises(AssertionError, match="event"):
        jsonschemas.check(ev)
    stop = {**ev, "event": "stop", "reason": "duration", "seconds": 1.0, "looked": 0,
            "counted": 0}
    with pytest.raises(AssertionError):
        jsonschemas.check(stop)


def _out(argv: list[str], rc: int = 0) -> str:
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == rc, err.getvalue()
    return out.getvalue()


def test_layout_and_snapshot_documents(tmp_path, write_kernel):
    doc = jsonschemas.loads(_out(["layout", "--cpu-list", "0-3,64", "--levels", "4",
                                  "--json"]), "layout")
    assert doc["memory"]["nr_cpus"] == 5 and doc["groups"][0]["cpus"] == "0-3,64"
    core, syms = write_kernel(kernel(nr_cpus=4))
    snap = str(tmp_path / "s.core")
    doc = jsonschemas.loads(_out(["snapshot", "--json", "--core", core, "--symbols", syms,
                                  "-o", snap]), "snapshot")
    assert doc["nr_cpus"] == 4 and doc["file"] == snap


@pytest.mark.parametrize("argv,command", [
    (["validate", "--json", "--core", "/nonexistent/core"], "validate"),
    (["stacks", "--json", "--core", "/nonexistent/core"], "stacks"),
    (["snapshot", "--json", "--core", "/nonexistent/core", "-o", "/tmp/x.core"], "snapshot"),
    (["layout", "--json", "--rand", "1", "--page-random", "2"], "layout"),
    (["diff", "--json", "/nonexistent/a", SAMPLE], "diff"),
])
def test_json_failures_print_an_error_document(capsys, argv, command):
    assert main(argv) == 2
    cap = capsys.readouterr()
    doc = jsonschemas.loads(cap.out, "error")
    assert doc["command"] == command and doc["exit"] == 2
    line = cap.err.strip()
    assert "\n" not in line and doc["error"] in line
    assert doc["fix"] and doc["fix"] in line


def test_text_failures_keep_stdout_empty(capsys):
    assert main(["validate", "--core", "/nonexistent/core"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1


def test_exercise_that_could_not_run_prints_only_the_error_document(monkeypatch, capsys):
    from inspector import exercise as ex
    cpu = sorted(os.sched_getaffinity(0))[0]

    def fake_exercise(cpus, duration, state, control, progress=None):
        return [ex.RoundTrip(c, "64-bit", 0x33, 0x7, 0, verdict=ex.COULD_NOT_RUN)
                for c in cpus]
    monkeypatch.setattr(ex, "exercise", fake_exercise)
    assert main(["exercise", "--json", "--no-kcore", "--cpu", str(cpu)]) == 2
    cap = capsys.readouterr()
    doc = jsonschemas.loads(cap.out, "error")
    assert "no exercise round could run" in doc["error"] in cap.err


def test_exercise_document(monkeypatch, capsys):
    from inspector import exercise as ex
    cpu = sorted(os.sched_getaffinity(0))[0]

    def fake_exercise(cpus, duration, state, control, progress=None):
        return [ex.RoundTrip(c, "64-bit", 0x33, 0x7, 0x7FFF0000, rsp_back=0x7FFF0000,
                             verdict="ok") for c in cpus]
    monkeypatch.setattr(ex, "exercise", fake_exercise)
    assert main(["exercise", "--json", "--no-kcore", "--cpu", str(cpu)]) == 0
    doc = jsonschemas.loads(capsys.readouterr().out, "exercise")
    assert doc["ok"] and doc["rounds"][0]["cpu"] == cpu


def test_diff_refuses_an_unversioned_or_foreign_document(capsys, tmp_path):
    assert main(["validate", "--json", "--core", SAMPLE]) == 0
    doc = jsonschemas.loads(capsys.readouterr().out, "validate")
    for schema, words in ((None, "has no schema key"),
                          ("espfix-inspect/validate/0", "'espfix-inspect/validate/0' document"),
                          (schema_id("stacks"), "'espfix-inspect/stacks/1' document")):
        bad = dict(doc)
        if schema is None:
            del bad["schema"]
        else:
            bad["schema"] = schema
        path = tmp_path / "old.json"
        path.write_text(json.dumps(bad))
        assert main(["diff", str(path), SAMPLE]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_finding_cpus_is_a_cpu_list_everywhere(capsys, write_kernel):
    """The CPUs a finding concerns: "cpus", a CPU-list string, whether the check gave a
    stack page's range (once "affects") or a set of CPUs."""
    k = kernel(nr_cpus=8, online=[0, 1, 2, 3])
    k.set_percpu(2, "espfix_waddr", k.get_percpu(2, "espfix_waddr") + 0x1000)
    core, syms = write_kernel(k)
    assert main(["validate", "--json", "--core", core, "--symbols", syms]) == 1
    doc = jsonschemas.loads(capsys.readouterr().out, "validate")
    assert not any("affects" in f or "remote_cpus" in f for f in doc["findings"])
    lists = [f["cpus"] for f in doc["findings"] if "cpus" in f]
    assert "4-7" in lists


def test_validate_json_does_not_import_jsonschema(write_kernel):
    core, syms = write_kernel(kernel())
    code = ("import io, sys, contextlib\nfrom inspector.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    main(['validate', '--json', '--core', {core!r}, '--symbols', {syms!r}])\n"
            "print('jsonschema' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
