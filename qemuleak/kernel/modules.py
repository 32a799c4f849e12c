"""Loaded modules: names, where their code and data live, and their symbols."""

from dataclasses import dataclass

import numpy as np

from ..errors import QemuleakError
from .lists import list_nodes
from .symbols import SymbolTable

ELF64_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                      ("value", "<u8"), ("size", "<u8")])


@dataclass(frozen=True)
class Module:
    name: str
    address: int                          # the struct module
    regions: tuple[tuple[int, int], ...]  # (start, size) of its core memory
    percpu: int                           # its per-CPU area (0 if none)
    percpu_size: int
    text: tuple[tuple[int, int], ...] = ()  # (start, size) of its code, init code too while loading


def _text(kernel, mod: int) -> tuple[tuple[int, int], ...]:
    """Code of a module, core and (until init is done) init: `mem[MOD_TEXT]` and
    `mem[MOD_INIT_TEXT]` (6.4+), else the layouts' base and text_size."""
    t = kernel.types
    out = []
    if t.has_member("struct module", "mem"):
        base = t.offsetof("struct module", "mem")
        size = t.sizeof("struct module_memory")
        b_off, s_off = (t.offsetof("struct module_memory", f) for f in ("base", "size"))
        for index in (0, 4):                      # MOD_TEXT, MOD_INIT_TEXT
            m = mod + base + index * size
            out.append((kernel.read_u64(m + b_off), kernel.read_u32(m + s_off)))
    else:
        b_off = t.offsetof("struct module_layout", "base")
        s_off = t.offsetof("struct module_layout", "text_size")
        for layout in ("core_layout", "init_layout"):
            at = mod + t.offsetof("struct module", layout)
            out.append((kernel.read_u64(at + b_off), kernel.read_u32(at + s_off)))
    return tuple((start, n) for start, n in out if start and n)


def _regions(kernel, mod: int) -> tuple[tuple[int, int], ...]:
    """Core memory of a module: `mem[]` (6.4+) or core_layout (earlier)."""
    t = kernel.types
    if t.has_member("struct module", "mem"):
        base = t.offsetof("struct module", "mem")
        size = t.sizeof("struct module_memory")
        n = t.member_size("struct module", "mem") // size
        b_off, s_off = (t.offsetof("struct module_memory", f) for f in ("base", "size"))
        out = []
        for i in range(n):
            m = mod + base + i * size
            start, length = kernel.read_u64(m + b_off), kernel.read_u32(m + s_off)
            if start and length:
                out.append((start, length))
        return tuple(out)
    core = t.offsetof("struct module", "core_layout")
    start = kernel.read_u64(mod + core + t.offsetof("struct module_layout", "base"))
    length = kernel.read_u32(mod + core + t.offsetof("struct module_layout", "size"))
    return ((start, length),) if start else ()


def for_each_module(kernel, limit: int = 4096) -> list[Module]:
    """Every module on the kernel's `modules` list, in list order."""
    t = kernel.types
    list_off = t.offsetof("struct module", "list")
    name_off = t.offsetof("struct module", "name")
    name_len = t.member_size("struct module", "name")
    pcpu_off = t.offsetof("struct module", "percpu")
    pcpu_size_off = t.offsetof("struct module", "percpu_size")
    head = modules_head(kernel)
    out = []
    if head is None:
        return out
    for node in list_nodes(kernel, head, limit):
        mod = node - list_off
        name = kernel.read(mod + name_off, name_len).split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append(Module(name, mod, _regions(kernel, mod), kernel.read_u64(mod + pcpu_off),
                          kernel.read_u32(mod + pcpu_size_off), _text(kernel, mod)))
    return out


def modules_head(kernel) -> int | None:
    """Address of the kernel's `modules` list head; found in memory when the symbol
    is unknown (kallsyms without KALLSYMS_ALL). None: no module is loaded."""
    head = kernel.symbols.get("modules")
    return head if head is not None else _search_modules_head(kernel)


def _search_modules_head(kernel) -> int | None:
    """Find a struct module by its self-reference (mkobj.mod points back at it), then
    walk its list to the node that is not a module: the head."""
    t = kernel.types
    self_off = t.offsetof("struct module", "mkobj.mod")
    list_off = t.offsetof("struct module", "list")
    info = kernel.info
    numbers = {k[7:-1]: int(v, 0) for k, v in (info.values.items() if info else ())
               if k.startswith("NUMBER(") and v.startswith("0x")}
    stext = kernel.symbols.get("_stext") or (info.symbol("_stext") if info else None)
    for lo, hi in kernel.guest.arch.module_windows(stext or 0, numbers):
        for m in kernel.guest.ram_mappings(lo, hi):
            words = np.frombuffer(kernel.guest.mem.read(m.pa, m.size), "<u8")
            where = m.va + 8 * np.arange(len(words), dtype=np.uint64)
            for i in np.flatnonzero(words == where - np.uint64(self_off)).tolist():
                mod = m.va + 8 * i - self_off
                if _name_ok(kernel, mod) and _linked(kernel, mod + list_off):
                    return _walk_to_head(kernel, mod + list_off, list_off, self_off)
    return None


