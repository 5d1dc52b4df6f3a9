"""Guest -> host requests through the 9p share: "dump my memory now".

A cloud operator takes a crash dump from the hypervisor (`virsh dump --memory-only`,
QEMU's `dump-guest-memory`); a test in the guest must be able to ask for one at the
right moment (after `exercise` left frames in the ministacks) and wait for it.

Protocol (all files in the share, written atomically by rename):

    guest:  requests/<id>.json       {"op": "dump-guest-memory", "format": F, "file": NAME}
    host:   dumps/NAME               written by QEMU itself (QMP dump-guest-memory)
    host:   requests/<id>.done.json  {"ok": true, "seconds": S, "bytes": N, "file": "dumps/NAME"}
                                     or {"ok": false, "error": "..."}

Host side: :class:`RequestWatcher` (a thread started by tests/vm/run.py when
``VMOptions(qmp=True)``) talks QMP over the unix socket QEMU was started with.
Guest side: :func:`request_dump`, or ``python3 -m tests.vm.hostreq dump --format F
--name NAME`` from a shell.  Stdlib only: this module also runs in the guest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

REQUESTS = "requests"
DUMPS = "dumps"
GUEST_SHARE = Path("/mnt/share")
#: dump-guest-memory formats of QEMU 7.2 (qapi/dump.json: DumpGuestMemoryFormat).  Its
#: kdump-* formats are written *flattened* (makedumpfile's stream format) before QEMU 8.2,
#: which added kdump-raw-* for the plain layout.
FORMATS = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal QMP client (one connection, line-delimited JSON)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"cannot connect to QMP socket {path}") from None
                time.sleep(0.2)
        self.buf = b""
        self._recv()                                   # the greeting
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.strip():
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QMPError("QMP connection closed")
            self.buf += chunk

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._recv()
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self.sock.close()


class RequestWatcher(threading.Thread):
    """Serves the guest's requests until stopped (or QEMU exits)."""

    def __init__(self, share: Path, qmp_socket: Path, proc, poll: float = 0.2) -> None:
        super().__init__(name="espfix-vm-requests", daemon=True)
        self.share = share
        self.qmp_socket = qmp_socket
        self.proc = proc
        self.poll = poll
        self.served: list[dict] = []
        self._stop_event = threading.Event()
        self._qmp: QMP | None = None
        self.available: list[str] = []      # query-dump-guest-memory-capability
        (share / REQUESTS).mkdir(exist_ok=True)
        (share / DUMPS).mkdir(exist_ok=True)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def run(self) -> None:
        done: set[str] = set()
        while not self._stop_event.is_set() and self.proc.poll() is None:
            for req in sorted((self.share / REQUESTS).glob("*.json")):
                rid = req.name[:-5]
                if rid.endswith(".done") or rid in done:
                    continue
                done.add(rid)
                reply = self._serve(req)
                self.served.append({"id": rid, **reply})
                tmp = req.with_name(f"{rid}.done.tmp")
                tmp.write_text(json.dumps(reply))
                tmp.rename(req.with_name(f"{rid}.done.json"))
            self._stop_event.wait(self.poll)

    def _serve(self, req: Path) -> dict:
        try:
            ask = json.loads(req.read_text())
        except (OSError, ValueError) as e:
            return {"ok": False, "error": f"unreadable request: {e}"}
        if ask.get("op") != "dump-guest-memory":
            return {"ok": False, "error": f"unknown op {ask.get('op')!r}"}
        fmt, name = ask.get("format"), str(ask.get("file", ""))
        if fmt not in FORMATS or not _NAME.match(name):
            return {"ok": False, "error": f"bad format {fmt!r} or file name {name!r}"}
        path = self.share / DUMPS / name
        t0 = time.monotonic()
        try:
            if self._qmp is None:
                self._qmp = QMP(self.qmp_socket)
                cap = self._qmp.execute("query-dump-guest-memory-capability")
                self.available = [f for f in (cap or {}).get("formats", [])]
            if self.available and fmt not in self.available:
                return {"ok": False, "error": f"this QEMU cannot write {fmt} (it offers "
                                              f"{', '.join(self.available)})"}
            self._qmp.execute("dump-guest-memory", paging=False,
                              protocol=f"file:{path}", format=fmt)
        except (QMPError, OSError, ValueError) as e:
            return {"ok": False, "error": str(e), "seconds": time.monotonic() - t0}
        return {"ok": True, "file": f"{DUMPS}/{name}", "format": fmt,
                "seconds": round(time.monotonic() - t0, 2),
                "bytes": path.stat().st_size if path.exists() else 0}


# ----------------------------------------------------------------------------- guest side

def request_dump(fmt: str, name: str, timeout: float = 600.0,
                 share: Path = GUEST_SHARE) -> dict:
    """Ask the host for a dump of this guest's memory and wait for it.  Returns the
    host's reply; raises RuntimeError when the host refused or did not answer."""
    if os.environ.get("ESPFIX_VM_HOST_REQUESTS") != "1":
        raise RuntimeError("the VM was started without host requests "
                           "(run_in_vm(..., options=VMOptions(qmp=True)))")
    rid = f"{int(time.time() * 1000)}-{os.getpid()}-{name}"
    req = share / REQUESTS / f"{rid}.json"
    tmp = req.with_name(f"{rid}.tmp")
    tmp.write_text(json.dumps({"op": "dump-guest-memory", "format": fmt, "file": name}))
    tmp.rename(req)
    done = req.with_name(f"{rid}.done.json")
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the host to {req.name} in {timeout:.0f} s")
        time.sleep(0.2)
    reply = json.loads(done.read_text())
    if not reply.get("ok"):
        raise RuntimeError(f"host could not dump: {reply.get('error')}")
    return reply


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.vm.hostreq")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="ask the host for dump-guest-memory and wait")
    d.add_argument("--format", choices=FORMATS, required=True)
    d.add_argument("--name", required=True)
    d.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args(argv)
    try:
        reply = request_dump(a.format, a.name, a.timeout)
    except RuntimeError as e:
        print(f"hostreq: {e}", file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
