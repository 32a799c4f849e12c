"""Kernel and module symbols: address -> "name+0xoff/0xsize [module]" and back.

A `SymbolTable` keeps symbols in sorted numpy arrays so that one lookup is a
binary search and symbolizing many addresses is one vectorized `searchsorted`.
Sources: System.map, the vmlinux ELF .symtab, the kernel's own kallsyms tables
(see `kallsyms.py`) and, for modules, arrays read from the guest's
`struct module`. Module tables are combined with the kernel's by `merge`.

Aliases (several symbols at one address) are ordered the way scripts/kallsyms.c
orders them, so the name `format` picks is the one the kernel's %pS prints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..errors import SymbolError

if TYPE_CHECKING:
    from .kallsyms import KallsymsData

U64 = np.uint64
# nm types that are not addresses in the kernel image: absolute, undefined,
# debugging; '?'/'-' are unknown/stabs.
_SKIP_TYPES = frozenset("AaUNn?-")
# Linker bookkeeping (mksysmap drops most of it too): arm64 mapping symbols
# ($x, $d), assembler local labels (also the renamed copies in the arm64 nVHE
# hypervisor object), CRCs and strings of exported symbols.
_SKIP_PREFIXES = ("$", ".L", "__crc_", "__kstrtab_", "__kstrtabns_",
                  "__kvm_nvhe_$", "__kvm_nvhe_.L")
_WEAK_TYPES = frozenset("WwVv")
_SYSTEM_MAP_LINE = re.compile(rb"^([0-9a-fA-F]{8,16}) ([A-Za-z?-]) ([^\s]+)\n", re.M)
_REQUIRED = ("_end",)             # sorted last-ish: gone when the file is cut short
_TEXT_START = ("_text", "_stext")


@dataclass(frozen=True)
class Symbol:
    """One symbol. `module` is None for the kernel image."""

    name: str
    address: int
    size: int
    module: str | None = None
    type: str = "?"

    def format(self, address: int) -> str:
        """`address` (inside this symbol) the way %pS prints it."""
        text = f"{self.name}+{address - self.address:#x}/{self.size:#x}"
        return f"{text} [{self.module}]" if self.module else text


def _leading_underscores(name: str) -> int:
    return len(name) - len(name.lstrip("_"))


def _linker_provided(name: str) -> bool:
    """scripts/kallsyms.c may_be_linker_script_provide_symbol()."""
    if len(name) < 8 or not name.startswith("__"):
        return False
    return (name.startswith(("__start_", "__stop_", "__end_"))
            or name.endswith(("_start", "_end")))


def _kernel_order(addresses: np.ndarray, names: Sequence[str], types: np.ndarray) -> np.ndarray:
    """Permutation sorting by address, aliases ordered like scripts/kallsyms.c:
    non-weak first, then not linker-provided, then fewer leading underscores,
    then original order."""
    n = len(names)
    weak = np.isin(types, np.frombuffer("".join(_WEAK_TYPES).encode(), np.uint8))
    # Ties need the name keys; only compute them where an address repeats.
    sorted_addr = np.sort(addresses, kind="stable")
    if n < 2 or not (sorted_addr[1:] == sorted_addr[:-1]).any():
        return np.argsort(addresses, kind="stable")
    provided = np.fromiter((_linker_provided(s) for s in names), bool, n)
    unders = np.fromiter((_leading_underscores(s) for s in names), np.int64, n)
    return np.lexsort((np.arange(n), unders, provided, weak, addresses))


def _infer_sizes(addresses: np.ndarray, group: np.ndarray,
                 end: np.ndarray | None = None) -> np.ndarray:
    """Distance from each symbol to the next one at a higher address in the same
    group, as kernel/kallsyms.c get_symbol_pos() infers it. With `end` (the end
    of the area holding each symbol, 0 if unknown) sizes stop there, and the
    last symbol of a group reaches it; otherwise the last symbol's size is 0."""
    n = len(addresses)
    sizes = np.zeros(n, U64)
    if n == 0:
        return sizes
    order = np.lexsort((addresses, group))
    a = addresses[order]
    g = group[order]
    # Runs of equal (group, address); each run's size reaches the next run.
    change = np.ones(n, bool)
    change[1:] = (a[1:] != a[:-1]) | (g[1:] != g[:-1])
    starts = np.flatnonzero(change)
    run_of = np.cumsum(change) - 1
    has_next = np.zeros(len(starts), bool)
    has_next[:-1] = g[starts[1:]] == g[starts[:-1]]
    next_addr = np.zeros(len(starts), U64)
    next_addr[:-1] = a[starts[1:]]
    has = has_next[run_of]
    s = np.where(has, next_addr[run_of] - a, U64(0))
    if end is not None:
        e = end[order]
        capped = (e > a) & (~has | (e - a < s))
        s = np.where(capped, e - a, s)
    sizes[order] = s
    return sizes


