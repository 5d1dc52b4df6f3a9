"""Memory sources: one small interface over every place kernel memory comes from.

A :class:`MemorySource` answers two questions: the bytes at a kernel virtual
address *that the source maps directly* (kcore/vmcore segments), and the
bytes at a physical address.  Whole physical pages are cached, so a
page-table or stack page is read from the file at most once; ``stats`` counts
what was read, which the benchmark reports and a test holds to "once".

Sources: :class:`CoreMemory` for any ELF core (/proc/kcore, a kdump vmcore, an
espfix-inspect snapshot; a synthetic core in the tests is just another file).
:class:`RecordingMemory` wraps a source and remembers every range it served,
which is what ``snapshot`` writes out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .elfcore import ElfCore
from .errors import InspectError
from .records import dataclass, field
from .x86 import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object           # an interface for readers and type checkers only

__all__ = ["MemorySource", "CoreMemory", "RecordingMemory", "ReadStats", "PAGE_SIZE"]


@dataclass
class ReadStats:
    pages_read: int = 0                      # distinct physical pages fetched
    page_fetches: Counter = field(default_factory=Counter)   # pfn -> fetch count
    small_reads: int = 0                     # word-sized virtual/physical reads

    def max_fetches_per_page(self) -> int:
        return max(self.page_fetches.values(), default=0)


class MemorySource(Protocol):
    stats: ReadStats

    def read_virt(self, addr: int, size: int) -> bytes | None:
        """Bytes at *addr* if the source maps that virtual range, else None."""

    def read_virts(self, addrs: Sequence[int], size: int) -> list[bytes | None]:
        """``[read_virt(a, size) for a in addrs]`` (one call for every CPU's words)."""

    def read_phys(self, paddr: int, size: int) -> bytes:
        """Bytes at physical *paddr*; raises InspectError when not present."""

    def phys_page(self, paddr: int) -> bytes:
        """The whole 4 KiB page containing *paddr* (cached)."""

    def invalidate(self, paddr: int) -> None:
        """Drop the cached page holding *paddr*, so the next read is fresh."""


class CoreMemory:
    """Memory of an :class:`~inspector.elfcore.ElfCore`."""

    def __init__(self, core: ElfCore) -> None:
        self.core = core
        self.stats = ReadStats()
        self._pages: dict[int, bytes] = {}

    def read_virt(self, addr: int, size: int) -> bytes | None:
        self.stats.small_reads += 1
        return self.core.read_vaddr(addr, size)

    def read_virts(self, addrs: Sequence[int], size: int) -> list[bytes | None]:
        self.stats.small_reads += len(addrs)
        return self.core.read_vaddrs(addrs, size)

    def phys_page(self, paddr: int) -> bytes:
        base = paddr & PAGE_MASK
        page = self._pages.get(base)
        if page is None:
            data = self.core.read_paddr(base, PAGE_SIZE)
            if data is None:
                raise InspectError(
                    f"physical page {base:#x} is not in {self.core.path}",
                    "the core lacks that memory (a filtered vmcore or an incomplete "
                    "snapshot); capture it with espfix-inspect snapshot or makedumpfile -d 0")
            self._pages[base] = page = data
            self.stats.pages_read += 1
            self.stats.page_fetches[base >> PAGE_SHIFT] += 1
        return page

    def invalidate(self, paddr: int) -> None:
        """Forget the cached page holding *paddr*: the next read sees live memory
        (ministacks change while a live kernel runs)."""
        self._pages.pop(paddr & PAGE_MASK, None)

    def read_phys(self, paddr: int, size: int) -> bytes:
        off = paddr & (PAGE_SIZE - 1)
        if off + size <= PAGE_SIZE and (paddr & PAGE_MASK) in self._pages:
            return self._pages[paddr & PAGE_MASK][off:off + size]
        self.stats.small_reads += 1
        data = self.core.read_paddr(paddr, size)
        if data is None:
            raise InspectError(f"physical address {paddr:#x} is not in {self.core.path}",
                               "the core lacks that memory; capture a complete core")
        return data


class RecordingMemory:
    """Wraps a source and records the virtual and physical ranges it served.

    ``virt`` holds ``(addr, bytes)`` of segment-served virtual reads and
    ``phys`` ``(paddr, bytes)`` of physical reads (whole pages for cached
    pages).  Overlaps are resolved by the snapshot writer.
    """

    def __init__(self, inner: MemorySource) -> None:
        self.inner = inner
        self.stats = inner.stats
        self.virt: dict[int, bytes] = {}
        self.phys: dict[int, bytes] = {}

    def read_virt(self, addr: int, size: int) -> bytes | None:
        data = self.inner.read_virt(addr, size)
        if data is not None:
            prev = self.virt.get(addr)
            if prev is None or len(prev) < len(data):
                self.virt[addr] = data
        return data

    def read_virts(self, addrs: Sequence[int], size: int) -> list[bytes | None]:
        datas = self.inner.read_virts(addrs, size)
        for addr, data in zip(addrs, datas):
            if data is not None:
                prev = self.virt.get(addr)
                if prev is None or len(prev) < len(data):
                    self.virt[addr] = data
        return datas

    def phys_page(self, paddr: int) -> bytes:
        page = self.inner.phys_page(paddr)
        self.phys[paddr & PAGE_MASK] = page
        return page

    def invalidate(self, paddr: int) -> None:
        self.inner.invalidate(paddr)

    def read_phys(self, paddr: int, size: int) -> bytes:
        data = self.inner.read_phys(paddr, size)
        prev = self.phys.get(paddr)
        if prev is None or len(prev) < len(data):
            self.phys[paddr] = data
        return data

