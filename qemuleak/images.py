"""Where the guest images built by `images/build.py` live, and how to find them.

Layout: ${QEMULEAK_CACHE:-~/.cache/qemuleak}/images/<arch>/<kernel-release>/ holds
the kernel, the debug vmlinux, System.map, config, busybox, the base initramfs, the
test modules, and a disk-root guest (a busybox rootfs.ext2 and the loader initrd that
loads the kernel's virtio_blk module and switch_roots into it), described by
manifest.json; images/<arch>/current names the release built last, which is the
default guest for that arch.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .arch import get_arch
from .errors import ImageError

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """The cache directory: $QEMULEAK_CACHE, else ~/.cache/qemuleak."""
    env = os.environ.get("QEMULEAK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qemuleak"


def arch_dir(arch: str) -> Path:
    return cache_root() / "images" / get_arch(arch).name


@dataclass(frozen=True)
class GuestImage:
    """One built guest: every path is absolute and exists."""

    arch: str
    release: str          # e.g. 6.1.0-56-cloud-amd64
    version: str          # Debian package version, e.g. 6.1.192-2
    kernel: Path
    vmlinux: Path
    system_map: Path
    config: Path
    busybox: Path
    base_initramfs: Path  # gzip'd newc cpio: busybox and /init
    modules: dict[str, Path]
    rootfs: Path | None = None         # busybox ext2 root file system for --drive (root=/dev/vda)
    loader_initrd: Path | None = None  # initrd: insmod virtio_blk (+ deps), switch_root to /dev/vda

    def module(self, name: str) -> Path:
        try:
            return self.modules[name]
        except KeyError:
            raise ImageError(f"no module {name!r} in the {self.arch} image",
                             "run `make images`") from None


def write_manifest(directory: Path, image: GuestImage) -> None:
    data = {k: str(v) for k, v in image.__dict__.items() if k != "modules" and v is not None}
    data["modules"] = {k: str(v) for k, v in image.modules.items()}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def find_image(arch: str = "x86_64") -> GuestImage:
    """The default guest image for `arch`, or ImageError saying how to build it."""
    name = get_arch(arch).name
    current = arch_dir(name) / "current"
    hint = "run `make images` (or `python images/build.py --arch %s`)" % name
    try:
        release = current.read_text().strip()
        data = json.loads((arch_dir(name) / release / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ImageError(f"no {name} guest image in {arch_dir(name)}", hint) from None
    modules = {k: Path(v) for k, v in data.pop("modules").items()}
    image = GuestImage(modules=modules, **{k: (Path(v) if k not in ("arch", "release", "version") else v)
                                          for k, v in data.items()})
    for path in [image.kernel, image.vmlinux, image.system_map, image.base_initramfs,
                 *modules.values(), image.rootfs, image.loader_initrd]:
        if path is not None and not path.is_file():
            raise ImageError(f"{name} guest image is incomplete: {path} is missing", hint)
    return image
