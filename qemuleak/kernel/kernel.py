"""The running kernel: a Guest plus symbols (KASLR applied), types and vmcoreinfo.

`Kernel.open(guest, vmlinux=..., system_map=...)` takes what it is given:
- a vmlinux: ELF symbols, DWARF types (drgn), banner check against the file;
- a System.map: its symbols, types from the kernel's own BTF in guest memory;
- neither: symbols decoded from the kernel's kallsyms tables in guest memory,
  types from its BTF, the slide from vmcoreinfo.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GuestMemoryError, KernelTypeError, QemuleakError, SymbolError
from . import kaslr, vmcoreinfo
from .symbols import SymbolTable
from .types import BtfTypes, DwarfTypes, KernelTypes


@dataclass
class Kernel:
    guest: object
    symbols: SymbolTable          # relocated: runtime addresses
    slide: int
    slide_method: str
    symbol_source: str            # "vmlinux", "System.map", "kallsyms"
    info: vmcoreinfo.VmcoreInfo | None
    banner: str
    _types: KernelTypes | None = None
    _types_source: str = ""
    vmlinux: Path | None = None

    @classmethod
    def open(cls, guest, vmlinux: str | Path | None = None,
             system_map: str | Path | None = None) -> "Kernel":
        """Identify the kernel the (stopped) guest runs and load what describes it."""
        info = None
        if guest.mem.name != "gdbstub" or (vmlinux is None and system_map is None):
            try:
                info = vmcoreinfo.find_in_ram(guest.read_phys, guest.ranges)[1]
            except GuestMemoryError:
                info = None
        expected = None
        if vmlinux is not None:
            table, source = _load(SymbolTable.from_vmlinux, vmlinux, "vmlinux"), "vmlinux"
            expected = kaslr.vmlinux_banner(Path(vmlinux), table)
        elif system_map is not None:
            table, source = _load(SymbolTable.from_system_map, system_map, "System.map"), "System.map"
        else:
            table, source = None, "kallsyms"
        slide = kaslr.find_slide(guest, table, info)
        if table is None:
            table = _kallsyms_table(guest, info)
        else:
            table = table.relocated(slide.offset)
        banner = kaslr.check_banner(guest, table, expected)
        return cls(guest, table, slide.offset, slide.method, source, info,
                   banner.decode("utf-8", "replace").strip(),
                   vmlinux=Path(vmlinux) if vmlinux else None)

    # -- symbols and memory -------------------------------------------------
    def sym(self, name: str) -> int:
        return self.symbols.address_of(name)

    def read(self, va: int, size: int) -> bytes:
        return self.guest.read(va, size)

    def read_u64(self, va: int) -> int:
        return self.guest.read_u64(va)

    def read_u32(self, va: int) -> int:
        return int.from_bytes(self.guest.read(va, 4), "little")

    def percpu_offset(self, cpu: int) -> int:
        """__per_cpu_offset[cpu]: add it to a per-CPU variable's address."""
        return self.read_u64(self.sym("__per_cpu_offset") + 8 * cpu)

    def percpu(self, name: str, cpu: int) -> int:
        """Address of per-CPU variable `name` on `cpu`."""
        return (self.sym(name) + self.percpu_offset(cpu)) & (2**64 - 1)

    # -- types ----------------------------------------------------------------
    @property
    def types(self) -> KernelTypes:
        if self._types is None:
            if self.vmlinux is not None:
                self._types, self._types_source = DwarfTypes(self.vmlinux), "DWARF (vmlinux)"
            else:
                start, stop = self.symbols.get("__start_BTF"), self.symbols.get("__stop_BTF")
                if start is None or stop is None or stop <= start:
                    raise KernelTypeError("the kernel has no BTF and no vmlinux was given",
                                          "pass --vmlinux, or build with CONFIG_DEBUG_INFO_BTF")
                self._types = BtfTypes(self.read(start, stop - start))
                self._types_source = "BTF (guest memory)"
        return self._types

    @property
    def types_source(self) -> str:
        self.types
        return self._types_source


def _load(loader, path, what: str) -> SymbolTable:
    if not Path(path).is_file():
        raise SymbolError(f"{what} not found: {path}")
    return loader(path)


def _kallsyms_table(guest, info: vmcoreinfo.VmcoreInfo | None) -> SymbolTable:
    """Symbols decoded from the kernel's own kallsyms tables in guest memory,
    searched for from the start of its text (which vmcoreinfo names)."""
    from . import kallsyms
    stext = info.symbol("_stext") if info is not None else None
    if stext is None:
        raise SymbolError("no symbols: no vmlinux, no System.map, and no vmcoreinfo to "
                          "find the kernel's own symbol table with",
                          "pass --vmlinux or --system-map")
    return SymbolTable.from_kallsyms(kallsyms.find_kallsyms(guest.read, (stext, kallsyms.DEFAULT_SPAN)))
