"""`python3 -m tests.vm pins`: show the current linux-image ABI of each suite, using a
throw-away apt configuration against the host's mirror (nothing on the host changes)."""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

from .hostenv import mirrors
from .kernels import KERNELS

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def current_pins() -> list[str]:
    main, sec = mirrors()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="espfix-pins-") as d:
        t = Path(d)
        for sub in ("lists/partial", "cache/archives/partial", "prefs"):
            (t / sub).mkdir(parents=True)
        (t / "status").write_text("")
        src = []
        for k in KERNELS.values():
            for suite in (k.suite, *k.extra_suites):
                base = sec if suite.endswith("-security") else main
                src.append(f"deb [signed-by={KEYRING}] {base} {suite} main")
        (t / "sources.list").write_text("\n".join(dict.fromkeys(src)) + "\n")
        opts = [f"-oDir::State::Lists={t}/lists", f"-oDir::Cache={t}/cache",
                f"-oDir::Etc::SourceList={t}/sources.list", "-oDir::Etc::SourceParts=/nonexistent",
                f"-oDir::Etc::PreferencesParts={t}/prefs", "-oDir::Etc::Preferences=/nonexistent",
                f"-oDir::State::status={t}/status", "-oAcquire::Check-Valid-Until=false",
                "-oAPT::Architecture=amd64", "-oAPT::Sandbox::User=root"]
        subprocess.run(["apt-get", *opts, "-qq", "update"], check=True)
        pol = subprocess.run(["apt-cache", *opts, "madison", "linux-image-amd64"],
                             check=True, capture_output=True, text=True).stdout
        for row in pol.splitlines():
            _, version, where = (c.strip() for c in row.split("|"))
            suite = where.split()[1].split("/")[0]
            show = subprocess.run(["apt-cache", *opts, "show", f"linux-image-amd64={version}"],
                                  check=True, capture_output=True, text=True).stdout
            m = re.search(r"linux-image-(\S+) \(= ([^)]+)\)", show)
            if not m:
                continue
            kver, kversion = m.groups()
            uri = subprocess.run(["apt-get", *opts, "download", "--print-uris",
                                  f"linux-image-{kver}={kversion}"],
                                 check=True, capture_output=True, text=True).stdout.split()
            url = unquote(uri[0].strip("'")) if uri else "?"
            pool = next((url[len(b) + 1:] for b in (sec, main) if url.startswith(b + "/")),
                        url)
            lines.append(f"{suite:18} kver={kver:24} version={kversion:14} pool={pool}")
    return lines


def main() -> int:
    print("pinned:")
    for name, k in KERNELS.items():
        print(f"  {name:10} kver={k.kver:24} version={k.version:14} ({k.archive})")
    print("current in the archive (linux-image-amd64 per suite):")
    for line in current_pins():
        print("  " + line)
    return 0
