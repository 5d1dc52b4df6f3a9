"""Syslog priorities for lines that go to the systemd journal.

Under systemd (``StandardOutput=journal``) every line a service writes becomes a
journal entry at the unit's ``SyslogLevel=`` (info), unless the line starts with
a kernel-style ``<N>`` prefix, which journald strips and uses as the priority
(sd-daemon(3): ``SD_ERR`` is ``"<3>"``, ``SD_WARNING`` ``"<4>"``;
systemd.exec(5), ``SyslogLevelPrefix=``).  With the prefixes,
``journalctl -p err`` shows the errors and ``-p warning`` the warnings too.

The prefixes are written only when the stream really is the journal: systemd
sets ``JOURNAL_STREAM=DEVICE:INODE`` (decimal) for a service whose stdout or
stderr is connected to journald, and a process that compares it with
``fstat()`` of its own descriptor knows it was not redirected since
(systemd.exec(5), "Environment variables in spawned processes").  On a terminal,
in a pipe or a file the output stays as it was.

>>> prefix("error", True), prefix("warning", True), prefix("info", True)
('<3>', '<4>', '')
"""

from __future__ import annotations

import os

__all__ = ["PRIORITY", "stream_is_journal", "prefix"]

#: Finding severities (inspector.audit.SEVERITIES) -> syslog priority.  info keeps
#: the unit's default level (info), so it needs no prefix.
PRIORITY: dict[str, int] = {"error": 3, "warning": 4}


def stream_is_journal(fd: int) -> bool:
    """True when *fd* is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def prefix(severity: str | None, journal: bool) -> str:
    """``"<3>"`` / ``"<4>"`` for an error / warning line bound for the journal, else ``""``."""
    if not journal or severity not in PRIORITY:
        return ""
    return f"<{PRIORITY[severity]}>"
