"""diff: snapshots (real ones from samples/ and synthetic cores) and validate --json
documents, in every combination."""

from __future__ import annotations

import os

import pytest

from inspector.cli import main
from tests.helpers import jsonschemas
from tests.conftest import ROOT, kernel
from tests.helpers.faults import BY_NAME

S = os.path.join(ROOT, "samples")
L5 = os.path.join(S, "bookworm-6.1-l5.core")
L4PTI = os.path.join(S, "bookworm-6.1-l4-pti.core")
MAX8 = os.path.join(S, "bookworm-6.1-maxcpus8.core")
SID = os.path.join(S, "sid-7.x-l5.core")


def run_diff(capsys, *argv: str) -> tuple[int, dict]:
    rc = main(["diff", "--json", *argv])
    return rc, jsonschemas.loads(capsys.readouterr().out)


def rows(doc: dict, section: str) -> dict:
    return {d["key"]: d for d in doc["differences"] if d["section"] == section}


def validate_json(capsys, tmp_path, core: str, *extra: str) -> str:
    main(["validate", "--json", "--core", core, *extra])
    path = tmp_path / (os.path.basename(core) + ".json")
    path.write_text(capsys.readouterr().out)
    return str(path)


def test_two_real_kernels(capsys):
    rc, doc = run_diff(capsys, L5, SID)
    assert rc == 1 and not doc["same"] and doc["relation"] == "different kernels"
    k = rows(doc, "kernel")
    assert k["osrelease"]["a"] == "6.1.0-56-amd64" and k["osrelease"]["b"] == "7.2.13+deb14-amd64"
    assert k["percpu"]["a"] == "zero-based" and k["percpu"]["b"] == "relative"
    assert "levels" not in k                                 # both 5-level
    assert set(rows(doc, "randomisation")) == {"page_random_effective", "slot_random_effective"}
    assert doc["a"]["kind"] == doc["b"]["kind"] == "snapshot"


def test_same_release_other_boot_and_config(capsys):
    rc, doc = run_diff(capsys, L5, L4PTI)
    assert rc == 1 and doc["relation"] == "same kernel release, different boots"
    k = rows(doc, "kernel")
    assert (k["levels"]["a"], k["levels"]["b"]) == (5, 4)
    assert (k["pti"]["a"], k["pti"]["b"]) == (False, True)


def test_cpus_differ_grouped(capsys):
    rc, doc = run_diff(capsys, L5, MAX8)
    c = rows(doc, "cpus")
    assert (c["cpus_possible"]["a"], c["cpus_possible"]["b"]) == ("0-3", "0-7")
    assert (c["cpus_online"]["a"], c["cpus_online"]["b"]) == ("0-3", "0-1")
    per_cpu = rows(doc, "cpu")
    assert per_cpu["online (CPUs 2-3)"]["a"] is True and per_cpu["online (CPUs 2-3)"]["b"] is False
    assert per_cpu["initialised (CPUs 2-3)"]["b"] is False
    f = rows(doc, "findings")
    assert "cpu_init" in f["only in B"]["b"] and "2-7" in f["only in B"]["b"]


def test_snapshot_against_its_own_validate_json_is_the_same(capsys, tmp_path):
    j = validate_json(capsys, tmp_path, SID)
    for a, b in ((SID, j), (j, SID), (j, j)):
        rc, doc = run_diff(capsys, a, b)
        assert rc == 0 and doc["same"] and doc["relation"] == "same boot", doc
    assert main(["diff", SID, j]) == 0
    assert "no differences" in capsys.readouterr().out


