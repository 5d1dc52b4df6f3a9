"""A subprocess that prints one JSON object per line, read with deadlines (tests only).
Each line is checked against the schema it names (tests/helpers/jsonschemas.py)."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time

from tests.helpers.jsonschemas import loads


class JsonLinesProc:
    def __init__(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        self.p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.p.stdout, selectors.EVENT_READ)
        self.events: list[dict] = []
        self.buf = b""

    def _lines(self, timeout: float):
        """Complete lines read from the pipe itself: a buffered readline() after select()
        can pull the next line into Python's buffer, where select() never sees it."""
        end = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                yield line
            left = end - time.monotonic()
            if left <= 0 or not self.sel.select(timeout=left):
                return
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                return
            self.buf += chunk

    def until(self, pred, timeout: float = 10.0) -> dict:
        """The first new event for which pred() holds (each stamped with _seen)."""
        for line in self._lines(timeout):
            ev = loads(line)
            ev["_seen"] = time.monotonic()
            self.events.append(ev)
            if pred(ev):
                return ev
        self.kill()
        raise AssertionError(f"event not seen in {timeout} s: {self.events}; "
                             f"exit {self.p.poll()}; stderr {self.p.stderr.read()!r}")

    def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        rest, err = self.p.communicate(timeout=timeout)
        self.events += [loads(line) for line in (self.buf + rest).splitlines()]
        return self.p.returncode, err.decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, str]:
        self.p.send_signal(sig)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
