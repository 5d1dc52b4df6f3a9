"""The man pages (man/man8) against the argparse parser they document.

The pages are written by hand, bcc style, and checked here rather than generated at
build time: their DESCRIPTION, EXAMPLES, EXIT STATUS and OVERHEAD sections carry what
argparse cannot know (kernel functions, measured costs, systemd integration), and a
generated OPTIONS section would be argparse's one-line help, not a man page.  So every
option string, positional argument and metavar of every subparser must appear in its
page's OPTIONS and SYNOPSIS, no page may document an option the parser lacks, every
EXAMPLES command must parse, and the version in .TH must be the package's.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess

import pytest

from inspector import __version__
from inspector.cli import build_parser
from inspector.audit import FINDING_NAMES
from tests.conftest import ROOT

MAN = os.path.join(ROOT, "man", "man8")
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "EXIT STATUS",
            "OVERHEAD", "SEE ALSO")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def page_name(command: str) -> str:
    return "espfix-inspect" + (f"-{command}" if command else "") + ".8"


def plain(troff: str) -> str:
    """Font escapes and \\- removed: what the reader sees, near enough."""
    text = re.sub(r"\\f[BIRP]", "", troff)
    return text.replace("\\-", "-").replace("\\:", "")


def sections(name: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = None
    for line in open(os.path.join(MAN, name)):
        m = re.match(r'^\.SH\s+"?([^"\n]+)"?', line)
        if m:
            current = m.group(1).strip()
            out[current] = []
        elif current is not None:
            out[current].append(line.rstrip("\n"))
    return {k: "\n".join(v) for k, v in out.items()}


def option_tags(options_section: str) -> list[str]:
    """The tag line after each .TP in OPTIONS, made plain."""
    lines = options_section.splitlines()
    return [plain(lines[i + 1]) for i, ln in enumerate(lines[:-1]) if ln.strip() == ".TP"]


def documented(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    opts, positionals = set(), set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            continue
        if a.option_strings:
            opts.update(a.option_strings)
        else:
            positionals.add(a.metavar or a.dest)
    return opts, positionals


def value_names(a: argparse.Action) -> list[str]:
    """What the page must show after the option: its metavar, or each choice."""
    if a.nargs == 0:
        return []
    if a.choices is not None and a.metavar is None:
        return [str(c) for c in a.choices]
    return [a.metavar or a.dest.upper()]


COMMANDS = list(subparsers())


def test_one_page_per_command_and_no_other():
    pages = sorted(os.listdir(MAN))
    assert pages == sorted(page_name(c) for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "espfix-inspect")
def test_page_has_the_bcc_sections_and_the_version(command):
    name = page_name(command)
    s = sections(name)
    missing = [sec for sec in SECTIONS if sec not in s]
    assert not missing, f"{name} lacks {missing}"
    th = open(os.path.join(MAN, name)).readline()
    assert th.startswith(".TH ") and f'"espfix-inspect {__version__}"' in th, th
    assert plain(s["NAME"]).strip().startswith(name[:-2] + " - ")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "espfix-inspect")
def test_options_match_argparse_both_ways(command):
    parser = subparsers()[command]
    s = sections(page_name(command))
    opts, positionals = documented(parser)
    tags = option_tags(s["OPTIONS"])
    in_tags = {w.rstrip(",") for t in tags for w in t.split() if w.startswith("-")}
    pos_tags = {t.split()[0] for t in tags if not t.startswith("-")}
    assert in_tags == opts, (f"OPTIONS of {page_name(command)}: missing "
                             f"{sorted(opts - in_tags)}, not in argparse {sorted(in_tags - opts)}")
    assert pos_tags == positionals
    synopsis = plain(s["SYNOPSIS"])
    in_syn = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", synopsis))
    assert in_syn <= opts, f"SYNOPSIS names options argparse lacks: {sorted(in_syn - opts)}"
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.option_strings == ["--version"]:
            continue
        if a.option_strings:
            assert set(a.option_strings) & in_syn, f"{a.option_strings} not in SYNOPSIS"
            (tag,) = [t for t in tags if a.option_strings[-1] in t.replace(",", " ").split()]
            for v in value_names(a):
                assert v in tag.replace("|", " ").split(), f"{tag!r} should show {v}"
        else:
            assert (a.metavar or a.dest) in synopsis


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "espfix-inspect")
def test_examples_parse(command):
    parser = build_parser()
    examples = [plain(ln[3:]) for ln in sections(page_name(command))["EXAMPLES"].splitlines()
                if ln.startswith(".B espfix\\-inspect")]
    assert examples
    for ex in examples:
        argv = shlex.split(ex)[1:]
        parser.parse_args(argv)           # SystemExit (a test error) if it drifted


def test_the_main_page_lists_every_command():
    s = sections("espfix-inspect.8")
    for command in COMMANDS[1:]:
        assert f"espfix-inspect-{command}" in plain(s["DESCRIPTION"])
        assert f"espfix-inspect-{command}" in plain(s["SEE ALSO"])


def test_validate_page_names_every_check():
    """The list of finding names is the check registry's (inspector/audit.py), in its
    order: docs/checks.md has the table."""
    text = " ".join(plain(sections("espfix-inspect-validate.8")["DESCRIPTION"]).split())
    m = re.search(r"its findings are named (.*?)\.", text)
    assert m, "the DESCRIPTION lost the sentence listing the checks"
    named = tuple(re.split(r", | and ", m.group(1)))
    assert named == FINDING_NAMES, f"list them as: {', '.join(FINDING_NAMES)}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c])
def test_json_option_names_its_schema_and_top_level_keys(command):
    """--json documents its schema id and the top-level keys of that schema's document,
    so a renamed key (inspector/schemas) fails here until the page follows."""
    import json

    from inspector.schema import DOCUMENTS, schema_file, schema_id
    if "--json" not in documented(subparsers()[command])[0]:
        return
    tags = sections(page_name(command))["OPTIONS"]
    (text,) = [plain(t) for t in re.split(r"^\.TP\n", tags, flags=re.M)
               if t.startswith("\\fB\\-\\-json")]
    assert command in DOCUMENTS and schema_id(command) in text, text
    with open(schema_file(command)) as f:
        schema = json.load(f)
    if command not in ("watch", "trace"):             # streams: the events are named
        for key in schema["required"]:
            assert re.search(rf"\b{key}\b", text), f"{page_name(command)}: --json lacks {key}"
    else:
        for ev in schema["properties"]["event"]["enum"]:
            assert command == "watch" or re.search(rf"\b{ev}\b", text), ev


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "espfix-inspect")
def test_page_renders_without_warnings(command):
    proc = subprocess.run(["man", "--warnings", "-l", "-Tutf8", "-Z",
                           os.path.join(MAN, page_name(command))],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