def _name_ok(kernel, mod: int) -> bool:
    t = kernel.types
    raw = kernel.read(mod + t.offsetof("struct module", "name"), t.member_size("struct module", "name"))
    name = raw.split(b"\0", 1)[0]
    return bool(name) and all(c == 0x5F or c == 0x2D or 0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A
                              or 0x61 <= c <= 0x7A for c in name)


def _linked(kernel, node: int) -> bool:
    """Is `node` a list_head on a consistent doubly linked list?"""
    try:
        nxt, prev = kernel.read_u64(node), kernel.read_u64(node + 8)
        return kernel.read_u64(nxt + 8) == node and kernel.read_u64(prev) == node
    except QemuleakError:
        return False


def _walk_to_head(kernel, node: int, list_off: int, self_off: int, limit: int = 4096) -> int | None:
    for _ in range(limit):
        node = kernel.read_u64(node)
        try:
            is_module = kernel.read_u64(node - list_off + self_off) == node - list_off
        except QemuleakError:
            is_module = False
        if not is_module:
            return node
    return None


def module_symbols(kernel, module: Module) -> SymbolTable:
    """The module's symbols, from the kallsyms the kernel keeps for it (its init
    functions' only while it loads: read them then, see `Symbolizer`)."""
    t = kernel.types
    ks = kernel.read_u64(module.address + t.offsetof("struct module", "kallsyms"))
    symtab = kernel.read_u64(ks + t.offsetof("struct mod_kallsyms", "symtab"))
    count = kernel.read_u32(ks + t.offsetof("struct mod_kallsyms", "num_symtab"))
    strtab = kernel.read_u64(ks + t.offsetof("struct mod_kallsyms", "strtab"))
    syms = np.frombuffer(kernel.read(symtab, count * ELF64_SYM.itemsize), ELF64_SYM)
    keep = (syms["value"] != 0) & (syms["name"] != 0) & (syms["shndx"] != 0)
    syms = syms[keep]
    strings = _read_mapped(kernel, strtab, int(syms["name"].max(initial=0)) + 256) \
        if len(syms) else b""
    names = [strings[o:strings.index(b"\0", o)].decode("utf-8", "replace")
             for o in syms["name"].tolist()]
    # Sizes as the kernel's %pS gives them: up to the next symbol, or to the end of
    # the code (core or init) that holds the symbol.
    return SymbolTable.from_arrays(syms["value"], None, names, module=module.name,
                                   ranges=module.text)


def _read_mapped(kernel, va: int, size: int) -> bytes:
    """Up to `size` bytes at `va`, stopping at the first page that is not mapped
    (a module's string table may end right before a hole in the module area)."""
    parts = []
    while size > 0:
        n = min(size, 4096 - (va & 4095))
        try:
            parts.append(kernel.read(va, n))
        except QemuleakError:
            break
        va, size = va + n, size - n
    return b"".join(parts)


class Symbolizer:
    """Names for kernel and module addresses, remembering every module seen: a
    module's init symbols are gone once its init has run, and an unloaded module's
    code may still sit in backtraces recorded earlier. Call `refresh` with the
    guest stopped, e.g. when a module loads."""

    def __init__(self, kernel, modules: list[Module] | None = None, debug_files=()):
        """`debug_files`: .ko files with DWARF for modules the guest loads (source
        lines for their frames; the kernel's come from the vmlinux, if given)."""
        self.kernel = kernel
        self.debug_files = list(debug_files)
        self._tables: dict[tuple[str, int], SymbolTable] = {}
        self._merged: SymbolTable | None = None
        self._program = None                      # drgn, made on first use
        self._sources: dict[int, str | None] = {}
        self.refresh(modules)

    def refresh(self, modules: list[Module] | None = None) -> None:
        """Learn the modules loaded now (`modules`, if the caller has just read them)."""
        for m in for_each_module(self.kernel) if modules is None else modules:
            key = (m.name, m.regions[0][0] if m.regions else 0)
            if key not in self._tables:           # the first read has the init symbols
                self._tables[key] = module_symbols(self.kernel, m)
                self._merged = None
                self._program = None              # drgn learns modules when made

    def source(self, pc: int, return_address: bool = True) -> str | None:
        """"file:line" of the code at `pc` (for a return address, of the call just
        before it) in the function the symbol names (not in what was inlined into
        it), from DWARF: needs the kernel opened with its vmlinux. None when unknown."""
        key = pc - 1 if return_address else pc
        if key in self._sources:
            return self._sources[key]
        if self.kernel.vmlinux is None:
            return None
        import drgn
        try:
            if self._program is None:
                self._program = self.kernel.drgn_program(self.debug_files)
            loc = self._program.source_location(key)[-1]    # the frame's own function
            text = f"{loc.filename}:{loc.line}" if loc.filename and loc.line else None
        except (LookupError, ValueError, drgn.FaultError):
            text = None
        self._sources[key] = text
        return text

    @property
    def table(self) -> SymbolTable:
        if self._merged is None:
            self._merged = SymbolTable.merge([self.kernel.symbols, *self._tables.values()])
        return self._merged

    def format(self, address: int) -> str:
        return self.table.format(address)
