"""vmcoreinfo: the kernel's own notes for crash tools, kept as text in its memory.

It names the release, the build id, the KASLR offset (KERNELOFFSET) and the
addresses of key symbols, so it identifies a kernel and its slide with no vmlinux.
The text lives in a page the kernel allocated at boot; without symbols we find it
by searching guest RAM for its first line.
"""

import re
from dataclasses import dataclass, field

from ..errors import GuestMemoryError

_START = b"OSRELEASE="


@dataclass
class VmcoreInfo:
    """Parsed vmcoreinfo: plain KEY=VALUE, SYMBOL(x)=hex, NUMBER(x)=int, ..."""

    text: str
    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "VmcoreInfo":
        info = cls(text)
        for line in text.splitlines():
            key, eq, value = line.partition("=")
            if eq:
                info.values[key] = value
        return info

    @property
    def release(self) -> str:
        return self.values.get("OSRELEASE", "")

    @property
    def build_id(self) -> str:
        return self.values.get("BUILD-ID", "")

    @property
    def kernel_offset(self) -> int | None:
        value = self.values.get("KERNELOFFSET")
        return int(value, 16) if value is not None else None

    def symbol(self, name: str) -> int | None:
        value = self.values.get(f"SYMBOL({name})")
        return int(value, 16) if value is not None else None

    def number(self, name: str) -> int | None:
        value = self.values.get(f"NUMBER({name})")
        if value is None:
            return None
        return int(value, 0) if not value.lstrip("-").isdigit() else int(value)


def parse_at(data: bytes) -> VmcoreInfo | None:
    """vmcoreinfo if `data` starts with it (NUL-terminated text), else None."""
    if not data.startswith(_START):
        return None
    text = data.split(b"\0", 1)[0]
    if b"\nPAGESIZE=" not in text or b"\nSYMBOL(" not in text:
        return None
    try:
        return VmcoreInfo.parse(text.decode("ascii"))
    except UnicodeDecodeError:
        return None


def find_in_ram(read_phys, ranges, chunk: int = 16 << 20) -> tuple[int, VmcoreInfo]:
    """(guest-physical address, vmcoreinfo) found by searching RAM page starts.

    The text starts a page of its own (get_zeroed_page), so only page-aligned hits
    count; chunks overlap by one page so none is missed at a boundary.
    """
    for r in ranges:
        pos = r.gpa
        while pos < r.end:
            n = min(chunk + 4096, r.end - pos)
            data = read_phys(pos, n)
            for m in re.finditer(re.escape(_START), data):
                if (pos + m.start()) % 4096 == 0:
                    info = parse_at(data[m.start():m.start() + 4096])
                    if info is not None:
                        return pos + m.start(), info
            pos += chunk
    raise GuestMemoryError("found no vmcoreinfo in guest RAM",
                           "pass --vmlinux or --system-map for this kernel")
