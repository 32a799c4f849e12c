"""The live-object table: one entry per kernel object the tracer saw allocated.

Design: a SortedList of packed ints `address << 32 | slot` (address order, O(log n), no
dict) over one bytearray of 57-byte `struct` rows, freed slots reused: ~116 bytes/object
at 1M objects (RSS delta; tracemalloc says 115). A SortedDict of address -> index over
array columns measured ~185: its dict entries and boxed indices cost the difference.

No two live objects overlap: an object occupies [address, address + max(size, 1))
for that rule, so a size-0 record still owns its address (and `get` finds it) but
contains no pointer (`find` never returns it). An `add` over live objects drops
them (a missed free, or memory reused before tracing) and counts them in `replaced`.
Callers filter NULL and ZERO_SIZE_PTR (0x10) frees and allocations; that and
interrupt-context comm/pid ("hardirq"/"softirq", pid 0) are the tracer's job.
The table is not thread-safe.
"""

from __future__ import annotations

import enum
import operator
import struct
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from sortedcontainers import SortedList

__all__ = ["Flags", "Kind", "ObjectTable", "Record"]

_SLOT_BITS = 32
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_ADDR_LIMIT = 1 << 64            # addresses and ends are 64-bit
_NO_UNWIND = 0xFFFFFFFF          # unwind_id column value meaning None


class Kind(enum.IntEnum):
    """Which allocator an object came from."""

    KMALLOC = 0
    CACHE = 1          # kmem_cache_alloc*
    VMALLOC = 2
    PERCPU = 3
    PAGE = 4           # page allocator, kmalloc_large
    MEMBLOCK = 5       # boot-time (physical) allocations
    OTHER = 6

    @classmethod
    def parse(cls, kind: Kind | str | int) -> Kind:
        """A Kind from itself, its value, or its name in any case ("kmalloc")."""
        if isinstance(kind, str):
            try:
                return cls[kind.upper()]
            except KeyError:
                raise ValueError(f"unknown object kind {kind!r}") from None
        return cls(kind)


class Flags(enum.IntFlag):
    """Per-object flag bits (16 in all); the tracer decides what it sets."""

    NONE = 0
    HARDIRQ = 1 << 0       # allocated in hard interrupt context
    SOFTIRQ = 1 << 1       # allocated in softirq context
    NOT_LEAK = 1 << 2      # kmemleak_not_leak(): scanned, never reported
    NO_SCAN = 1 << 3       # kmemleak_no_scan(): contents not scanned
    IGNORE = 1 << 4        # kmemleak_ignore(): neither scanned nor reported


_KINDS = tuple(Kind)
_FLAG_VALUES: dict[int, Flags] = {}


def _flags(value: int) -> Flags:
    flags = _FLAG_VALUES.get(value)
    if flags is None:
        flags = _FLAG_VALUES[value] = Flags(value)
    return flags


class Record(NamedTuple):
    """One live object, with interned fields resolved. A snapshot, not a view."""

    address: int
    size: int                   # as requested
    kind: Kind
    cache: str | None           # kmem_cache name, None when not from a cache
    comm: str
    pid: int
    cpu: int
    jiffies: int
    timestamp_ns: int           # host clock when the allocation was seen
    seq: int                    # allocation order, unique, increasing
    backtrace: tuple[int, ...]  # return addresses, innermost first
    backtrace_id: int
    unwind_id: int | None       # the tracer's id of the raw unwind input, if any
    flags: Flags

    @property
    def end(self) -> int:
        """First address past the object."""
        return self.address + self.size

    def contains(self, pointer: int) -> bool:
        return self.address <= pointer < self.address + self.size


# One row per slot, little-endian, unaligned: 57 bytes.
_ROW = struct.Struct("<QQqQIIIIiHHB")
_ROW_FIELDS = ("size", "jiffies", "timestamp_ns", "seq", "comm", "cache",
               "backtrace", "unwind", "pid", "cpu", "flags", "kind")
_ROW_DTYPE = np.dtype(list(zip(_ROW_FIELDS, ("<u8", "<u8", "<i8", "<u8", "<u4", "<u4",
                                             "<u4", "<u4", "<i4", "<u2", "<u2", "u1"))))
assert _ROW_DTYPE.itemsize == _ROW.size
_SIZE = struct.Struct("<Q")          # the size field, at the start of a row
_UNWIND = struct.Struct("<I")
_UNWIND_OFFSET = _ROW_DTYPE.fields["unwind"][1]
_FLAGS = struct.Struct("<H")
_FLAGS_OFFSET = _ROW_DTYPE.fields["flags"][1]


