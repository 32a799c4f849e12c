"""Guest-physical memory: RAM layout and the three ways to read it.

- `SharedRam`: mmap of the guest's RAM block (the memfd of a VM we launched, or a
  shared file): memory speed, zero copy.
- `ProcMem`: pread of /proc/<qemu pid>/mem at the host address `gpa2hva` gives;
  needs a local QEMU we may trace (our child, or root).
- `GdbstubMem`: `m` packets in physical mode; works everywhere, slowly.

All three see RAM as QEMU's flat view shows it: ranges of guest-physical addresses
backed by offsets in one RAM block (x86_64 splits it around the 4 GiB hole; arm64
virt starts RAM at 0x40000000).
"""

import mmap
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestMemoryError

# "  0000000000100000-000000001fffffff (prio 0, ram): ram0 @0000000000100000"
_MTREE_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, (ram|rom)\): (\S+)(?: @([0-9a-f]+))?", re.M)


@dataclass(frozen=True)
class RamRange:
    """`size` bytes of guest-physical memory at `gpa`, at `offset` in the RAM block."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def parse_mtree(text: str) -> tuple[str, list[RamRange]]:
    """(RAM block name, its ranges) from HMP `info mtree -f`.

    Takes the flat view of the "memory" address space and, of the ram/rom regions
    there, those of the block that backs the most bytes (guest RAM, not firmware).
    """
    view = _flatview_of(text, "memory")
    per_block: dict[str, list[RamRange]] = {}
    for m in _MTREE_LINE.finditer(view):
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        per_block.setdefault(m.group(4), []).append(
            RamRange(start, end - start + 1, int(m.group(5) or "0", 16)))
    if not per_block:
        raise GuestMemoryError("no RAM in QEMU's memory map (`info mtree -f`)")
    name = max(per_block, key=lambda b: sum(r.size for r in per_block[b]))
    return name, _merge(sorted(per_block[name], key=lambda r: r.gpa))


def _flatview_of(text: str, address_space: str) -> str:
    for block in re.split(r"\n(?=FlatView #)", text):
        if f'AS "{address_space}"' in block:
            return block
    return text


def _merge(ranges: list[RamRange]) -> list[RamRange]:
    out: list[RamRange] = []
    for r in ranges:
        last = out[-1] if out else None
        if last and last.end == r.gpa and last.offset + last.size == r.offset:
            out[-1] = RamRange(last.gpa, last.size + r.size, last.offset)
        else:
            out.append(r)
    return out


class PhysMemory(ABC):
    """Guest-physical memory: read any span inside the RAM ranges."""

    name = ""

    def __init__(self, ranges: list[RamRange]):
        self.ranges = ranges
        self.size = sum(r.size for r in ranges)

    def read(self, gpa: int, size: int) -> bytes:
        """`size` bytes at guest-physical `gpa`; may cross range boundaries only where
        the ranges are contiguous in the guest."""
        parts = []
        while size > 0:
            r = self.range_of(gpa)
            n = min(size, r.end - gpa)
            parts.append(self._read_block(r.offset + gpa - r.gpa, n))
            gpa += n
            size -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def is_ram(self, gpa: int, size: int) -> bool:
        """Is all of [gpa, gpa + size) RAM (in one range)?"""
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.ranges)

    def range_of(self, gpa: int) -> RamRange:
        for r in self.ranges:
            if r.gpa <= gpa < r.end:
                return r
        raise GuestMemoryError(f"guest-physical address {gpa:#x} is not RAM")

    @abstractmethod
    def _read_block(self, offset: int, size: int) -> bytes:
        """Bytes at `offset` in the RAM block."""

    def close(self) -> None:
        pass


class SharedRam(PhysMemory):
    """Guest RAM mapped into our address space."""

    name = "shared-ram"

    def __init__(self, path: str | Path, ranges: list[RamRange]):
        super().__init__(ranges)
        need = max(r.offset + r.size for r in ranges)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise GuestMemoryError(f"cannot open guest RAM at {path}: {e.strerror}") from None
        try:
            # populated now: first touches of a fresh mapping fault page by page,
            # which made the first scan's copy (the guest paused) 10x slower
            self._map = mmap.mmap(fd, need, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  prot=mmap.PROT_READ)
        except (OSError, ValueError) as e:
            raise GuestMemoryError(f"cannot map {need} bytes of guest RAM from {path}: {e}") from None
        finally:
            os.close(fd)
        self.view = memoryview(self._map)

    def _read_block(self, offset: int, size: int) -> bytes:
        return self._map[offset:offset + size]

    def block_view(self, offset: int, size: int) -> memoryview:
        """Zero-copy view of the RAM block (for bulk scans)."""
        return self.view[offset:offset + size]

    def close(self) -> None:
        self.view.release()
        self._map.close()


class ProcMem(PhysMemory):
    """Guest RAM read from QEMU's address space through /proc/<pid>/mem."""

    name = "proc-mem"

    def __init__(self, pid: int, block_hva: int, ranges: list[RamRange]):
        super().__init__(ranges)
        self.block_hva = block_hva
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            os.pread(self._fd, 8, block_hva + ranges[0].offset)
        except OSError as e:
            raise GuestMemoryError(f"cannot read /proc/{pid}/mem: {e.strerror}",
                                   "run as the user that started QEMU, or as root") from None

    def _read_block(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, self.block_hva + offset)
        if len(data) != size:
            raise GuestMemoryError(f"short read of guest RAM at block offset {offset:#x}")
        return data

    def close(self) -> None:
        os.close(self._fd)


class GdbstubMem(PhysMemory):
    """Guest RAM through the gdbstub's `m` packets in physical mode."""

    name = "gdbstub"

    def __init__(self, rsp, ranges: list[RamRange]):
        super().__init__(ranges)
        self.rsp = rsp

    def read(self, gpa: int, size: int) -> bytes:
        self.range_of(gpa)
        self.rsp.set_physical_mode(True)
        return self.rsp.read_memory(gpa, size)

    def _read_block(self, offset: int, size: int) -> bytes:   # pragma: no cover - read() overrides
        raise NotImplementedError


def hva_of_block(rsp, ranges: list[RamRange]) -> int:
    """Host address of the RAM block's start in QEMU, from HMP `gpa2hva`."""
    first = ranges[0]
    out = rsp.monitor(f"gpa2hva {first.gpa:#x}")
    m = re.search(r"is (0x[0-9a-f]+)", out)
    if not m:
        raise GuestMemoryError(f"QEMU did not give a host address for guest RAM: {out.strip()!r}")
    return int(m.group(1), 16) - first.offset


def qemu_pid_of(target: str) -> int | None:
    """Pid of the local process listening on a gdbstub target, or None."""
    inode = _listening_inode(target)
    if inode is None:
        return None
    needle = f"socket:[{inode}]"
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == needle:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


def _listening_inode(target: str) -> int | None:
    if target.startswith("unix:"):
        path = target[5:]
        for line in _lines("/proc/net/unix"):
            f = line.split()
            if len(f) >= 8 and f[-1] == path and int(f[3], 16) & 0x10000:   # __SO_ACCEPTCON
                return int(f[6])
        return None
    port = int(target.rsplit(":", 1)[1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _lines(table):
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return int(f[9])
    return None


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()[1:]
    except OSError:
        return []