def test_a_fault_on_the_same_boot(capsys, tmp_path, write_kernel):
    good = kernel(nr_cpus=128)
    bad = kernel(nr_cpus=128)
    BY_NAME["writable-pte"](bad)
    ca, sa = write_kernel(good)
    cb, sb = write_kernel(bad)
    rc, doc = run_diff(capsys, ca, cb, "--symbols-a", sa, "--symbols-b", sb)
    assert rc == 1 and doc["relation"] == "same boot"
    assert doc["a"]["kind"] == "core"
    assert set(rows(doc, "kernel")) == set() and rows(doc, "randomisation") == {}
    assert rows(doc, "verdict")["ok"]["a"] is True and rows(doc, "verdict")["ok"]["b"] is False
    only_b = [d["b"] for d in doc["differences"] if d["key"] == "only in B"]
    assert any("pte_prot" in m for m in only_b) and any("pte_clones" in m for m in only_b)
    assert rows(doc, "cpu")["ok (CPUs 0-63)"]["b"] is False       # the page's 64 CPUs
    # mixed: the faulty one as a saved validate --json
    jb = validate_json(capsys, tmp_path, cb, "--symbols", sb)
    rc2, doc2 = run_diff(capsys, ca, jb, "--symbols-a", sa)
    assert rc2 == 1 and doc2["differences"] == doc["differences"]


def test_another_boot_moves_every_ministack_but_that_is_explained(capsys, write_kernel):
    ca, sa = write_kernel(kernel(nr_cpus=4, rand=0x1111_2222_3333))
    cb, sb = write_kernel(kernel(nr_cpus=4, rand=0x4444_5555_6666))
    rc, doc = run_diff(capsys, ca, cb, "--symbols-a", sa, "--symbols-b", sb)
    assert rc == 1 and doc["relation"] == "same kernel release, different boots"
    assert set(rows(doc, "randomisation")) >= {"page_random_effective"}
    assert not any(k.startswith("espfix_stack") for k in rows(doc, "cpu"))


def test_same_randomisation_but_moved_ministack_is_reported(capsys, write_kernel):
    good = kernel(nr_cpus=4)
    bad = kernel(nr_cpus=4)
    BY_NAME["bad-stack"](bad)
    ca, sa = write_kernel(good)
    cb, sb = write_kernel(bad)
    rc, doc = run_diff(capsys, ca, cb, "--symbols-a", sa, "--symbols-b", sb)
    moved = [k for k in rows(doc, "cpu") if k.startswith("espfix_stack")]
    assert rc == 1 and moved, doc


def test_text_output(capsys):
    assert main(["diff", L5, SID]) == 1
    out = capsys.readouterr().out
    assert out.startswith("A: ") and "relation: different kernels" in out
    assert "osrelease" in out and "result: 6 difference(s)" in out


@pytest.mark.parametrize(("content", "words"), [
    (b"{not json", "neither an ELF core nor JSON"),
    (b'{"ok": true}', "not a validate --json document"),
    (b"\xff\xfe\x00garbage", "neither an ELF core nor JSON"),
])
def test_bad_inputs_one_line(capsys, tmp_path, content, words):
    bad = tmp_path / "bad"
    bad.write_bytes(content)
    assert main(["diff", L5, str(bad)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_missing_file_and_core_without_symbols(capsys, tmp_path, write_kernel):
    assert main(["diff", L5, str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    core, _ = write_kernel(kernel())
    assert main(["diff", core, L5]) == 2
    err = capsys.readouterr().err
    assert "carries no symbols" in err and len(err.strip().splitlines()) == 1


def test_a_side_without_symbols_asks_for_that_sides_option(capsys, write_kernel):
    """The lower layers name no option; diff words the fix with the side's own one."""
    ca, sa = write_kernel(kernel(nr_cpus=4))
    assert main(["diff", ca, L5]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ca} carries no symbols" in err
    assert err.rstrip().endswith("as --symbols-a") and "--symbols " not in err
    assert main(["diff", L5, ca]) == 2
    assert capsys.readouterr().err.rstrip().endswith("as --symbols-b")
    assert main(["validate", "--core", ca]) == 2
    assert capsys.readouterr().err.rstrip().endswith(
        "carries no symbols: pass the kernel's System.map or vmlinux as --symbols")
