"""CPU hotplug as ``watch`` sees it: kernel uevents, or a poll of the online mask.

``device_online()``/``device_offline()`` in ``drivers/base/core.c`` send
``online@/devices/system/cpu/cpuN`` / ``offline@...`` kobject uevents once a CPU changed
state; ``lib/kobject_uevent.c`` formats them as ``ACTION@DEVPATH`` then ``KEY=VALUE``
strings and multicasts them on ``NETLINK_KOBJECT_UEVENT`` group 1.  Where that socket
cannot be had (another network namespace), ``/sys/devices/system/cpu/online`` is polled.
A source only says that something changed; ``watch`` then reads the kernel's own masks.
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass
from typing import Protocol

from .model import parse_cpu_list

__all__ = ["CpuEvent", "parse_uevent", "HotplugSource", "UeventSource", "SysfsPollSource",
           "open_hotplug_source", "SYSFS_ONLINE", "UEVENT_SETTLE"]

SYSFS_ONLINE = "/sys/devices/system/cpu/online"
#: NETLINK_KOBJECT_UEVENT (include/uapi/linux/netlink.h) and its kernel group.
NETLINK_KOBJECT_UEVENT = 15
UEVENT_KERNEL_GROUP = 1
CPU_DEVPATH = re.compile(r"^/devices/system/cpu/cpu(\d+)$")
#: kobject actions that change a CPU's presence or state (lib/kobject_uevent.c kobject_actions[]).
CPU_ACTIONS = ("add", "remove", "online", "offline")
#: uevents arriving together (offline then online) are handled in one round.
UEVENT_SETTLE = 0.05


@dataclass(frozen=True)
class CpuEvent:
    action: str             # add, remove, online, offline
    cpu: int
    source: str             # uevent, sysfs


def parse_uevent(data: bytes) -> CpuEvent | None:
    """A kernel uevent datagram -> a CPU event, or None for any other device.

    The kernel's format (``lib/kobject_uevent.c``): ``ACTION@DEVPATH\\0`` then
    ``ACTION=..\\0DEVPATH=..\\0SUBSYSTEM=..\\0SEQNUM=..\\0``.  udev's own
    re-broadcasts start with ``libudev`` and go to group 2; they are ignored.
    """
    parts = data.split(b"\0")
    if not parts or b"@" not in parts[0]:
        return None
    env = {}
    for p in parts[1:]:
        k, sep, v = p.partition(b"=")
        if sep:
            env[k.decode("latin-1")] = v.decode("latin-1")
    head_action, _, head_path = parts[0].decode("latin-1").partition("@")
    action = env.get("ACTION", head_action)
    devpath = env.get("DEVPATH", head_path)
    if env.get("SUBSYSTEM", "cpu") != "cpu" or action not in CPU_ACTIONS:
        return None
    m = CPU_DEVPATH.match(devpath)
    if m is None:
        return None
    return CpuEvent(action, int(m.group(1)), "uevent")


class HotplugSource(Protocol):
    name: str
    #: seconds between polls when fileno() is None
    poll_interval: float

    def fileno(self) -> int | None: ...

    def read_events(self) -> list[CpuEvent]: ...

    def close(self) -> None: ...


class UeventSource:
    """Kernel uevents from a ``NETLINK_KOBJECT_UEVENT`` socket bound to group 1.

    Any user may listen (the kernel creates the socket with
    ``NL_CFG_F_NONROOT_RECV``, ``lib/kobject_uevent.c``), but only in the
    initial network namespace.  Datagrams not sent by the kernel (netlink
    port id 0) are dropped.  *sock* is for tests (any datagram socket).
    """

    name = "uevent"
    poll_interval = 0.0

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_KOBJECT_UEVENT)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.bind((0, UEVENT_KERNEL_GROUP))
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self.sock = sock
        self.overruns = 0

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def read_events(self) -> list[CpuEvent]:
        out: list[CpuEvent] = []
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:     # the kernel dropped uevents: rescan
                    self.overruns += 1
                    out.append(CpuEvent("overrun", -1, "uevent"))
                    continue
                raise
            if self.sock.family == socket.AF_NETLINK and addr and addr[0] != 0:
                continue
            ev = parse_uevent(data)
            if ev is not None:
                out.append(ev)

    def close(self) -> None:
        self.sock.close()


class SysfsPollSource:
    """Fallback: poll ``/sys/devices/system/cpu/online`` (one small read)."""

    name = "sysfs poll"
    poll_interval = 1.0

    def __init__(self, path: str = SYSFS_ONLINE) -> None:
        self.path = path
        self.last = self._read()

    def _read(self) -> set[int] | None:
        try:
            with open(self.path) as f:
                return set(parse_cpu_list(f.read().strip()))
        except (OSError, ValueError):
            return None

    def fileno(self) -> int | None:
        return None

    def read_events(self) -> list[CpuEvent]:
        now = self._read()
        if now is None or self.last is None:
            self.last = now
            return []
        evs = [CpuEvent("offline", c, "sysfs") for c in sorted(self.last - now)]
        evs += [CpuEvent("online", c, "sysfs") for c in sorted(now - self.last)]
        self.last = now
        return evs

    def close(self) -> None:
        pass


def open_hotplug_source(mode: str) -> tuple[HotplugSource | None, str]:
    """(source, description) for *mode* auto/poll/off."""
    if mode == "off":
        return None, "off"
    if mode == "auto":
        try:
            return UeventSource(), "uevents (NETLINK_KOBJECT_UEVENT)"
        except OSError as e:
            why = e.strerror or str(e)
            return SysfsPollSource(), (f"polling {SYSFS_ONLINE} each second (no uevent "
                                       f"socket: {why})")
    return SysfsPollSource(), f"polling {SYSFS_ONLINE} each second"
