"""Facts about the running machine that live in sysfs/procfs, not in kernel memory.

Used only for a live target (and saved into snapshots so that an offline
run sees the same facts): the NUMA node of each CPU and of each memory block
(``/sys/devices/system/node``), the sysfs CPU lists, the PTI status
(``/sys/devices/system/cpu/vulnerabilities/meltdown``) and whether FRED is in
use (the ``fred`` flag in /proc/cpuinfo, set only when the kernel enabled it).
"""

from __future__ import annotations

import os
import re

from .model import parse_cpu_list
from .records import asdict, dataclass, field

__all__ = ["HostFacts", "read_host_facts"]

SYS = "/sys/devices/system"


@dataclass
class HostFacts:
    online: list[int] | None = None
    possible: list[int] | None = None
    meltdown: str | None = None
    fred: bool | None = None
    cpu_node: dict[int, int] = field(default_factory=dict)
    #: memory block size and block index -> node, from /sys/devices/system/node
    block_size: int | None = None
    block_node: dict[int, int] = field(default_factory=dict)

    def node_of_phys(self, paddr: int) -> int | None:
        if not self.block_size:
            return None
        return self.block_node.get(paddr // self.block_size)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cpu_node"] = {str(k): v for k, v in self.cpu_node.items()}
        d["block_node"] = {str(k): v for k, v in self.block_node.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HostFacts":
        return cls(online=d.get("online"), possible=d.get("possible"),
                   meltdown=d.get("meltdown"), fred=d.get("fred"),
                   cpu_node={int(k): v for k, v in (d.get("cpu_node") or {}).items()},
                   block_size=d.get("block_size"),
                   block_node={int(k): v for k, v in (d.get("block_node") or {}).items()})


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _numbered(directory: str, prefix: str) -> list[str]:
    """``glob.glob(f"{directory}/{prefix}[0-9]*")`` with os.listdir (glob and fnmatch
    are not imported for this one pattern; README, Performance)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    n = len(prefix)
    return [f"{directory}/{name}" for name in names
            if name.startswith(prefix) and name[n:n + 1].isdigit()]


def read_host_facts(root: str = SYS, cpuinfo: str = "/proc/cpuinfo") -> HostFacts:
    facts = HostFacts()
    for name in ("online", "possible"):
        text = _read(f"{root}/cpu/{name}")
        if text is not None:
            try:
                setattr(facts, name, parse_cpu_list(text))
            except ValueError:
                pass
    facts.meltdown = _read(f"{root}/cpu/vulnerabilities/meltdown")
    info = _read(cpuinfo)
    if info is not None:
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        facts.fred = bool(re.search(r"\bfred\b", flags.split(":", 1)[-1]))
    bs = _read(f"{root}/memory/block_size_bytes")
    if bs:
        try:
            facts.block_size = int(bs, 16)
        except ValueError:
            facts.block_size = None
    for node_dir in _numbered(f"{root}/node", "node"):
        node = int(os.path.basename(node_dir)[4:])
        cpus = _read(f"{node_dir}/cpulist")
        if cpus:
            for cpu in parse_cpu_list(cpus):
                facts.cpu_node[cpu] = node
        for mem in _numbered(node_dir, "memory"):
            facts.block_node[int(os.path.basename(mem)[6:])] = node
    return facts