class SymbolTable:
    """Sorted symbols of the kernel and/or modules.

    `absolute` symbols (x86 per-CPU offsets linked at 0) can be found by name but
    are never the answer to an address lookup and do not move with KASLR; only
    kernel-image symbols (module None) move in `relocated`.
    """

    def __init__(self, addresses: np.ndarray, sizes: np.ndarray, names: list[str],
                 types: np.ndarray, module_ids: np.ndarray, module_names: list[str],
                 absolute: np.ndarray, slide: int = 0):
        """Low-level: arrays already sorted; use the from_* constructors."""
        self.addresses = addresses
        self.sizes = sizes
        self.names = names
        self.types = types
        self.module_ids = module_ids
        self.module_names = module_names
        self.absolute = absolute
        self.slide = slide
        self._by_name: dict[str, int] | None = None
        self._lk: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- construction -----------------------------------------------------

    @classmethod
    def _build(cls, addresses: np.ndarray, sizes: np.ndarray | None, names: list[str],
               types: np.ndarray, absolute: np.ndarray, module: str | None = None,
               keep_order: bool = False, range_end: np.ndarray | None = None) -> SymbolTable:
        """Sort (unless `keep_order`), infer missing sizes, wrap."""
        addresses = np.asarray(addresses, U64)
        n = len(addresses)
        if len(names) != n or len(types) != n or len(absolute) != n:
            raise SymbolError(f"symbol arrays differ in length ({n} addresses, {len(names)} names)")
        if keep_order:
            order = np.argsort(addresses, kind="stable")
        else:
            order = _kernel_order(addresses, names, types)
        addresses = addresses[order]
        names = [names[i] for i in order] if not _is_identity(order) else list(names)
        types = np.asarray(types, np.uint8)[order]
        absolute = np.asarray(absolute, bool)[order]
        end = range_end[order] if range_end is not None else None
        inferred = _infer_sizes(addresses, absolute.astype(np.int8), end)
        if sizes is None:
            sizes = inferred
        else:
            sizes = np.asarray(sizes, U64)[order]
            sizes = np.where(sizes == 0, inferred, sizes)
        mods = [module] if module is not None else []
        module_ids = np.full(n, 0 if module is not None else -1, np.int32)
        return cls(addresses, sizes, names, types, module_ids, mods, absolute)

    @classmethod
    def from_arrays(cls, addresses: Sequence[int] | np.ndarray,
                    sizes: Sequence[int] | np.ndarray | None,
                    names: Sequence[str], module: str | None = None,
                    types: Sequence[str] | str | None = None,
                    ranges: Iterable[tuple[int, int]] = ()) -> SymbolTable:
        """A table from parallel arrays, e.g. a module's kallsyms read from the guest.

        Zero (or missing) sizes become the distance to the next symbol, capped at
        the end of the (start, size) range in `ranges` that holds the symbol
        (e.g. a module's text and data areas). Module symbols never move in
        `relocated`."""
        addresses = np.asarray(addresses, U64).reshape(-1)
        names = [str(s) for s in names]
        n = len(addresses)
        if len(names) != n:
            raise SymbolError(f"{len(names)} symbol names for {n} addresses")
        if types is None:
            t = np.full(n, ord("t"), np.uint8)
        else:
            tstr = "".join(types)
            if len(tstr) != n:
                raise SymbolError(f"{len(tstr)} symbol types for {n} symbols")
            t = np.frombuffer(tstr.encode("latin-1", "replace"), np.uint8).copy()
        size_arr = None if sizes is None else np.asarray(sizes, U64).reshape(-1)
        if size_arr is not None and len(size_arr) != n:
            raise SymbolError(f"{len(size_arr)} symbol sizes for {n} symbols")
        # Same junk filter as for the kernel (module symtabs hold $x/$d too).
        keep = np.fromiter((chr(c) not in _SKIP_TYPES and bool(s)
                            and not s.startswith(_SKIP_PREFIXES)
                            for c, s in zip(t.tolist(), names)), bool, n)
        if not keep.all():
            addresses, t = addresses[keep], t[keep]
            size_arr = size_arr[keep] if size_arr is not None else None
            names = [s for s, k in zip(names, keep.tolist()) if k]
            n = len(names)
        end = None
        ranges = [(int(s), int(s) + int(z)) for s, z in ranges]
        if ranges and n:
            end = np.zeros(n, U64)
            for lo, hi in ranges:
                inside = (addresses >= U64(lo)) & (addresses < U64(hi))
                end[inside] = U64(hi)
        return cls._build(addresses, size_arr, names, t, np.zeros(n, bool), module,
                          range_end=end)

    @classmethod
    def from_system_map(cls, path: str | Path) -> SymbolTable:
        """Parse a kernel System.map (`nm -n` output). SymbolError if it is
        missing, empty, malformed or cut short."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SymbolError(f"cannot read System.map {path}: {e.strerror or e}",
                              "pass the System.map of the guest's kernel") from None
        hint = "use the complete System.map that was built with the guest's kernel"
        if not data.strip():
            raise SymbolError(f"System.map {path} is empty", hint)
        if not data.endswith(b"\n"):
            last = data.rsplit(b"\n", 1)[-1]
            line = data.count(b"\n") + 1
            raise SymbolError(f"System.map {path} is truncated: line {line} ({_show(last)}) "
                              "has no end of line", hint)
        # Anchored at line starts, so every line matched <=> as many matches as lines.
        found = _SYSTEM_MAP_LINE.findall(data)
        width = len(found[0][0]) if found else 0
        if len(found) != data.count(b"\n") or any(len(a) != width for a, _, _ in found):
            raise SymbolError(f"System.map {path} is malformed: {_first_bad_line(data)}", hint)
        hexes = b"".join(a for a, _, _ in found).decode("ascii")
        raw = np.frombuffer(bytes.fromhex(hexes), ">u8" if width == 16 else ">u4").astype(U64)
        if (raw[1:] < raw[:-1]).any():
            bad = int(np.flatnonzero(raw[1:] < raw[:-1])[0]) + 2
            raise SymbolError(f"System.map {path} is malformed: line {bad} is out of address "
                              "order (not `nm -n` output?)", hint)
        types_all = b"".join(t for _, t, _ in found)
        keep = [i for i, (_, t, s) in enumerate(found)
                if chr(t[0]) not in _SKIP_TYPES and not s.startswith(_SKIP_BYTES)]
        names = [found[i][2].decode("latin-1") for i in keep]
        _require_kernel(names, f"System.map {path}", "truncated or not a kernel's System.map",
                        hint)
        idx = np.asarray(keep, np.int64)
        addresses = raw[idx]
        types = np.frombuffer(types_all, np.uint8)[idx]
        return cls._kernel_table(addresses, None, names, types)

    @classmethod
    def _kernel_table(cls, addresses: np.ndarray, sizes: np.ndarray | None, names: list[str],
                      types: np.ndarray) -> SymbolTable:
        """Kernel-image table: per-CPU symbols linked at 0 are absolute."""
        absolute = np.zeros(len(names), bool)
        try:
            pstart = names.index("__per_cpu_start")
            pend = names.index("__per_cpu_end")
        except ValueError:
            pass
        else:
            text = [addresses[names.index(s)] for s in _TEXT_START if s in names]
            lo, hi = addresses[pstart], addresses[pend]
            if text and lo < min(text):
                absolute = (addresses >= lo) & (addresses <= hi)
        return cls._build(addresses, sizes, names, types, absolute)

    @classmethod
    def from_vmlinux(cls, path: str | Path) -> SymbolTable:
        """Read the .symtab of a vmlinux ELF: functions sized as kallsyms sizes
        them (to the next symbol), data from st_size where non-zero."""
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        path = Path(path)
        hint = "pass the vmlinux (with symbols) of the guest's kernel"
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                symtab = elf.get_section_by_name(".symtab")
                if symtab is None:
                    raise SymbolError(f"{path} has no symbol table (stripped?)", hint)
                sections = [(s["sh_flags"], s["sh_type"]) for s in elf.iter_sections()]
                strtab = elf.get_section(symtab["sh_link"])
                is64 = elf.elfclass == 64
                endian = "<" if elf.little_endian else ">"
                f.seek(symtab["sh_offset"])
                raw_syms = f.read(symtab["sh_size"])
                f.seek(strtab["sh_offset"])
                strings = f.read(strtab["sh_size"])
                if len(raw_syms) != symtab["sh_size"] or len(strings) != strtab["sh_size"]:
                    raise SymbolError(f"{path} is truncated: its symbol table is cut short",
                                      hint)
        except OSError as e:
            raise SymbolError(f"cannot read {path}: {e.strerror or e}", hint) from None
        except (ELFError, ValueError, KeyError, IndexError) as e:
            raise SymbolError(f"{path} is not a usable ELF file: {e}", hint) from None
        return cls._from_elf_symtab(raw_syms, strings, sections, is64, endian, str(path))

    @classmethod
    def _from_elf_symtab(cls, raw_syms: bytes, strings: bytes, sections: list[tuple[int, str]],
                         is64: bool, endian: str, what: str) -> SymbolTable:
        if is64:
            dt = np.dtype([("name", endian + "u4"), ("info", "u1"), ("other", "u1"),
                           ("shndx", endian + "u2"), ("value", endian + "u8"),
                           ("size", endian + "u8")])
        else:
            dt = np.dtype([("name", endian + "u4"), ("value", endian + "u4"),
                           ("size", endian + "u4"), ("info", "u1"), ("other", "u1"),
                           ("shndx", endian + "u2")])
        if len(raw_syms) % dt.itemsize:
            raise SymbolError(f"{what}: .symtab size is not a multiple of the symbol size")
        syms = np.frombuffer(raw_syms, dt)
        nsec = len(sections)
        stype = syms["info"] & 0xF
        bind = syms["info"] >> 4
        shndx = syms["shndx"].astype(np.int64)
        # Defined in a real section; not SECTION/FILE symbols.
        ok = (shndx > 0) & (shndx < min(nsec, 0xFF00)) & (stype != 3) & (stype != 4)
        ok &= syms["name"] < len(strings)
        flags = np.array([f for f, _ in sections] or [0], np.uint64)
        nobits = np.array([t == "SHT_NOBITS" for _, t in sections] or [False])
        sec = np.where(ok, shndx, 0)
        sflags = flags[sec]
        alloc = (sflags & 2) != 0
        ok &= alloc                                          # drop debug-only sections
        letter = np.where((sflags & 4) != 0, ord("T"),
                          np.where((sflags & 1) == 0, ord("R"),
                                   np.where(nobits[sec], ord("B"), ord("D"))))
        letter = np.where(bind == 0, letter + 32, letter)    # local -> lower case
        letter = np.where(bind == 2, np.where(stype == 1, ord("V"), ord("W")), letter)
        idx = np.flatnonzero(ok)
        # Names: NUL-terminated strings at st_name.
        sbuf = np.frombuffer(strings, np.uint8)
        nuls = np.flatnonzero(sbuf == 0)
        starts = syms["name"][idx].astype(np.int64)
        pos = np.searchsorted(nuls, starts)
        has_end = pos < len(nuls)
        idx, starts, pos = idx[has_end], starts[has_end], pos[has_end]
        ends = nuls[pos]
        names: list[str] = []
        keep: list[int] = []
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            if e == s:
                continue
            name = strings[s:e].decode("latin-1")
            if name.startswith(_SKIP_PREFIXES):
                continue
            names.append(name)
            keep.append(k)
        sel = idx[np.asarray(keep, np.int64)]
        addresses = syms["value"][sel].astype(U64)
        types = letter[sel].astype(np.uint8)
        # Code as kallsyms sizes it for %pS: up to the next symbol, alignment
        # padding included (st_size stops before it); data keeps st_size.
        code = (types == ord("T")) | (types == ord("t"))
        sizes = np.where(code, U64(0), syms["size"][sel].astype(U64))
        _require_kernel(names, what, "not a kernel image", "pass the guest kernel's vmlinux")
        return cls._kernel_table(addresses, sizes, names, types)

    @classmethod
    def from_kallsyms(cls, data: KallsymsData) -> SymbolTable:
        """A kernel table from decoded kallsyms (addresses as read from memory,
        i.e. already relocated: `slide` stays 0)."""
        types = np.frombuffer(data.types, np.uint8).copy()
        # Keep the kernel's own alias order; sizes as get_symbol_pos() infers them.
        return cls._build(np.asarray(data.addresses, U64), None, list(data.names), types,
                          np.asarray(data.absolute, bool), keep_order=True)

    @classmethod
    def merge(cls, tables: Iterable[SymbolTable]) -> SymbolTable:
        """One table holding all symbols of `tables` (kernel plus modules).
        Names resolve to the kernel first; "module:name" picks a module's."""
        tables = list(tables)
        if not tables:
            raise SymbolError("no symbol tables to merge")
        mod_names: list[str] = []
        ids = []
        for t in tables:
            remap = []
            for m in t.module_names:
                if m not in mod_names:
                    mod_names.append(m)
                remap.append(mod_names.index(m))
            remap_arr = np.asarray(remap + [-1], np.int32)     # -1 stays -1
            ids.append(remap_arr[t.module_ids])
        addresses = np.concatenate([t.addresses for t in tables])
        order = np.argsort(addresses, kind="stable")
        names_all = [s for t in tables for s in t.names]
        slide = next((t.slide for t in tables if (t.module_ids < 0).any()), 0)
        return cls(addresses[order],
                   np.concatenate([t.sizes for t in tables])[order],
                   [names_all[i] for i in order],
                   np.concatenate([t.types for t in tables])[order],
                   np.concatenate(ids)[order], mod_names,
                   np.concatenate([t.absolute for t in tables])[order], slide)

    # -- KASLR --------------------------------------------------------------

    def relocated(self, slide: int) -> SymbolTable:
        """A copy whose kernel-image symbols sit at link address + `slide`
        (absolute, not cumulative: `t.relocated(s).relocated(s)` == `t.relocated(s)`)."""
        delta = (slide - self.slide) % (1 << 64)
        moves = (self.module_ids < 0) & ~self.absolute
        addresses = self.addresses.copy()
        addresses[moves] += U64(delta)
        table = SymbolTable(addresses, self.sizes, self.names, self.types, self.module_ids,
                            self.module_names, self.absolute, slide)
        if len(addresses) > 1 and (addresses[1:] < addresses[:-1]).any():
            order = np.argsort(addresses, kind="stable")
            table = SymbolTable(addresses[order], self.sizes[order],
                                [self.names[i] for i in order], self.types[order],
                                self.module_ids[order], self.module_names,
                                self.absolute[order], slide)
        else:
            table._by_name = self._by_name                  # same indices
        return table

    # -- name -> address --------------------------------------------------

    def _name_index(self) -> dict[str, int]:
        if self._by_name is None:
            n = len(self.names)
            local = (self.types >= ord("a")) & (self.types <= ord("z"))
            # Priority: kernel before modules, global before local, lower address.
            order = np.lexsort((np.arange(n), local, self.module_ids >= 0))[::-1]
            names = self.names
            index = dict(zip([names[i] for i in order], order.tolist()))
            for mid, mod in enumerate(self.module_names):
                for i in np.flatnonzero(self.module_ids == mid)[::-1].tolist():
                    index[f"{mod}:{names[i]}"] = i
            self._by_name = index
        return self._by_name

    def get(self, name: str) -> int | None:
        """Address of `name` ("module:name" for a module's), or None."""
        i = self._name_index().get(name)
        return None if i is None else int(self.addresses[i])

    def address_of(self, name: str) -> int:
        """Address of `name`; SymbolError if there is no such symbol."""
        address = self.get(name)
        if address is None:
            raise SymbolError(f"no symbol {name!r}",
                              "check the name, or that the symbols match the guest's kernel")
        return address

    def symbol(self, index: int) -> Symbol:
        """The symbol at table position `index`."""
        mid = int(self.module_ids[index])
        return Symbol(self.names[index], int(self.addresses[index]), int(self.sizes[index]),
                      self.module_names[mid] if mid >= 0 else None, chr(self.types[index]))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._name_index()

    def __repr__(self) -> str:
        return (f"<SymbolTable {len(self)} symbols, {len(self.module_names)} modules, "
                f"slide={self.slide:#x}>")

    # -- address -> symbol ------------------------------------------------

    def _lookup_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, index) of the symbol each distinct address resolves to:
        the first alias with a non-zero size, else the first alias."""
        if self._lk is None:
            cand = np.flatnonzero(~self.absolute)
            a = self.addresses[cand]
            zero = self.sizes[cand] == 0
            order = np.lexsort((np.arange(len(cand)), zero, a))
            a = a[order]
            first = np.ones(len(a), bool)
            first[1:] = a[1:] != a[:-1]
            idx = cand[order][first]
            start = self.addresses[idx]
            self._lk = (start, start + self.sizes[idx], idx)
        return self._lk

    def lookup_many(self, addresses: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each address: (table index or -1, offset into that symbol)."""
        addrs = np.asarray(addresses, U64).reshape(-1)
        start, end, idx = self._lookup_index()
        k = np.searchsorted(start, addrs, side="right").astype(np.int64) - 1
        kc = np.maximum(k, 0)
        hit = (k >= 0) & (addrs < end[kc]) if len(start) else np.zeros(len(addrs), bool)
        index = np.where(hit, idx[kc] if len(idx) else 0, -1)
        offset = np.where(hit, addrs - (start[kc] if len(start) else U64(0)), U64(0))
        return index.astype(np.int64), offset.astype(U64)

    def lookup(self, address: int) -> Symbol | None:
        """The symbol containing `address`, or None."""
        if not 0 <= address < 1 << 64:
            return None
        index, _ = self.lookup_many(np.array([address], U64))
        return None if index[0] < 0 else self.symbol(int(index[0]))

    def format(self, address: int) -> str:
        """%pS style: "name+0xoff/0xsize", plus " [module]"; else "0x<address>"."""
        sym = self.lookup(address)
        return sym.format(address) if sym else f"{address:#x}"

    def format_many(self, addresses: Sequence[int] | np.ndarray) -> list[str]:
        """`format` for many addresses at once."""
        addrs = np.asarray(addresses, U64).reshape(-1)
        index, offset = self.lookup_many(addrs)
        out = []
        for a, i, off in zip(addrs.tolist(), index.tolist(), offset.tolist()):
            if i < 0:
                out.append(f"{a:#x}")
                continue
            mid = int(self.module_ids[i])
            text = f"{self.names[i]}+{off:#x}/{int(self.sizes[i]):#x}"
            out.append(f"{text} [{self.module_names[mid]}]" if mid >= 0 else text)
        return out


