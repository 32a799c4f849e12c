"""Find the KASLR slide of a running kernel, and check that our symbols belong to it.

Ways, most direct first:
- vmcoreinfo's KERNELOFFSET, when guest RAM is fast to search (no symbols needed);
- arm64: VBAR_EL1 holds the runtime address of `vectors`;
- x86_64: the IDT's first gate holds the runtime address of `asm_exc_divide_error`;
- any vCPU in kernel mode: its PC lies in the kernel text, so only a few 2 MiB
  aligned slides are possible; the one where `linux_banner` reads "Linux version"
  is it.
Every answer is checked against `linux_banner` when symbols are there.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import QemuleakError, SymbolError
from .symbols import SymbolTable
from .vmcoreinfo import VmcoreInfo

ALIGN = 2 << 20          # both arches randomize the kernel image in 2 MiB steps
BANNER = b"Linux version "


@dataclass(frozen=True)
class Slide:
    offset: int
    method: str


def banner_at(guest, address: int) -> bytes | None:
    """The banner text at `address` if it reads like one, else None."""
    try:
        data = guest.read(address, 256)
    except QemuleakError:
        return None
    return data.split(b"\0", 1)[0] if data.startswith(BANNER) else None


def vmlinux_banner(vmlinux: Path, symbols: SymbolTable) -> bytes | None:
    """`linux_banner` as the vmlinux file has it (None if unreadable)."""
    from elftools.elf.elffile import ELFFile
    address = symbols.get("linux_banner")
    if address is None:
        return None
    address -= symbols.slide
    with open(vmlinux, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= address < seg["p_vaddr"] + seg["p_filesz"]:
                f.seek(seg["p_offset"] + address - seg["p_vaddr"])
                return f.read(512).split(b"\0", 1)[0]
    return None


def _candidates(guest, symbols: SymbolTable) -> list[tuple[int, str]]:
    """Slides suggested by registers, best first."""
    out: list[tuple[int, str]] = []
    regs0 = guest.registers(0)
    if "VBAR_EL1" in regs0 and symbols.get("vectors") is not None:
        out.append((regs0["VBAR_EL1"] - symbols.address_of("vectors"), "VBAR_EL1"))
    handler = _idt_divide_error(guest)
    if handler is not None and symbols.get("asm_exc_divide_error") is not None:
        out.append((handler - symbols.address_of("asm_exc_divide_error"), "IDT"))
    stext, etext = symbols.get("_stext"), symbols.get("_etext")
    if stext is not None and etext is not None:
        for cpu in range(len(guest.cpus())):
            regs = guest.registers(cpu)
            if not guest.arch.in_kernel(regs):
                continue
            pc = regs[guest.arch.pc_reg]
            low = (pc - etext + ALIGN - 1) // ALIGN * ALIGN
            for slide in range(low, pc - stext + 1, ALIGN):
                out.append((slide, f"pc of vCPU {cpu}"))
    return out


def _idt_divide_error(guest) -> int | None:
    """Handler address of IDT vector 0 (x86_64 only)."""
    if "cr3" not in guest.registers(0):
        return None
    m = re.search(r"IDT=\s*([0-9a-f]+)", guest.rsp.monitor("info registers"))
    if not m:
        return None
    try:
        gate = guest.read(int(m.group(1), 16), 16)
    except QemuleakError:
        return None
    lo, mid, hi = (int.from_bytes(gate[0:2], "little"), int.from_bytes(gate[6:8], "little"),
                   int.from_bytes(gate[8:12], "little"))
    return lo | mid << 16 | hi << 32


def find_slide(guest, symbols: SymbolTable | None, info: VmcoreInfo | None = None) -> Slide:
    """The KASLR slide; SymbolError if the symbols do not fit this kernel."""
    if symbols is None:
        if info is None or info.kernel_offset is None:
            raise SymbolError("cannot find the KASLR offset without symbols or vmcoreinfo",
                              "pass --vmlinux or --system-map")
        return Slide(info.kernel_offset, "vmcoreinfo")
    banner = symbols.get("linux_banner")
    if banner is None:
        raise SymbolError("the symbol table has no linux_banner", "is it a kernel's System.map?")

    def tried():
        # vmcoreinfo's offset first: the others cost gdbstub round trips
        if info is not None and info.kernel_offset is not None:
            yield info.kernel_offset, "vmcoreinfo"
        yield from _candidates(guest, symbols)
    seen = set()
    for slide, method in tried():
        if slide in seen:
            continue
        seen.add(slide)
        if banner_at(guest, banner + slide) is not None:
            return Slide(slide, method)
    raise SymbolError("the symbols do not match the guest kernel: linux_banner is not "
                      "where they say at any possible KASLR offset",
                      "pass the vmlinux or System.map of the kernel the guest runs")


def check_banner(guest, symbols: SymbolTable, expected: bytes | None) -> bytes:
    """The guest's banner; SymbolError if it differs from the vmlinux's own."""
    found = banner_at(guest, symbols.address_of("linux_banner"))
    if found is None:
        raise SymbolError("linux_banner does not hold the kernel banner at the relocated address")
    if expected is not None and found.strip() != expected.strip():
        raise SymbolError(f"the vmlinux is from another kernel: the guest runs "
                          f"{found.decode(errors='replace').strip()!r}, the vmlinux is "
                          f"{expected.decode(errors='replace').strip()!r}",
                          "pass the vmlinux of the kernel the guest runs")
    return found
