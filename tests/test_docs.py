"""The reference pages in docs/ are what the code generates (tests/helpers/gendocs.py): the
checks table from the check registry, the metrics table from prom.METRICS."""

from __future__ import annotations

import os

from inspector.audit import CHECKS, FINDING_NAMES
from inspector.prom import METRICS
from tests.helpers import gendocs


def test_committed_docs_are_generated_from_the_code():
    stale = gendocs.stale()
    assert not stale, (f"{', '.join(os.path.relpath(p, gendocs.ROOT) for p in stale)} "
                       f"differ from the code: run `{gendocs.COMMAND}` and commit docs/")


def test_pages_name_every_check_and_metric():
    checks, metrics = gendocs.checks_md(), gendocs.metrics_md()
    for c in CHECKS:
        assert f"| {', '.join(f'`{n}`' for n in c.names)} |" in checks
    for name in FINDING_NAMES:
        assert f"`{name}`" in metrics
    for name, (mtype, _, labels) in METRICS.items():
        assert f"| `{name}` | {mtype} | {', '.join(labels)} |" in metrics


def test_check_names_each_stale_page(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gendocs, "DOCS", str(tmp_path))
    assert gendocs.main([]) == 0 and gendocs.stale() == []
    assert gendocs.main(["--check"]) == 0
    page = tmp_path / "checks.md"
    page.write_text(page.read_text().replace("`walk`", "`walks`"))
    (tmp_path / "metrics.md").unlink()
    assert gendocs.stale() == [str(page), str(tmp_path / "metrics.md")]
    capsys.readouterr()
    assert gendocs.main(["--check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(ln.endswith(" differs from the code: run "
                                             "python3 -m tests.helpers.gendocs") for ln in out)