class _Interner:
    """Values <-> dense int ids; ids are never reused."""

    __slots__ = ("ids", "values", "limit")

    def __init__(self, limit: int, *preset) -> None:
        self.ids: dict = {}
        self.values: list = []
        self.limit = limit
        for value in preset:
            self.intern(value)

    def intern(self, value) -> int:
        i = self.ids.get(value)
        if i is None:
            i = len(self.values)
            if i > self.limit:
                raise OverflowError(f"more than {self.limit + 1} interned values")
            self.ids[value] = i
            self.values.append(value)
        return i

    def __len__(self) -> int:
        return len(self.values)


def _address(address) -> int:
    """An address as a Python int (numpy scalars included)."""
    return operator.index(address)


class ObjectTable:
    """Live kernel objects by address. See the module docstring for the rules.

    `replaced` counts live objects dropped because a new (or moved) object overlapped
    them; `unknown_frees` counts `remove` calls for an address no object starts at.
    """

    def __init__(self) -> None:
        self._index = SortedList()                    # address << 32 | slot
        self._rows = bytearray()
        self._capacity = 0                            # slots in _rows
        self._free = array("I")                       # slots to reuse
        self._next_slot = 0
        self._next_seq = 0
        self._version = 0                             # bumped on every change of extents
        self._cache: tuple | None = None              # (version, addresses, sizes, slots)
        self._comms = _Interner(0xFFFFFFFF)
        self._caches = _Interner(0xFFFFFFFF, None)     # id 0: not from a cache
        self._backtraces = _Interner(0xFFFFFFFF, ())   # id 0: no backtrace
        self.replaced = 0
        self.unknown_frees = 0

    # -- interning --------------------------------------------------------
    def intern_backtrace(self, backtrace) -> int:
        """The id of a backtrace (a sequence of return addresses), interning it."""
        bt = tuple(backtrace)
        i = self._backtraces.ids.get(bt)
        if i is not None:
            return i
        bt = tuple(operator.index(a) for a in bt)
        for a in bt:
            if not 0 <= a < _ADDR_LIMIT:
                raise ValueError(f"return address {a:#x} is not a 64-bit address")
        return self._backtraces.intern(bt)

    def backtrace(self, backtrace_id: int) -> tuple[int, ...]:
        """The backtrace with this id (IndexError for an id never given out)."""
        if backtrace_id < 0:
            raise IndexError(f"no backtrace {backtrace_id}")
        return self._backtraces.values[backtrace_id]

    @property
    def backtrace_count(self) -> int:
        return len(self._backtraces)

    # -- changes ----------------------------------------------------------
    def add(self, address: int, size: int, kind: Kind | str = Kind.KMALLOC, *,
            cache: str | None = None, comm: str = "", pid: int = 0, cpu: int = 0,
            jiffies: int = 0, timestamp_ns: int | None = None,
            backtrace: tuple[int, ...] | int = (), unwind_id: int | None = None,
            flags: int = 0) -> int:
        """Add a live object and return its sequence number.

        Live objects it overlaps are dropped first and counted in `replaced`.
        `backtrace` is a tuple of return addresses or an id from `intern_backtrace`;
        `timestamp_ns` defaults to time.time_ns().
        """
        address, size = _address(address), operator.index(size)
        if not 0 <= address < _ADDR_LIMIT:
            raise ValueError(f"address {address:#x} is not a 64-bit address")
        if size < 0 or address + size > _ADDR_LIMIT:
            raise ValueError(f"object of {size} bytes at {address:#x} does not fit in 64 bits")
        kind = kind if type(kind) is Kind else Kind.parse(kind)
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        if unwind_id is None:
            unwind_id = _NO_UNWIND
        elif not 0 <= unwind_id < _NO_UNWIND:
            raise ValueError(f"unwind id {unwind_id} out of range")
        if not isinstance(comm, str):
            raise TypeError(f"comm must be a str, not {type(comm).__name__}")
        if cache is not None and not isinstance(cache, str):
            raise TypeError(f"cache must be a str or None, not {type(cache).__name__}")
        if isinstance(backtrace, tuple):
            bt_id = self.intern_backtrace(backtrace)
        else:
            try:
                bt_id = operator.index(backtrace)
            except TypeError:                      # a list or other sequence
                bt_id = self.intern_backtrace(backtrace)
            else:
                if not 0 <= bt_id < len(self._backtraces):
                    raise ValueError(f"no backtrace {bt_id}")
        slot = self._take_slot()
        try:
            _ROW.pack_into(self._rows, slot * _ROW.size, size, jiffies, timestamp_ns,
                           self._next_seq, self._comms.intern(comm),
                           self._caches.intern(cache), bt_id, unwind_id, pid, cpu,
                           flags, kind)
        except struct.error as e:
            self._free.append(slot)
            raise ValueError(f"object at {address:#x}: a field is out of range ({e})") from None
        self._drop_overlaps(address, address + (size or 1))
        self._index.add(address << _SLOT_BITS | slot)
        self._version += 1
        self._cache = None
        seq = self._next_seq
        self._next_seq = seq + 1
        return seq

    def remove(self, address: int) -> Record | None:
        """Remove the object starting at `address` and return it; None, counted in
        `unknown_frees`, when none does (e.g. allocated before tracing began)."""
        address = _address(address)
        key = self._key_at(address)
        if key is None:
            self.unknown_frees += 1
            return None
        record = self._record(key)
        self._delete(key)
        return record

    def move(self, old_address: int, new_address: int, new_size: int) -> Record | None:
        """Give the object at `old_address` a new address and size, keeping its
        provenance (kind, cache, comm, pid, cpu, jiffies, time, seq, backtrace,
        unwind id, flags): a krealloc convenience. None, and nothing changes, when
        no object starts at `old_address`. Objects the new extent overlaps are
        dropped and counted in `replaced`."""
        old_address, new_address = _address(old_address), _address(new_address)
        new_size = operator.index(new_size)
        if not 0 <= new_address < _ADDR_LIMIT:
            raise ValueError(f"address {new_address:#x} is not a 64-bit address")
        if new_size < 0 or new_address + new_size > _ADDR_LIMIT:
            raise ValueError(f"object of {new_size} bytes at {new_address:#x} "
                             "does not fit in 64 bits")
        key = self._key_at(old_address)
        if key is None:
            return None
        slot = key & _SLOT_MASK
        self._index.remove(key)
        _SIZE.pack_into(self._rows, slot * _ROW.size, new_size)
        self._drop_overlaps(new_address, new_address + (new_size or 1))
        new_key = new_address << _SLOT_BITS | slot
        self._index.add(new_key)
        self._version += 1
        self._cache = None
        return self._record(new_key)

    def set_unwind(self, address: int, unwind_id: int | None) -> bool:
        """Set the raw-unwind-input id of the object at `address`; False if none."""
        if unwind_id is None:
            unwind_id = _NO_UNWIND
        elif not 0 <= unwind_id < _NO_UNWIND:
            raise ValueError(f"unwind id {unwind_id} out of range")
        key = self._key_at(_address(address))
        if key is None:
            return False
        _UNWIND.pack_into(self._rows, (key & _SLOT_MASK) * _ROW.size + _UNWIND_OFFSET, unwind_id)
        return True

    def set_flags(self, address: int, flags: int) -> bool:
        """Replace the flags of the object at `address`; False if none."""
        if not 0 <= flags <= 0xFFFF:
            raise ValueError(f"flags {flags:#x} do not fit in 16 bits")
        key = self._key_at(_address(address))
        if key is None:
            return False
        _FLAGS.pack_into(self._rows, (key & _SLOT_MASK) * _ROW.size + _FLAGS_OFFSET, flags)
        return True

    # -- lookups ----------------------------------------------------------
    def get(self, address: int) -> Record | None:
        """The object starting exactly at `address`."""
        key = self._key_at(_address(address))
        return None if key is None else self._record(key)

    def find(self, address: int) -> Record | None:
        """The object whose [address, address + size) contains `address`
        (interior pointers included). Size-0 objects contain nothing."""
        address = _address(address)
        key = self._floor(address << _SLOT_BITS | _SLOT_MASK)
        if key is None:
            return None
        size = _SIZE.unpack_from(self._rows, (key & _SLOT_MASK) * _ROW.size)[0]
        return self._record(key) if address < (key >> _SLOT_BITS) + size else None

    def overlapping(self, start: int, end: int) -> list[Record]:
        """Objects occupying any byte of [start, end), in address order (a size-0
        object occupies its address here, as for the overlap rule)."""
        start, end = _address(start), _address(end)
        return [self._record(k) for k in self._overlapping_keys(start, end)]

    def __contains__(self, address) -> bool:
        """Whether an object starts exactly at `address`."""
        return self._key_at(_address(address)) is not None

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[Record]:
        """Records in address order. The table must not change meanwhile."""
        version = self._version
        for key in self._index:
            if self._version != version:
                raise RuntimeError("ObjectTable changed during iteration")
            yield self._record(key)
        if self._version != version:
            raise RuntimeError("ObjectTable changed during iteration")

    def in_allocation_order(self) -> Iterator[Record]:
        """Records by sequence number (oldest first). Sorts on each call: O(n log n)
        in numpy. The table must not change meanwhile."""
        version = self._version
        addresses, _, slots = self._bulk()
        if not len(slots):
            return
        rows = np.frombuffer(self._rows, dtype=_ROW_DTYPE, count=self._capacity)
        seqs = rows["seq"][slots]
        del rows                                   # let the bytearray resize again
        order = np.argsort(seqs, kind="stable")
        for address, slot in zip(addresses[order].tolist(), slots[order].tolist()):
            if self._version != version:
                raise RuntimeError("ObjectTable changed during iteration")
            yield self._record(address << _SLOT_BITS | slot)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(addresses, sizes) of all objects in address order, as read-only uint64
        arrays; cached until the table next changes."""
        addresses, sizes, _ = self._bulk()
        return addresses, sizes

    def columns(self, *names: str) -> list[np.ndarray]:
        """Row fields ("kind", "flags", "seq", "jiffies", ...) of all objects, in the
        address order of `arrays()`; copies."""
        _, _, slots = self._bulk()
        rows = np.frombuffer(self._rows, dtype=_ROW_DTYPE, count=self._capacity)
        out = [rows[name][slots] for name in names]
        del rows
        return out

    def __repr__(self) -> str:
        return (f"<ObjectTable {len(self)} objects, {self.replaced} replaced, "
                f"{self.unknown_frees} unknown frees>")

    # -- internals --------------------------------------------------------
    def _bulk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cache = self._cache
        if cache is not None and cache[0] == self._version:
            return cache[1:]
        n = len(self._index)
        keys = self._index
        addresses = np.fromiter((k >> _SLOT_BITS for k in keys), dtype=np.uint64, count=n)
        slots = np.fromiter((k & _SLOT_MASK for k in keys), dtype=np.uint32, count=n)
        rows = np.frombuffer(self._rows, dtype=_ROW_DTYPE, count=self._capacity)
        sizes = np.ascontiguousarray(rows["size"][slots], dtype=np.uint64)
        del rows
        for a in (addresses, sizes, slots):
            a.setflags(write=False)
        self._cache = (self._version, addresses, sizes, slots)
        return addresses, sizes, slots

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next_slot
        if slot >= self._capacity:
            if slot > _SLOT_MASK:
                raise OverflowError("more than 2**32 objects")
            grow = max(1024, self._capacity >> 3)
            self._rows.extend(bytes(grow * _ROW.size))
            self._capacity += grow
        self._next_slot = slot + 1
        return slot

    # Neighbour lookups read SortedList's two-level layout (_maxes, _lists) directly:
    # three times faster than bisect plus positional indexing, which rebuilds
    # the positional index after every sublist split.
    def _floor(self, key: int) -> int | None:
        """The largest index key <= key."""
        maxes = self._index._maxes
        pos = bisect_right(maxes, key)
        if pos == len(maxes):
            return maxes[-1] if maxes else None
        sub = self._index._lists[pos]
        i = bisect_right(sub, key)
        if i:
            return sub[i - 1]
        return maxes[pos - 1] if pos else None

    def _ceil(self, key: int) -> int | None:
        """The smallest index key >= key."""
        maxes = self._index._maxes
        pos = bisect_left(maxes, key)
        if pos == len(maxes):
            return None
        sub = self._index._lists[pos]
        return sub[bisect_left(sub, key)]

    def _key_at(self, address: int) -> int | None:
        """The index key of the object starting exactly at `address`."""
        key = self._ceil(address << _SLOT_BITS)
        if key is not None and key >> _SLOT_BITS == address:
            return key
        return None

    def _extent_end(self, key: int) -> int:
        size = _SIZE.unpack_from(self._rows, (key & _SLOT_MASK) * _ROW.size)[0]
        return (key >> _SLOT_BITS) + (size or 1)

    def _overlapping_keys(self, start: int, end: int) -> list[int]:
        """Keys of objects whose occupied extent meets [start, end), in order."""
        if end <= start:
            return []
        keys = []
        low = start << _SLOT_BITS
        before = self._floor(low - 1)
        if before is not None and self._extent_end(before) > start:
            keys.append(before)
        first = self._ceil(low)
        if first is not None and first >> _SLOT_BITS < end:
            keys.extend(self._index.irange(first, (end << _SLOT_BITS) - 1))
        return keys

    def _drop_overlaps(self, start: int, end: int) -> None:
        for key in self._overlapping_keys(start, end):
            self._delete(key)
            self.replaced += 1

    def _delete(self, key: int) -> None:
        self._index.remove(key)
        self._free.append(key & _SLOT_MASK)
        self._version += 1
        self._cache = None

    def _record(self, key: int) -> Record:
        (size, jiffies, ts, seq, comm, cache, bt, unwind, pid, cpu, flags,
         kind) = _ROW.unpack_from(self._rows, (key & _SLOT_MASK) * _ROW.size)
        return Record(key >> _SLOT_BITS, size, _KINDS[kind], self._caches.values[cache],
                      self._comms.values[comm], pid, cpu, jiffies, ts, seq,
                      self._backtraces.values[bt], bt,
                      None if unwind == _NO_UNWIND else unwind, _flags(flags))
