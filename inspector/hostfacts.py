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

from .errors import InspectError
from .model import ESPFIX_MAX_CPUS, parse_cpu_list
from .records import asdict, dataclass, field

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import NoReturn

    from .target import Target

__all__ = ["HostFacts", "read_host_facts", "target_host_facts"]

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
    def from_dict(cls, d: object, source: str = "host facts") -> HostFacts:
        """Facts saved by :meth:`as_dict` (a snapshot's metadata), checked field by field:
        a snapshot may come from anywhere.  Raises InspectError naming the field."""
        if not isinstance(d, dict):
            _bad(source, "host", "an object")
        return cls(online=_cpus(d, "online", source), possible=_cpus(d, "possible", source),
                   meltdown=_opt(d, "meltdown", str, source),
                   fred=_opt(d, "fred", bool, source),
                   cpu_node=_int_map(d, "cpu_node", ESPFIX_MAX_CPUS, source),
                   block_size=_block_size(d, source),
                   block_node=_int_map(d, "block_node", 1 << 40, source))


#: MAX_NUMNODES is 1 << CONFIG_NODES_SHIFT, at most 1024 on x86-64 (arch/x86/Kconfig).
MAX_NUMNODES = 1024


def _bad(source: str, key: str, want: str) -> NoReturn:
    raise InspectError(f"{source}: field {key!r} is not {want}",
                       "the snapshot's metadata is damaged: capture the snapshot again")


def _opt(d: dict, key: str, typ: type, source: str):
    v = d.get(key)
    if v is not None and type(v) is not typ:
        _bad(source, f"host.{key}", f"a {typ.__name__} or null")
    return v


def _is_int(v: object) -> bool:
    return type(v) is int


def _cpus(d: dict, key: str, source: str) -> list[int] | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > ESPFIX_MAX_CPUS or \
            not all(_is_int(c) and 0 <= c < ESPFIX_MAX_CPUS for c in v):
        _bad(source, f"host.{key}", f"a list of CPU numbers 0..{ESPFIX_MAX_CPUS - 1}")
    return sorted(set(v))


def _int_map(d: dict, key: str, key_limit: int, source: str) -> dict[int, int]:
    v = d.get(key)
    if v is None:
        return {}
    want = f"an object of decimal keys below {key_limit} and node numbers 0..{MAX_NUMNODES - 1}"
    if not isinstance(v, dict) or len(v) > key_limit:
        _bad(source, f"host.{key}", want)
    out = {}
    for k, node in v.items():
        if not (isinstance(k, str) and k.isdigit() and len(k) < 16 and int(k) < key_limit
                and _is_int(node) and 0 <= node < MAX_NUMNODES):
            _bad(source, f"host.{key}", want)
        out[int(k)] = node
    return out


def _block_size(d: dict, source: str) -> int | None:
    v = d.get("block_size")
    if v is None:
        return None
    # memory_block_size_bytes(): a power of two of at least a section (128 MiB on x86-64,
    # drivers/base/memory.c, arch/x86/mm/init_64.c), at most 2 GiB today.
    if not _is_int(v) or v < 4096 or v & (v - 1) or v > 1 << 40:
        _bad(source, "host.block_size", "a power of two between 4 KiB and 1 TiB")
    return v


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _numbered(directory: str, prefix: str) -> list[str]:
    """``glob.glob(f"{directory}/{prefix}[0-9]*")`` with os.listdir (glob and fnmatch
    are not imported for this one pattern; docs/performance.md)."""
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


def target_host_facts(target: Target) -> HostFacts:
    """The host facts that go with *target*, for :func:`inspector.state.load_state`:
    this machine's sysfs for a live target (:attr:`Target.live`, decided once when the
    target was opened), the facts a snapshot recorded in its metadata, and none for
    another core (a kdump vmcore records none)."""
    if target.live:
        return read_host_facts()
    return HostFacts.from_dict(target.meta.get("host", {}),
                               f"{target.core.path} (snapshot metadata)")
