"""The initramfs composer writes archives the real cpio tool (and the kernel) read."""

import os
import shutil
import subprocess
import zlib

import pytest

from qemuleak import initramfs

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")


def gzip_members(data: bytes) -> list[bytes]:
    """Each gzip member of `data`, decompressed (the kernel unpacks them in turn)."""
    members = []
    while data:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        members.append(d.decompress(data))
        data = d.unused_data
    return members


def extract(archive: bytes, dest):
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=archive,
                   cwd=dest, check=True, capture_output=True)


@needs_cpio
def test_base_then_extras(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake busybox")
    base = initramfs.build_base(busybox, tmp_path / "base.cpio.gz")
    ko = tmp_path / "leaky.ko"
    ko.write_bytes(os.urandom(5001))
    out = initramfs.compose(base, tmp_path / "initrd.gz",
                            {**initramfs.module_files([ko]), "etc/qemuleak/rc.d/10-x": b"#!/bin/sh\n"},
                            executables=("etc/qemuleak/rc.d/10-x",))
    data = out.read_bytes()
    assert data.startswith(base.read_bytes())         # the cached base is reused as is
    first, second = gzip_members(data)
    extract(first, tmp_path / "a")
    extract(second, tmp_path / "b")
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "bin/busybox").read_bytes() == busybox.read_bytes()
    assert os.readlink(a / "bin/sh") == "busybox"
    assert initramfs.READY_MARKER in (a / "init").read_text()
    assert os.stat(a / "init").st_mode & 0o777 == 0o755
    assert (b / "modules/leaky.ko").read_bytes() == ko.read_bytes()
    assert os.stat(b / "etc/qemuleak/rc.d/10-x").st_mode & 0o777 == 0o755
    assert os.stat(b / "modules/leaky.ko").st_mode & 0o777 == 0o644


@needs_cpio
def test_device_nodes_without_root():
    cpio = initramfs.Cpio()
    cpio.add_char_device("dev/console", 5, 1)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=cpio.to_bytes(),
                             capture_output=True, check=True).stdout.decode()
    lines = listing.splitlines()
    assert lines[0].startswith("drwxr-xr-x") and lines[0].endswith(" dev")
    assert lines[1].startswith("crw-------") and "5,   1" in lines[1] and lines[1].endswith(" dev/console")


def test_entries_are_aligned_and_terminated():
    cpio = initramfs.Cpio()
    for n in range(1, 9):                       # every name and data length modulo 4
        cpio.add_file("f" * n, b"x" * n)
    raw = cpio.to_bytes()
    assert raw.count(b"070701") == 8 + 1         # 8 files and the trailer
    offset, names = 0, []
    while True:
        assert raw[offset:offset + 6] == b"070701" and offset % 4 == 0
        size, namesize = int(raw[offset + 54:offset + 62], 16), int(raw[offset + 94:offset + 102], 16)
        name = raw[offset + 110:offset + 110 + namesize - 1].decode()
        names.append(name)
        offset += 110 + namesize
        offset += -offset % 4
        assert raw[offset:offset + size] == (b"" if name == "TRAILER!!!" else b"x" * len(name))
        offset += size + (-size % 4)
        if name == "TRAILER!!!":
            break
    assert offset == len(raw)
    assert names[-1] == "TRAILER!!!" and names[:-1] == ["f" * n for n in range(1, 9)]


def test_parent_directories_come_first_once():
    cpio = initramfs.Cpio()
    cpio.add_file("a/b/c.txt", b"1")
    cpio.add_file("a/b/d.txt", b"2")
    raw = cpio.to_bytes()
    order = [raw.index(n) for n in (b"a\0", b"a/b\0", b"a/b/c.txt\0", b"a/b/d.txt\0")]
    assert order == sorted(order)
    assert raw.count(b"a/b\0") == 1
