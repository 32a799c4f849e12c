"""What differs between guest architectures, behind one small interface.

Each supported architecture is one `Arch` instance in its own module; code
elsewhere asks `get_arch(name)` and uses its fields instead of testing names.
"""

from dataclasses import dataclass, field

from ..errors import QemuleakError


@dataclass(frozen=True)
class Arch:
    """Facts about one guest architecture."""

    name: str                 # our name: "x86_64", "arm64"
    debian_arch: str          # Debian's name, for packages: "amd64", "arm64"
    qemu_binary: str          # "qemu-system-x86_64"
    machine_args: tuple[str, ...]   # -M arguments
    default_cpu: str          # -cpu model under TCG
    console: str              # kernel console device: "ttyS0"
    ram_base: int             # guest-physical address where RAM starts
    kbuild_args: tuple[str, ...] = field(default=())  # extra make args for modules


def get_arch(name: str) -> Arch:
    """The Arch called `name` (aliases: amd64, x86-64, aarch64)."""
    from . import arm64, x86_64

    known = {a.name: a for a in (x86_64.ARCH, arm64.ARCH)}
    aliases = {"amd64": "x86_64", "x86-64": "x86_64", "aarch64": "arm64"}
    arch = known.get(aliases.get(name, name))
    if arch is None:
        raise QemuleakError(f"unknown architecture {name!r}",
                            f"use one of: {', '.join(sorted(known))}")
    return arch


def all_arches() -> list[Arch]:
    from . import arm64, x86_64
    return [x86_64.ARCH, arm64.ARCH]
