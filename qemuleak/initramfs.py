"""Compose initramfs images: a cached busybox base plus per-run extra files.

The kernel accepts several cpio archives concatenated, each compressed on its own,
so a guest's initramfs is the base archive (built once, cached) followed by a small
archive of extras (modules at /modules/NAME.ko, scripts). Only the extras are
compressed on each run. Archives are written in the newc format directly, so no
root rights are needed for device nodes.

A guest whose root is a disk gets the same extras another way: `write_tar_disk`
puts them in a tar archive that QEMU attaches as a raw read-only disk, and the
guest unpacks it with `tar -xf /dev/vdb -C /`. `build_loader` makes the initrd that
such a guest needs when its kernel has the disk driver as a module.
"""

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

# The guest's /init. It prints READY_MARKER once the shell is about to start, runs
# /etc/qemuleak/rc.d/* first (extras can add them), and gives the console a shell.
READY_MARKER = "qemuleak-guest: ready"

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname qemuleak-guest
for f in /etc/qemuleak/rc.d/*; do [ -x "$f" ] && "$f"; done
echo "%s $(uname -r) $(nproc) cpus"
exec setsid cttyhack sh -l
""" % READY_MARKER

PROFILE = "PS1='guest# '\nexport PATH=/bin:/sbin:/usr/bin:/usr/sbin\n"

# The directories of a guest root (the base initramfs, the test rootfs.ext2).
ROOT_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root",
             "etc/qemuleak/rc.d", "modules", "run", "mnt")

# The loader initrd's /init: load the drivers the kernel has as modules (in order,
# dependencies first), mount root= (default /dev/vda) and switch_root into its
# /sbin/init, as a distro initramfs does. Any failure ends init: the kernel panics
# with this console output just above.
LOADER_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
fail() { echo "qemuleak-loader: $*"; exit 1; }
for m in %s; do insmod "/lib/qemuleak/$m.ko" || fail "insmod $m failed"; done
root=/dev/vda mode=rw
for a in $(cat /proc/cmdline); do
    case "$a" in root=*) root="${a#root=}" ;; ro|rw) mode="$a" ;; esac
done
n=0
while [ ! -b "$root" ]; do
    n=$((n + 1)); [ $n -le 30 ] || fail "no $root"; sleep 1
done
mount -o "$mode" "$root" /newroot || fail "cannot mount $root"
umount /proc; umount /dev
exec switch_root /newroot /sbin/init
"""


class Cpio:
    """An in-memory newc cpio archive."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1000
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        self._ino += 1
        namez = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(namez), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts += [header, namez, _pad(len(header) + len(namez)), data, _pad(len(data))]

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory and, first, any missing parents."""
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | mode)

    def _parent(self, path: str) -> None:
        parent = os.path.dirname(path.strip("/"))
        if parent:
            self.add_dir(parent)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def to_bytes(self) -> bytes:
        """The archive, with its trailer."""
        trailer = Cpio()
        trailer._ino = -1
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._parts + trailer._parts)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def build_base(busybox: Path, out: Path) -> Path:
    """Write the base initramfs (busybox, /init, device nodes) to `out`, gzip'd."""
    cpio = Cpio()
    for d in ROOT_DIRS:
        cpio.add_dir(d)
    cpio.add_char_device("dev/console", 5, 1)
    cpio.add_char_device("dev/null", 1, 3, 0o666)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.add_file("etc/profile", PROFILE.encode())
    _write_atomic(out, gzip.compress(cpio.to_bytes(), 6, mtime=0))
    return out


def compose(base: Path, out: Path, files: dict[str, bytes | Path],
            executables: tuple[str, ...] = ()) -> Path:
    """Write `base` followed by an archive of `files` (guest path -> content) to `out`.

    Guest paths in `executables` get mode 0755. Returns `out`.
    """
    cpio = Cpio()
    for guest_path, data, mode in _entries(files, executables):
        cpio.add_file(guest_path, data, mode)
    _write_atomic(out, base.read_bytes() + gzip.compress(cpio.to_bytes(), 1, mtime=0))
    return out


def write_tar_disk(out: Path, files: dict[str, bytes | Path],
                   executables: tuple[str, ...] = ()) -> Path:
    """Write `files` (guest path -> content, as for `compose`) to `out` as a raw disk
    image: a ustar archive, padded to whole 512-byte sectors, that busybox's
    `tar -xf /dev/vdX -C /` unpacks. Only file entries: tar makes the parent
    directories, and a directory that is a symlink in the guest (/bin -> usr/bin)
    stays one. Returns `out`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for guest_path, data, mode in _entries(files, executables):
            info = tarfile.TarInfo(guest_path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    _write_atomic(out, data + b"\0" * (-len(data) % 512))
    return out


def build_loader(busybox: Path, modules: list[tuple[str, bytes]], out: Path) -> Path:
    """Write a loader initrd (LOADER_INIT) to `out`, gzip'd: busybox and `modules`,
    (name, .ko contents) in load order, as /lib/qemuleak/NAME.ko."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "newroot", "lib/qemuleak"):
        cpio.add_dir(d)
    cpio.add_char_device("dev/console", 5, 1)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for name, data in modules:
        cpio.add_file(f"lib/qemuleak/{name}.ko", data)
    names = " ".join(name for name, _ in modules)
    cpio.add_file("init", (LOADER_INIT % names).encode(), 0o755)
    _write_atomic(out, gzip.compress(cpio.to_bytes(), 6, mtime=0))
    return out


def _entries(files: dict[str, bytes | Path], executables: tuple[str, ...]):
    """(guest path, contents, mode) for each of `files`."""
    for guest_path, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        yield guest_path, data, 0o755 if guest_path in executables else 0o644


def module_files(modules: list[Path]) -> dict[str, bytes | Path]:
    """Guest paths for kernel modules: /modules/NAME.ko."""
    return {f"modules/{m.name}": m for m in modules}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
