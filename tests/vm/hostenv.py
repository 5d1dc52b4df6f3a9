"""Host side facts: Debian mirror URLs from the host's apt config, required tools."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

DEB822 = Path("/etc/apt/sources.list.d")
ONE_LINE = Path("/etc/apt/sources.list")

REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "chroot": "coreutils",
    "mount": "mount",
}


class HostError(RuntimeError):
    """A one-line, user-facing problem with the host setup."""


def _apt_entries() -> list[tuple[str, list[str]]]:
    """(uri, suites) for every 'deb' entry in the host's apt sources."""
    entries: list[tuple[str, list[str]]] = []
    if DEB822.is_dir():
        for f in sorted(DEB822.glob("*.sources")):
            for stanza in re.split(r"\n\s*\n", f.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                    if m:
                        fields[m.group(1).lower()] = m.group(2).strip()
                if "deb" not in fields.get("types", "deb").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
    lists = [ONE_LINE] + (sorted(DEB822.glob("*.list")) if DEB822.is_dir() else [])
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                entries.append((line[1], [line[2]]))
    return entries


def mirrors() -> tuple[str, str]:
    """(debian, debian-security) base URLs, taken from the host's apt configuration.

    ESPFIX_VM_MIRROR / ESPFIX_VM_SECURITY_MIRROR override them.
    """
    main = os.environ.get("ESPFIX_VM_MIRROR")
    sec = os.environ.get("ESPFIX_VM_SECURITY_MIRROR")
    for uri, suites in _apt_entries():
        is_sec = any(s.endswith("-security") or s.endswith("/updates") for s in suites)
        if is_sec and not sec:
            sec = uri
        elif not is_sec and not main:
            main = uri
    if not main:
        raise HostError("no Debian mirror found in /etc/apt/sources.list(.d); "
                        "set ESPFIX_VM_MIRROR=http://.../debian")
    if not sec:
        sec = re.sub(r"/debian/?$", "/debian-security", main.rstrip("/"))
    return main.rstrip("/"), sec.rstrip("/")


def require_tools(*tools: str) -> None:
    """Fail with one line if a tool (default: all the harness uses) is not on PATH."""
    missing = [t for t in (tools or REQUIRED_TOOLS) if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(sorted({REQUIRED_TOOLS[t] for t in missing}))
        raise HostError(f"missing host tool(s) {', '.join(missing)}: run "
                        f"`apt-get install -y {pkgs}` (or `python3 -m tests.vm ensure-tools`)")


def ensure_host_tools() -> None:
    """Install the host packages the harness needs (used by CI; needs root)."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not missing:
        return
    pkgs = sorted({REQUIRED_TOOLS[t] for t in missing})
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
                   check=True, env=env)
    require_tools()