_SKIP_BYTES = tuple(p.encode() for p in _SKIP_PREFIXES)


def _require_kernel(names: list[str], what: str, why: str, hint: str) -> None:
    """SymbolError unless `names` has the kernel's start and end symbols."""
    present = set(names).intersection(_REQUIRED + _TEXT_START)
    for need in _REQUIRED:
        if need not in present:
            raise SymbolError(f"{what} has no {need} symbol: {why}", hint)
    if not present.intersection(_TEXT_START):
        raise SymbolError(f"{what} has no _text/_stext symbol: {why}", hint)


def _is_identity(order: np.ndarray) -> bool:
    return bool((order == np.arange(len(order))).all())


def _show(line: bytes) -> str:
    text = line[:60].decode("ascii", "replace")
    return repr(text + ("..." if len(line) > 60 else ""))


def _first_bad_line(data: bytes) -> str:
    """'line N: <text>' for the first line that is not `<hex> <type> <name>`."""
    width = None
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        m = _SYSTEM_MAP_LINE.fullmatch(line + b"\n")
        if m is None:
            return f"line {n} is not '<address> <type> <name>': {_show(line)}"
        if width is None:
            width = len(m.group(1))
        elif len(m.group(1)) != width:
            return f"line {n} has a {len(m.group(1))}-digit address, earlier lines {width}"
    return "unrecognised content"
