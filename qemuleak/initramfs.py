"""Compose initramfs images: a cached busybox base plus per-run extra files.

The kernel accepts several cpio archives concatenated, each compressed on its own,
so a guest's initramfs is the base archive (built once, cached) followed by a small
archive of extras (modules at /modules/NAME.ko, scripts). Only the extras are
compressed on each run. Archives are written in the newc format directly, so no
root rights are needed for device nodes.
"""

import gzip
import os
import stat
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
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root",
              "etc/qemuleak/rc.d", "modules", "run", "mnt"):
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
    for guest_path, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        mode = 0o755 if guest_path in executables else 0o644
        cpio.add_file(guest_path, data, mode)
    _write_atomic(out, base.read_bytes() + gzip.compress(cpio.to_bytes(), 1, mtime=0))
    return out


def module_files(modules: list[Path]) -> dict[str, bytes | Path]:
    """Guest paths for kernel modules: /modules/NAME.ko."""
    return {f"modules/{m.name}": m for m in modules}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
