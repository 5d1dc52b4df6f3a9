"""The README and docs/ link to each other by file and anchor; every link resolves.

Anchors are GitHub's: the heading text lower-cased, punctuation other than ``-`` and
``_`` dropped, spaces turned into ``-``, with ``-1``, ``-2`` ... for repeats.
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    fence = False
    with open(os.path.join(ROOT, page)) as f:
        for line in f:
            if line.startswith("```"):
                fence = not fence
            m = None if fence else re.match(r"^#{1,6} (.*)", line)
            if m:
                s = slug(m.group(1))
                n = seen.get(s, 0)
                seen[s] = n + 1
                out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(page: str) -> list[str]:
    text = open(os.path.join(ROOT, page)).read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)
            if not re.match(r"[a-z]+:", m.group(1))]       # http:, https:, mailto:


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page: str) -> None:
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, dest)):
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest}")
    assert bad == [], f"{page}: broken links:\n" + "\n".join(bad)


def test_readme_stays_short() -> None:
    """The README is an overview; the reference lives in docs/ (issue 10, item 8)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 400
