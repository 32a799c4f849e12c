"""What a kernel module file (.ko) and a kernel image were built for, read before
anything boots: a module for another arch or another kernel release would only
fail inside the guest, as a failing insmod."""

import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import QemuleakError

# ELF e_machine -> our arch names
_MACHINES = {"EM_X86_64": "x86_64", "EM_AARCH64": "arm64"}
_BANNER = re.compile(rb"Linux version (\S+) \(")


@dataclass(frozen=True)
class ModuleInfo:
    path: Path
    arch: str | None          # None: an ELF machine we do not know
    release: str | None       # the first word of vermagic, None when it has none


def module_info(path: Path) -> ModuleInfo:
    """The arch and kernel release (from `.modinfo`'s vermagic) of a .ko file."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            arch = _MACHINES.get(elf["e_machine"])
            section = elf.get_section_by_name(".modinfo")
            info = section.data() if section is not None else b""
    except (ELFError, OSError) as e:
        raise QemuleakError(f"{path} is not a kernel module ({e})",
                            "give a .ko file built for the guest kernel") from None
    m = re.search(rb"(?:^|\0)vermagic=(\S+)", info)
    return ModuleInfo(Path(path), arch, m.group(1).decode("ascii", "replace") if m else None)


def kernel_release(image: Path) -> str | None:
    """The release a kernel image says it is ("6.1.0-57-cloud-amd64"): an x86
    bzImage's setup header points at it; otherwise the "Linux version" banner of
    the image (gzip'd or not). None when neither is found."""
    data = Path(image).read_bytes()
    if len(data) > 0x210 and data[0x202:0x206] == b"HdrS":       # x86 boot protocol
        at = struct.unpack_from("<H", data, 0x20E)[0] + 0x200
        release = data[at:at + 128].split(b" ", 1)[0].split(b"\0", 1)[0]
        return release.decode("ascii", "replace") or None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    m = _BANNER.search(data)
    return m.group(1).decode("ascii", "replace") if m else None


def check_modules(modules, arch: str, kernel: Path) -> None:
    """Raise a one-line error for the first module built for another arch or
    another kernel release than `kernel` (an `arch` guest)."""
    release = kernel_release(kernel)
    for path in modules:
        m = module_info(Path(path))
        if m.arch is not None and m.arch != arch:
            raise QemuleakError(
                f"module {m.path.name} is for {m.arch} ({m.release or 'unknown kernel'}); the "
                f"guest is {arch} ({release or 'unknown kernel'})",
                f"build it against the guest kernel's headers, or pass --arch {m.arch}")
        if release is not None and m.release is not None and m.release != release:
            raise QemuleakError(
                f"module {m.path.name} is for kernel {m.release} ({m.arch}); the guest "
                f"runs {release} ({arch})",
                "build it against the guest kernel's headers (make -C /lib/modules/"
                f"{release}/build M=$PWD, or that kernel's linux-headers package)")
