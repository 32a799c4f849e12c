"""The running kernel: a Guest plus symbols (KASLR applied), types and vmcoreinfo.

`Kernel.open(guest, vmlinux=..., system_map=...)` takes what it is given:
- a vmlinux: ELF symbols, DWARF types (drgn), banner check against the file;
- a System.map: its symbols, types from the kernel's own BTF in guest memory;
- neither: symbols decoded from the kernel's kallsyms tables in guest memory,
  types from its BTF, the slide from vmcoreinfo.
"""

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GuestMemoryError, KernelTypeError, SymbolError
from . import kaslr, vmcoreinfo
from .symbols import SymbolTable
from .btf import find_btf
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
    _image: list = field(default_factory=list)      # (va, bytes) of the kernel image, if read

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
        image: list[tuple[int, bytes]] = []
        if table is None:
            image = _kernel_image(guest, info)
            table = _kallsyms_table(guest, image)
        else:
            table = table.relocated(slide.offset)
        if table.get("linux_banner") is not None:
            banner = kaslr.check_banner(guest, table, expected)
        else:               # kallsyms without KALLSYMS_ALL: text symbols only
            banner = _search_banner(guest, image, info)
        kernel = cls(guest, table, slide.offset, slide.method, source, info,
                     banner.decode("utf-8", "replace").strip(),
                     vmlinux=Path(vmlinux) if vmlinux else None)
        kernel._image = image
        root = table.get("init_top_pgt") or table.get("swapper_pg_dir") or \
            (info.symbol("init_top_pgt") or info.symbol("swapper_pg_dir") if info else None)
        if root is not None:
            guest.pin_kernel_root(root)
        return kernel

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
        table = self.symbols.get("__per_cpu_offset")
        if table is not None:
            return self.read_u64(table + 8 * cpu)
        base = self.guest.arch.percpu_base(self.guest.registers(cpu))
        if base is None:
            raise SymbolError("cannot find the per-CPU areas: no __per_cpu_offset symbol")
        return base

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
                self._types = BtfTypes(self._btf_blob())
                self._types_source = "BTF (guest memory)"
        return self._types

    def _btf_blob(self) -> bytes:
        """The kernel's BTF: between __start_BTF and __stop_BTF, or found by its
        header in the kernel image when those symbols are unknown."""
        start, stop = self.symbols.get("__start_BTF"), self.symbols.get("__stop_BTF")
        if start is not None and stop is not None and stop > start:
            return self.read(start, stop - start)
        for _, data in self._image or _kernel_image(self.guest, self.info):
            try:
                off, length = find_btf(data)
            except KernelTypeError:
                continue
            return data[off:off + length]
        raise KernelTypeError("the kernel has no BTF and no vmlinux was given",
                              "pass --vmlinux, or build with CONFIG_DEBUG_INFO_BTF")

    def vmcoreinfo(self) -> vmcoreinfo.VmcoreInfo:
        """vmcoreinfo: through the `vmcoreinfo_data` pointer, else found in RAM."""
        if self.info is None:
            ptr = self.symbols.get("vmcoreinfo_data")
            if ptr is not None:
                self.info = vmcoreinfo.parse_at(self.read(self.read_u64(ptr), 4096))
            if self.info is None:
                self.info = vmcoreinfo.find_in_ram(self.guest.read_phys, self.guest.ranges)[1]
        return self.info

    def drgn_program(self, modules: list[Path] = ()):
        """A drgn Program over our own memory transport: DWARF types, KASLR-aware
        symbols, stack traces with file:line. Needs the vmlinux; `modules` are .ko
        files with debug info for loaded modules."""
        import drgn
        if self.vmlinux is None:
            raise KernelTypeError("drgn needs the vmlinux", "pass --vmlinux")
        arch = {"x86_64": drgn.Architecture.X86_64, "arm64": drgn.Architecture.AARCH64}
        flags = drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN
        prog = drgn.Program(drgn.Platform(arch[self.guest.arch.name], flags))
        mem = self.guest.mem
        for r in self.guest.ranges:
            prog.add_memory_segment(r.gpa, r.size,
                                    lambda address, count, offset, physical: mem.read(address, count),
                                    physical=True)
        prog.set_linux_kernel_custom(self.vmcoreinfo().text.encode(), True)
        prog.load_debug_info([str(self.vmlinux), *map(str, modules)])
        return prog

    @property
    def types_source(self) -> str:
        self.types
        return self._types_source


def _load(loader, path, what: str) -> SymbolTable:
    if not Path(path).is_file():
        raise SymbolError(f"{what} not found: {path}")
    return loader(path)


IMAGE_SPAN = 64 << 20     # how much of the kernel image to read from _stext on


def _kernel_image(guest, info: vmcoreinfo.VmcoreInfo | None) -> list[tuple[int, bytes]]:
    """The mapped pieces of the kernel image, from _stext (which vmcoreinfo names)."""
    stext = info.symbol("_stext") if info is not None else None
    if stext is None:
        raise SymbolError("no symbols: no vmlinux, no System.map, and no vmcoreinfo to "
                          "find the kernel image with", "pass --vmlinux or --system-map")
    maps = guest.ram_mappings(stext, stext + IMAGE_SPAN)
    return [(m.va, guest.mem.read(m.pa, m.size)) for m in maps]


def _kallsyms_table(guest, image: list[tuple[int, bytes]]) -> SymbolTable:
    """Symbols decoded from the kernel's own kallsyms tables in its image."""
    from . import kallsyms

    def read(va: int, size: int) -> bytes:
        for start, data in image:
            if start <= va and va + size <= start + len(data):
                return data[va - start:va - start + size]
        return guest.read(va, size)
    return SymbolTable.from_kallsyms(
        kallsyms.find_kallsyms(read, [(va, len(data)) for va, data in image]))


def _search_banner(guest, image: list[tuple[int, bytes]],
                   info: vmcoreinfo.VmcoreInfo | None) -> bytes:
    """linux_banner found by its text: "Linux version <release> ... <uts version>".

    The image may hold other strings that start the same way; the banner is the
    one that ends with init_uts_ns's version, as the kernel builds it."""
    if info is None or not info.release:
        raise SymbolError("cannot find the kernel banner: linux_banner is not among the symbols",
                          "pass --vmlinux or --system-map")
    version = b""
    uts = info.symbol("init_uts_ns")
    if uts is not None:
        name = uts + int(info.values.get("OFFSET(uts_namespace.name)", "0"))
        version = guest.read(name + 3 * 65, 65).split(b"\0", 1)[0]    # new_utsname.version
    needle = f"Linux version {info.release} ".encode()
    found = []
    for _, data in image:
        at = data.find(needle)
        while at >= 0:
            found.append(data[at:data.find(b"\0", at)])
            at = data.find(needle, at + 1)
    for banner in found:
        if version and banner.rstrip().endswith(version):
            return banner
    if found:
        return found[0]
    raise SymbolError("cannot find the kernel banner in the kernel image",
                      "pass --vmlinux or --system-map")
